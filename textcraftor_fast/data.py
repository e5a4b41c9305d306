"""Prompt sources (txt / jsonl / csv / parquet / built-in PartiPrompts), de-dup, sharding, resumable cursor.

TextCraftor needs prompts only (no images). The loader is a deterministic, resumable stream: the epoch's
order is a permutation drawn from (seed, epoch), each rank takes every world_size-th prompt of it, and
the cursor (epoch, position) is all that a checkpoint must store to continue exactly where it stopped.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .registry import PROMPT_SETS, resource_path

logger = logging.getLogger(__name__)



def registered_prompt_file(source: str, purpose: Literal["train", "evaluation"] = "train") -> Path | None:
    """The packaged file behind a registered prompt set ('builtin:parti', a plugin's; registry.PROMPT_SETS) for
    training or for evaluation (where a set has held-out prompts); None when `source` is no registered name."""
    if source not in PROMPT_SETS:
        return None
    target = getattr(PROMPT_SETS.get(source), purpose)
    if target is None:
        usable = [n for n in PROMPT_SETS.names() if getattr(PROMPT_SETS.get(n), purpose) is not None]
        raise ValueError(f"prompt set {source!r} holds no {purpose} prompts; for {purpose} use a prompt file or one "
                         f"of {', '.join(usable)}")
    return Path(str(resource_path(target)))


def _column(header: list[str], field: str, path: Path) -> int:
    lowered = [h.strip().lower() for h in header]
    if field.lower() not in lowered:
        raise ValueError(f"prompt file '{path}' has no column '{field}' (columns: {', '.join(header)}); "
                         f"set data.field to one of them")
    return lowered.index(field.lower())


def _text_lines(path: Path, on_bad_line: str) -> list[tuple[int, str]]:
    """(line number, text) of every UTF-8 line; a line that does not decode is an error naming the file and
    line (on_bad_line='error') or is dropped and reported once (on_bad_line='skip')."""
    out, bad = [], []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            out.append((lineno, raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            if on_bad_line != "skip":
                raise ValueError(f"prompt file '{path}' line {lineno} is not UTF-8 text (byte {raw[e.start]:#04x} "
                                 f"at column {e.start + 1}); re-save the file as UTF-8, or set "
                                 "data.on_bad_line=skip to drop such lines") from None
            bad.append(lineno)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        logger.warning("prompt file '%s': skipped %d line(s) that are not UTF-8 text (data.on_bad_line=skip): "
                       "line %s", path, len(bad), shown)
    return out


def _read_delimited(path: Path, field: str, delimiter: str, on_bad_line: str) -> list[str]:
    rows = list(csv.reader([text for _, text in _text_lines(path, on_bad_line)], delimiter=delimiter))
    if not rows:
        return []
    col = _column(rows[0], field, path)
    return [r[col] if col < len(r) else "" for r in rows[1:]]


def _read_jsonl(path: Path, field: str, on_bad_line: str) -> list[str]:
    out = []
    for lineno, line in _text_lines(path, on_bad_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompt file '{path}' line {lineno} is not valid JSON: {e}") from None
        if isinstance(record, str):
            out.append(record)
        elif isinstance(record, dict) and field in record:
            out.append(str(record[field]))
        else:
            raise ValueError(f"prompt file '{path}' line {lineno} has no field '{field}' "
                             f"(keys: {', '.join(record) if isinstance(record, dict) else type(record).__name__}); "
                             "set data.field")
    return out


def _read_parquet(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet prompts needs pyarrow: pip install 'textcraftor-fast[parquet]'") from None
    table = pq.read_table(path)
    col = _column(table.column_names, field, path)
    return [str(v) if v is not None else "" for v in table.column(col).to_pylist()]


def read_prompts(source: str, field: str = "prompt", on_bad_line: str = "error",
                 purpose: Literal["train", "evaluation"] = "train") -> list[str]:
    """Read raw prompts (blank lines and duplicates still in) from a file or a registered set (its `purpose`
    file: a set's evaluation prompts may be held out from its training ones)."""
    path = Path(source)
    registered = registered_prompt_file(source, purpose)
    if registered is not None:
        path, field = registered, "prompt"
    if path.is_dir():
        raise IsADirectoryError(f"prompt source '{source}' is a folder; data.path must be one .txt/.jsonl/.csv/"
                                f".parquet file in it, or one of {', '.join(PROMPT_SETS.names())}")
    if not path.is_file():
        raise FileNotFoundError(f"prompt source '{source}' does not exist; data.path must be a .txt/.jsonl/.csv/"
                                f".parquet file or one of {', '.join(PROMPT_SETS.names())}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [text for _, text in _text_lines(path, on_bad_line)]
    if suffix == ".jsonl":
        return _read_jsonl(path, field, on_bad_line)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, field, "\t" if suffix == ".tsv" else ",", on_bad_line)
    if suffix == ".parquet":
        return _read_parquet(path, field)
    raise ValueError(f"prompt source '{source}' has unsupported extension '{suffix}'; "
                     "use .txt, .jsonl, .csv, .tsv or .parquet")


def load_prompts(source: str, field: str = "prompt", max_prompts: int | None = None,
                 on_bad_line: str = "error", purpose: Literal["train", "evaluation"] = "train") -> list[str]:
    """Read, strip, drop blanks and duplicates (first occurrence kept, order preserved), and log the counts."""
    raw = read_prompts(source, field, on_bad_line, purpose)
    stripped = [p.strip() for p in raw]
    nonblank = [p for p in stripped if p]
    unique = list(dict.fromkeys(nonblank))
    if max_prompts is not None:
        unique = unique[:max_prompts]
    logger.info("Prompts from %s: %d read, %d blank dropped, %d duplicates dropped, %d used",
                source, len(raw), len(raw) - len(nonblank), len(nonblank) - len(dict.fromkeys(nonblank)),
                len(unique))
    if not unique:
        raise ValueError(f"prompt source '{source}' holds no prompts (after dropping blank lines); "
                         "give a file with at least one prompt")
    return unique


class PromptTable(Sequence[str]):
    """Prompts in one Arrow string column memory-mapped from a file (see `open_prompts`): the pages belong to
    the OS page cache, so every rank on a node shares one copy instead of holding its own list of strings."""

    def __init__(self, column: Any, path: Path) -> None:
        self._column, self.path = column, path

    def __len__(self) -> int:
        return len(self._column)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self._column[i].as_py() for i in range(*index.indices(len(self)))]
        return self._column[index].as_py()


# Bump when the de-duplication below changes: cached tables of an older rule are then rebuilt, never reused.
_TABLE_VERSION = 1


def open_prompts(source: str, field: str = "prompt", max_prompts: int | None = None, on_bad_line: str = "error",
                 cache_dir: str | Path | None = None) -> Sequence[str]:
    """The prompts `load_prompts` returns, the same strings in the same order; a .parquet source (the large
    ones: OpenPrompts is 10M prompts) as a `PromptTable` memory-mapped from `cache_dir`, built there once
    (atomically) per source file, field and max_prompts. Other sources come back as a list."""
    path = Path(source)
    if cache_dir is None or source in PROMPT_SETS or path.suffix.lower() != ".parquet" or not path.is_file():
        return load_prompts(source, field, max_prompts, on_bad_line)
    try:
        import pyarrow as pa
    except ImportError:  # load_prompts says which extra to install
        return load_prompts(source, field, max_prompts, on_bad_line)

    stat = path.stat()
    key = hashlib.sha256(json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, field, max_prompts,
                                     _TABLE_VERSION]).encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"prompts-{key}.arrow"
    if not cached.is_file():
        _write_prompt_table(path, field, max_prompts, cached)
    else:
        logger.info("Prompts from %s: the de-duplicated table %s (built earlier)", source, cached)
    table = pa.ipc.open_file(pa.memory_map(str(cached), "r")).read_all()  # zero-copy: nothing is read yet
    if table.num_rows == 0:
        raise ValueError(f"prompt source '{source}' holds no prompts (after dropping blank lines); "
                         "give a file with at least one prompt")
    return PromptTable(table.column(0), cached)


