"""The `flowgrpo` command: one argparse parser, each subcommand registered by the module that owns it."""
from __future__ import annotations

import argparse
import importlib
import sys

# module path -> each module defines `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
COMMAND_MODULES = [
    "flowgrpo.commands",
    "flowgrpo.rewards.server",
    "flowgrpo.eval.cli",
]


# One name per concept across the subcommands: the old spellings (still accepted as aliases) warn, for one release.
RENAMED = {
    "eval": {"--metadata": "--prompts", "--n": "--images-per-prompt", "--steps": "--num-steps",
             "--batch": "--micro-batch", "--judge": "--judge-backend"},
    "sample": {"--n": "--images-per-prompt", "--steps": "--num-steps", "--batch": "--micro-batch"},
    "serve-reward": {"--config": "--reward-options"},
}


def warn_renamed(argv: list[str]) -> None:
    """A one-line warning for each old option spelling in ``argv``."""
    old = RENAMED.get(argv[0], {}) if argv else {}
    for token in argv:
        name = token.split("=", 1)[0]
        if name in old:
            print(f"flowgrpo {argv[0]}: warning: {name} is now {old[name]}; the old spelling is read for one more "
                  "release", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowgrpo",
        description="Online RL (GRPO) for flow-matching text-to-image models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    warn_renamed(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
