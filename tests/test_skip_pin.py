"""The pinned skips (conftest.py at the root, tests/allowed_skips.txt): a test that skips without being listed for
this machine fails the session, also under pytest-xdist; a listed one does not; the list's format is checked."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

TESTS = '''
import pytest, torch

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_only():
    assert torch.cuda.is_available()

def test_runs():
    assert True

def test_skips_silently():
    pytest.skip("a package is missing")
'''


def _suite(tmp_path: Path, allowed: str) -> Path:
    """A copy of the root conftest with its own list, beside a file of three tests."""
    tmp_path.mkdir()
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "allowed_skips.txt").write_text(allowed)
    (tmp_path / "tests" / "test_three.py").write_text(TESTS)
    return tmp_path


def _pytest(folder: Path, *args: str, no_ext: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TEXTCRAFTOR_NO_EXT"}
    if no_ext:
        env["TEXTCRAFTOR_NO_EXT"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark",
                           *args, "tests"], cwd=folder, capture_output=True, text=True, timeout=120, env=env)


def test_an_unlisted_skip_fails_the_session_under_xdist_and_a_listed_one_does_not(tmp_path):
    xdist = ["-n", "2"]  # the workers' reports reach the controller, which checks them
    cuda_line = "cuda tests/test_three.py::test_cuda_only\n"
    unlisted = _pytest(_suite(tmp_path / "unlisted", cuda_line), *xdist)
    assert unlisted.returncode == 1, unlisted.stdout[-2000:]
    report = unlisted.stdout.split("skips not allowed here")[1]
    assert "tests/test_three.py::test_skips_silently: Skipped: a package is missing" in report
    assert "1 test(s) skipped that must run on this machine" in report and "test_cuda_only" not in report

    # Listed under 'native': allowed when the native library is left out on purpose, and only then.
    listed = _suite(tmp_path / "listed", cuda_line + "native tests/test_three.py::test_skips_silently  # why\n")
    on_purpose = _pytest(listed, *xdist, no_ext=True)
    assert on_purpose.returncode == 0 and "skips not allowed" not in on_purpose.stdout, on_purpose.stdout[-2000:]
    if shutil.which(os.environ.get("CXX", "c++")) is not None:
        by_accident = _pytest(listed)  # and without xdist
        assert by_accident.returncode == 1 and "test_skips_silently" in by_accident.stdout, by_accident.stdout[-2000:]


def test_a_malformed_line_names_the_file_the_line_and_the_conditions(tmp_path):
    import importlib.util

    # By path: under pytest-xdist another folder's conftest may already be the module named 'conftest'.
    spec = importlib.util.spec_from_file_location("root_conftest", ROOT / "conftest.py")
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    allowed_skips = root_conftest.allowed_skips
    path = tmp_path / "allowed.txt"
    path.write_text("# comment\ncuda a.py::t\ngpu b.py::t\n")
    with pytest.raises(ValueError, match=r"allowed.txt:3: expected 'CONDITION NODEID' with CONDITION one of "
                                         r"\['cuda', 'linux', 'native'\], got 'gpu b.py::t'"):
        allowed_skips(path, {"cuda": True, "native": False, "linux": False})
    path.write_text("cuda a.py::t  # why\nnative b.py::t\n")
    assert allowed_skips(path, {"cuda": True, "native": False, "linux": False}) == {"a.py::t"}


def test_every_listed_test_exists():
    """A renamed test leaves a stale line that would let its new name skip unlisted: every line names a test."""
    import re

    for line in (ROOT / "tests" / "allowed_skips.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        node = line.split()[1]
        file, _, name = node.partition("::")
        function = re.sub(r"\[.*\]$", "", name)
        assert re.search(rf"^def {re.escape(function)}\(", (ROOT / file).read_text(), re.M), node