def _write_prompt_table(path: Path, field: str, max_prompts: int | None, out: Path) -> None:
    """load_prompts' rule (str.strip, blanks dropped, first occurrence of each prompt kept, in file order) one
    record batch at a time, de-duplicated by Arrow's hash table, written as an Arrow IPC file."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    col = _column(parquet.schema_arrow.names, field, path)
    name = parquet.schema_arrow.names[col]
    pieces, n_raw, n_nonblank = [], 0, 0
    for batch in parquet.iter_batches(batch_size=1 << 16, columns=[name]):
        values = batch.column(0).to_pylist()
        n_raw += len(values)
        kept = [t for t in (str(v).strip() if v is not None else "" for v in values) if t]
        n_nonblank += len(kept)
        pieces.append(pa.array(kept, type=pa.large_string()))
    distinct = pc.unique(pa.chunked_array(pieces, type=pa.large_string()))  # first occurrences, in order
    unique = distinct[:max_prompts] if max_prompts is not None else distinct
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("prompt", pa.large_string())])) as w:
        w.write_table(pa.table({"prompt": unique}), max_chunksize=1 << 16)
    os.replace(tmp, out)  # several ranks may build it at once: each renames a complete file into place
    logger.info("Prompts from %s: %d read, %d blank dropped, %d duplicates dropped, %d used (table: %s)",
                path, n_raw, n_raw - n_nonblank, n_nonblank - len(distinct), len(unique), out)


@dataclass
class PromptStream:
    """Endless, deterministic, sharded batches of prompts with a resumable cursor.

    Every rank draws the same permutation for an epoch (from seed and epoch) and keeps positions
    rank, rank + world, ...; so ranks never see the same prompt within an epoch.
    """

    prompts: Sequence[str]
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        if len(self.prompts) < self.world_size:
            raise ValueError(f"{len(self.prompts)} prompts cannot be sharded over {self.world_size} ranks; "
                             "give at least one prompt per rank")
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        n = len(self.prompts)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        return order[self.rank::self.world_size]

    def next_batch(self) -> list[str]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            batch.append(self.prompts[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        # rank 0's cursor times world_size is the number of prompts all ranks took from this epoch's order,
        # which is what another rank count resumes from.
        return {"epoch": self.epoch, "position": self.position, "num_prompts": len(self.prompts),
                "world_size": self.world_size, "global_position": self.position * self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_prompts", len(self.prompts)) != len(self.prompts):
            logger.warning("Resuming with %d prompts but the checkpoint saw %d: the data order will differ",
                           len(self.prompts), state["num_prompts"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if int(state.get("world_size", self.world_size)) != self.world_size:
            taken = int(state["global_position"])
            if taken % self.world_size:
                raise ValueError(f"the checkpoint's data cursor ({taken} prompts of epoch {self.epoch} taken by "
                                 f"{state['world_size']} ranks) cannot be split over {self.world_size} ranks; "
                                 "resume on a rank count that divides it")
            self.position = taken // self.world_size
        self._order = self._epoch_order(self.epoch)


def warn_long_prompts(tokenizer, prompts: Sequence[str], max_checked: int = 100_000) -> None:
    """Warn when prompts exceed the tokenizer's length. Up to `max_checked` of them, evenly spaced, in chunks:
    tokenizing 10M prompts at start-up would take minutes and hold every id list at once."""
    limit, stride = tokenizer.model_max_length, max(1, len(prompts) // max_checked)
    n_long = n_checked = longest = 0
    indices = range(0, len(prompts), stride)
    for start in range(0, len(indices), 4096):
        chunk = [prompts[i] for i in indices[start:start + 4096]]
        lengths = [len(ids) for ids in tokenizer(chunk, truncation=False, verbose=False).input_ids]
        n_long += sum(n > limit for n in lengths)
        n_checked += len(lengths)
        longest = max(longest, *lengths)
    if n_long:
        sample = "" if n_checked == len(prompts) else f" (checked {n_checked} evenly spaced ones)"
        logger.warning("%d of %d prompts%s are longer than %d tokens and are truncated to them (as SD's pipeline "
                       "does); the longest has %d", n_long, n_checked, sample, limit, longest)
