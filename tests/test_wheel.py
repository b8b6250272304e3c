"""The built wheel holds every module under the one flowgrpo namespace (mapped folders included)."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["flowgrpo", "flowgrpo.core", "flowgrpo.samplers", "flowgrpo.rewards", "flowgrpo.prompts", "flowgrpo.eval",
           "flowgrpo.policies", "flowgrpo.shapes", "flowgrpo.train", "flowgrpo.cli"]


@pytest.mark.slow
def test_wheel_installs_and_imports_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel, = (tmp_path / "dist").glob("flowgrpo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = sorted(p.relative_to(ROOT) for d in ("flowgrpo", "samplers", "rewards", "prompts", "eval")
                     for p in (ROOT / d).rglob("*.py"))
    for src in sources:  # samplers/steps.py -> flowgrpo/samplers/steps.py
        inside = src if src.parts[0] == "flowgrpo" else Path("flowgrpo", *src.parts)
        assert inside.as_posix() in names, f"{src} is missing from the wheel"
    # Install into an empty target and import from there only (no repository, no editable finder on the path).
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    code = ("import sys, importlib; sys.path.insert(0, sys.argv[1]); "
            "[sys.meta_path.remove(f) for f in list(sys.meta_path) if 'editable' in type(f).__name__.lower() "
            "or 'editable' in getattr(f, '__module__', '')]; "
            "mods = [importlib.import_module(m) for m in sys.argv[2:]]; "
            "bad = [m.__name__ for m in mods if not m.__file__.startswith(sys.argv[1])]; "
            "assert not bad, bad; print(len(mods))")
    out = subprocess.run([sys.executable, "-c", code, str(target), *MODULES], cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(len(MODULES))
    assert (target / "flowgrpo" / "shapes" / "verify.py").is_file()
