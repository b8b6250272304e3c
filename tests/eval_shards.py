"""Some of the images of a `flowgrpo eval geneval` command, exactly as the whole command makes them, with each
image's pass or fail under the Shapes verifier: the command's batches draw their noise from one generator in order
and process r of w makes the batches j with j % w == r (`flowgrpo.eval.sampling.sharded_samples`), so "process r of
w" makes those batches' images whatever else runs."""
from __future__ import annotations

from types import SimpleNamespace

from flowgrpo.assets import SHAPES_MODEL
from flowgrpo.cli import build_parser
from flowgrpo.eval.sampling import sharded_samples
from flowgrpo.media import to_uint8
from flowgrpo.policies.generator import load_policy_for_sampling, sampling_settings
from flowgrpo.prompts.loaders import load_prompts
from flowgrpo.shapes.verify import verify


def command_verdicts(args: list[str], *, rank: int = 0, of: int = 1) -> dict[int, bool]:
    """{image index: passed} of the images that process ``rank`` of ``of`` makes for ``flowgrpo eval geneval
    ARGS`` (the command's own parser fills in its defaults)."""
    a = build_parser().parse_args(["eval", "geneval", *args, "--out", "unused"])
    policy = load_policy_for_sampling(a.model or str(SHAPES_MODEL), batch=a.micro_batch, device="cpu")
    steps, guidance = sampling_settings(policy, a.num_steps, a.guidance)
    todo = [e for e in load_prompts(a.prompts) for _ in range(a.images_per_prompt)]
    shard = SimpleNamespace(rank=rank, world_size=of, sharded=False)
    out = {}
    for rows, chunk, x in sharded_samples(policy, todo, images_per_prompt=a.images_per_prompt, num_steps=steps, guidance=guidance,
                                          seed=a.seed, batch=a.micro_batch, progress=False, dist=shard):
        out.update({i: verify(image, entry).passed for i, image, entry in zip(range(rows.start, rows.stop),
                                                                               to_uint8(x), chunk)})
    return out


def tag_accuracy(verdicts: str, args: list[str]) -> dict[str, float]:
    """Per-tag accuracy and overall (mean over tags) of a whole command's verdicts ('1' = pass, image by image)."""
    a = build_parser().parse_args(["eval", "geneval", *args, "--out", "unused"])
    todo = [e for e in load_prompts(a.prompts) for _ in range(a.images_per_prompt)]
    assert len(verdicts) == len(todo)
    tags = list(dict.fromkeys(e["tag"] for e in todo))
    acc = {t: sum(v == "1" for v, e in zip(verdicts, todo) if e["tag"] == t) / sum(e["tag"] == t for e in todo)
           for t in tags}
    return acc | {"overall": sum(acc.values()) / len(acc)}
