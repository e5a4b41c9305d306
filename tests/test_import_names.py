"""No import name of this repository shadows an installed distribution.

Any interpreter started in the repo root (`python -c`, `python -m`, pytest, torchrun/deepspeed with `-m`) has
the root on sys.path ahead of site-packages, and pytest adds each test folder that is not a package. A regular
package or module there with the name of an installed distribution wins over it: the top-level kernels/ folder
did that to the PyPI `kernels` package, which transformers >= 5.25 and bitsandbytes import, and nothing that
imported transformers worked from the repo root. kernels/ therefore has no __init__.py (a namespace portion
loses to any regular package later on the path, PEP 420) and imports as textcraftor_fast.kernels through the
symlink textcraftor_fast/kernels -> ../kernels, in the editable install and in a built wheel.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_DISTRIBUTION = "textcraftor-fast"
SKIP_DIRS = {".git", ".venv", ".venv-latest", ".cache", "build", "build-ext", "build-ext-latest", "outputs", "__pycache__",
             "results"}


def exposed_names(folder: Path) -> set[str]:
    """Top-level names a folder on sys.path provides as regular packages or modules (a folder without
    __init__.py is a namespace portion: any regular package of that name elsewhere on the path wins)."""
    names = set()
    for entry in folder.iterdir():
        if entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
        elif entry.is_file() and entry.suffix in {".py", ".so"}:
            names.add(entry.name.split(".")[0])
    return names


def path_entries(root: Path) -> list[Path]:
    """The folders that can be on sys.path for code run from the repo: the root itself, and every folder of
    tests or benchmarks that holds Python files (pytest's default import mode inserts each test folder that is
    not a package, and a script run directly, e.g. tests/ds_worker.py under torchrun, has its own folder first)."""
    entries = [root]
    for top in ("tests", "benchmarks"):
        for folder in [root / top, *(p for p in (root / top).rglob("*") if p.is_dir())]:
            if SKIP_DIRS & set(folder.relative_to(root).parts):
                continue
            if any(folder.glob("*.py")):
                entries.append(folder)
    return entries


def shadowed(entries: list[Path], distributions: dict[str, list[str]]) -> dict[str, list[str]]:
    """name -> the folders that provide it, for names that an installed distribution (other than ours) owns."""
    clashes: dict[str, list[str]] = {}
    for folder in entries:
        for name in exposed_names(folder):
            owners = [d for d in distributions.get(name, []) if d != OWN_DISTRIBUTION]
            if owners:
                clashes.setdefault(name, []).append(f"{folder} (also in {', '.join(owners)})")
    return clashes


def test_no_folder_on_the_path_shadows_an_installed_distribution():
    distributions = importlib.metadata.packages_distributions()
    entries = path_entries(ROOT)
    assert {ROOT / "tests", ROOT / "tests" / "kernels", ROOT / "benchmarks"} <= set(entries)
    assert not shadowed(entries, distributions), shadowed(entries, distributions)


def test_the_shadow_check_finds_a_planted_clash(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "attention.py").write_text("")
    (tmp_path / "yaml.py").write_text("")
    (tmp_path / "namespace_only").mkdir()
    dists = {"kernels": ["kernels"], "yaml": ["PyYAML"], "namespace_only": ["other"]}
    assert shadowed([tmp_path], dists).keys() == {"yaml"}  # a folder without __init__.py shadows nothing
    (tmp_path / "kernels" / "__init__.py").write_text("")
    assert shadowed([tmp_path], dists).keys() == {"kernels", "yaml"}


def _stand_in_kernels(folder: Path) -> Path:
    """A distribution named `kernels` (version 0.0.0, so no library tries to use it) in its own folder."""
    (folder / "kernels").mkdir(parents=True)
    (folder / "kernels" / "__init__.py").write_text("STAND_IN = True\n")
    info = folder / "kernels-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.0.0\n")
    (info / "top_level.txt").write_text("kernels\n")
    (info / "RECORD").write_text("kernels/__init__.py,,\n")
    return folder


IMPORTS_FROM_THE_ROOT = """
import json, sys
import transformers.modeling_utils, diffusers, bitsandbytes
import textcraftor_fast.kernels.groupnorm, textcraftor_fast.kernels.attention
import kernels
print(json.dumps({"kernels": kernels.__file__, "path0": sys.path[0]}))
"""


@pytest.mark.parametrize("where", [".", "tests", "benchmarks"])
def test_kernels_resolves_to_the_distribution_with_a_repo_folder_first_on_the_path(where, tmp_path):
    """The failing call of a fresh clone: `python -c` in the repo root (sys.path[0] is the root; likewise a script
    in tests/ or benchmarks/, such as tests/ds_worker.py under torchrun) importing libraries that import `kernels`,
    and our kernels. `kernels` must be the installed distribution's (a stand-in placed after the repo folder
    when none is installed), not the repo's kernels/ or tests/kernels/."""
    if "kernels" in importlib.metadata.packages_distributions():
        extra, expected = [], importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    else:
        extra = [str(_stand_in_kernels(tmp_path / "site"))]
        expected = tmp_path / "site" / "kernels" / "__init__.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(extra), "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", IMPORTS_FROM_THE_ROOT], cwd=ROOT / where, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["path0"] == ""  # the working directory, ahead of site-packages
    assert Path(found["kernels"]).resolve() == Path(expected).resolve(), found


@pytest.mark.parametrize("module", ["textcraftor_fast.cli", "textcraftor_fast.tiny.build"])
def test_python_dash_m_help_works_from_the_repo_root(module):
    run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("usage:")


def test_a_built_wheel_carries_the_kernels_inside_the_package(tmp_path):
    """The wheel maps kernels/ to textcraftor_fast/kernels (through the symlink) and has no top-level `kernels`;
    its package imports with only the wheel's files and site-packages on the path (no editable finder)."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True,
                    ignore=shutil.ignore_patterns(*SKIP_DIRS - {"results"}, "*.egg-info", ".benchmarks"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("textcraftor_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"textcraftor_fast"}
    for kernel in ("groupnorm", "attention", "geglu", "norm_module"):
        assert f"textcraftor_fast/kernels/{kernel}.py" in names
    zipfile.ZipFile(wheel).extractall(tmp_path / "unpacked")
    probe = ("import sys; sys.path[:0] = [sys.argv[1]]; sys.path += sys.argv[2:]; "
             "import textcraftor_fast.kernels.groupnorm as g; print(g.__file__)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([sys.executable, "-I", "-S", "-c", probe, str(tmp_path / "unpacked"),
                          *site.getsitepackages()], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert Path(run.stdout.strip()).is_relative_to(tmp_path / "unpacked")
