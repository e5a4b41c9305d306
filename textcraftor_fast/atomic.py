"""Replacing a file or folder in one step: what a run leaves behind is either the old version or the new one, never
half of the new one (disk full, a crash, Ctrl-C while writing).

    with replaced_atomically(output_dir / "text_encoder") as tmp:
        model.save_pretrained(tmp)              # any writer, into `tmp`
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def replaced_atomically(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` (same folder, same suffix) for the block to write a file or folder
    to. When the block succeeds the temporary takes `target`'s place by rename; a previous `target` is moved aside
    first, removed after, and put back if the rename fails. When the block fails the temporary is removed and a
    previous `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{os.getpid()}-{target.name}"
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = target.parent / f".old-{os.getpid()}-{target.name}"
    had_old = target.exists() or target.is_symlink()
    if had_old:
        _remove(old)
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if had_old:
            os.replace(old, target)
        _remove(tmp)
        raise
    if had_old:
        _remove(old)
