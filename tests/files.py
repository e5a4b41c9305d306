"""Reading folders back in tests: what a fault must leave byte for byte unchanged."""
import hashlib
from pathlib import Path


def tree_hashes(folder: Path) -> dict[str, str]:
    """{path relative to `folder`: sha256} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
