"""The whole suite's (tests/ and benchmarks/) pinned skips: a conftest here, at the root, sees both folders' reports."""
import os
import shutil
import sys
from pathlib import Path

import pytest

# ----------------------------------------------------------------------------------------- pinned skips
# A test that skips proves nothing, and a skip that nobody asked for hides a broken set-up (the native library
# that failed to build once made 58 tests skip while CI stayed green). So every skip must be listed in
# tests/allowed_skips.txt with the condition under which it may skip; any other skip fails the session. Works under
# pytest-xdist: the controller receives every worker's reports.
ALLOWED_SKIPS = Path(__file__).parent / "tests" / "allowed_skips.txt"


def _skip_conditions() -> dict[str, bool]:
    """Which of the file's conditions hold on this machine."""
    import torch

    return {
        "cuda": not torch.cuda.is_available(),  # the CUDA-only tests, on a machine without a GPU
        "native": bool(os.environ.get("TEXTCRAFTOR_NO_EXT")) or shutil.which(os.environ.get("CXX", "c++")) is None,
        "linux": not sys.platform.startswith("linux"),
    }


def allowed_skips(path: Path = ALLOWED_SKIPS, conditions: dict[str, bool] | None = None) -> set[str]:
    """The node ids allowed to skip here: lines `CONDITION NODEID` whose condition holds ('#' starts a comment)."""
    conditions = _skip_conditions() if conditions is None else conditions
    allowed = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        condition, _, node = line.partition(" ")
        if condition not in conditions or not node.strip():
            raise ValueError(f"{path}:{number}: expected 'CONDITION NODEID' with CONDITION one of "
                             f"{sorted(conditions)}, got {line!r}")
        if conditions[condition]:
            allowed.add(node.strip())
    return allowed


_skipped: dict[str, str] = {}
_UNEXPECTED = pytest.StashKey[dict]()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped[report.nodeid] = reason


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller checks
        return
    allowed = allowed_skips()
    unexpected = {node: why for node, why in _skipped.items() if node not in allowed}
    session.config.stash[_UNEXPECTED] = unexpected
    if unexpected and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    unexpected = config.stash.get(_UNEXPECTED, {})
    if unexpected:
        terminalreporter.section("skips not allowed here (tests/allowed_skips.txt)", red=True)
        for node, why in sorted(unexpected.items()):
            terminalreporter.write_line(f"{node}: {why}")
        terminalreporter.write_line(f"{len(unexpected)} test(s) skipped that must run on this machine: fix the cause "
                                    "(a missing build or package), or list them with the condition that allows it")
