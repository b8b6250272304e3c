"""The package's structure: its packages import each other without a cycle, and the README's layout section names
every package the tree has."""
import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"flowgrpo": "flowgrpo", "samplers": "flowgrpo.samplers", "rewards": "flowgrpo.rewards",
           "prompts": "flowgrpo.prompts", "eval": "flowgrpo.eval"}  # as pyproject.toml maps them


def packages() -> dict[str, Path]:
    """Every package (a folder with __init__.py) by its import name."""
    out = {}
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            out[".".join([name, *rel.parts])] = init.parent
    return out


def package_of(module: str, names: set[str]) -> str | None:
    """The innermost package holding ``module`` (a module of flowgrpo/ itself belongs to ``flowgrpo``)."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in names:
            return ".".join(parts[:k])
    return None


def import_graph() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the files importing it (every import, at module level or inside a
    function: a lazy import is a dependency too)."""
    pkgs = packages()
    names = set(pkgs)
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for name, folder in pkgs.items():
        for f in folder.glob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                for target in targets:
                    dep = package_of(target, names)
                    if dep is not None and dep != name:
                        graph[name][dep].add(str(f.relative_to(ROOT)))
    return graph


def find_cycle(graph: dict[str, dict[str, set[str]]]) -> list[str]:
    """One cycle of packages, or []."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, {})):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = 2
        stack.pop()
        return []

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return []


def test_packages_import_each_other_without_a_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    where = [f"{a} -> {b}: {sorted(graph[a][b])}" for a, b in zip(cycle, cycle[1:])]
    assert not cycle, "import cycle " + " -> ".join(cycle) + "\n" + "\n".join(where)
    # the pure layers stay pure: the maths and the samplers import no other package of the project
    for pure in ("flowgrpo.core", "flowgrpo.samplers", "flowgrpo.media"):
        assert not set(graph.get(pure, {})) - {"flowgrpo.core"}, (pure, dict(graph[pure]))


def test_a_cycle_is_found_and_named():
    graph = {"a": {"b": {"a.py"}}, "b": {"c": {"b.py"}}, "c": {"a": {"c.py"}}, "d": {"a": {"d.py"}}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": {"a.py"}}, "b": {}}) == []


def test_the_readme_layout_section_names_every_package():
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, "README.md has no '## Layout' section"
    for name, folder in packages().items():
        path = folder.relative_to(ROOT).as_posix() + "/"
        assert path in section.group(1), f"the README's layout section does not name {path} ({name})"
