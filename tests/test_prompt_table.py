"""Large .parquet prompt sets memory-mapped as one Arrow column (data.open_prompts): the same prompts as
load_prompts, one table per source built once, and pages shared by every rank on a node (measured as PSS)."""
import multiprocessing
import random
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from textcraftor_fast.data import PromptStream, PromptTable, load_prompts, open_prompts  # noqa: E402


def _messy_parquet(path: Path, n: int, seed: int = 0) -> Path:
    """n rows: duplicates, blanks, None, surrounding whitespace Python's str.strip removes (tabs, non-breaking and
    ideographic spaces, \\x1c), a second column, several row groups."""
    rng = random.Random(seed)
    pads = ["", " ", "\t", "\u00a0", "\u3000", "\x1c", "\n "]
    rows = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            rows.append(None)
        elif r < 0.1:
            rows.append(rng.choice(pads))
        else:
            rows.append(rng.choice(pads) + f"a photo of thing {rng.randrange(n // 3)}, style {rng.randrange(7)}"
                        + rng.choice(pads))
    table = pa.table({"id": list(range(n)), "Prompt": rows})
    pq.write_table(table, path, row_group_size=max(1, n // 5))
    return path


@pytest.mark.parametrize("max_prompts", [None, 1000])
def test_the_table_holds_load_prompts_strings_in_order(tmp_path, max_prompts, caplog):
    src = _messy_parquet(tmp_path / "p.parquet", 20_000)
    expected = load_prompts(str(src), "prompt", max_prompts)
    with caplog.at_level("INFO"):
        table = open_prompts(str(src), "prompt", max_prompts, cache_dir=tmp_path / "cache")
    assert isinstance(table, PromptTable) and table.path.parent == tmp_path / "cache"
    assert len(table) == len(expected) and list(table) == expected
    assert table[:3] == expected[:3] and table[-1] == expected[-1]
    # the same counts in the log as load_prompts gives
    raw = pq.read_table(src).column("Prompt").to_pylist()
    nonblank = [t for t in ((v or "").strip() for v in raw) if t]
    assert (f"{len(raw)} read, {len(raw) - len(nonblank)} blank dropped, "
            f"{len(nonblank) - len(dict.fromkeys(nonblank))} duplicates dropped, {len(expected)} used") in caplog.text


def test_the_table_is_built_once_and_rebuilt_when_the_source_changes(tmp_path):
    src = _messy_parquet(tmp_path / "p.parquet", 2000)
    first = open_prompts(str(src), cache_dir=tmp_path / "cache")
    assert open_prompts(str(src), cache_dir=tmp_path / "cache").path == first.path
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.path.name]  # no temporary left
    pq.write_table(pa.table({"prompt": ["a new prompt", "another"]}), src)
    assert list(open_prompts(str(src), cache_dir=tmp_path / "cache")) == ["a new prompt", "another"]
    assert list(open_prompts(str(src), max_prompts=1, cache_dir=tmp_path / "cache")) == ["a new prompt"]


def test_the_stream_draws_the_same_batches_from_the_table_as_from_the_list(tmp_path):
    src = _messy_parquet(tmp_path / "p.parquet", 3000)
    as_list, as_table = load_prompts(str(src)), open_prompts(str(src), cache_dir=tmp_path / "cache")
    for rank in (0, 1):
        a, b = (PromptStream(p, batch_size=7, seed=3, rank=rank, world_size=2) for p in (as_list, as_table))
        assert [a.next_batch() for _ in range(300)] == [b.next_batch() for _ in range(300)]  # past an epoch


def test_blank_only_parquet_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"prompt": ["", None, "  "]}), tmp_path / "e.parquet")
    with pytest.raises(ValueError, match="holds no prompts"):
        open_prompts(str(tmp_path / "e.parquet"), cache_dir=tmp_path / "cache")


def _mapped_pss(path: Path) -> int:
    """PSS of this process's mappings of `path` (from /proc/self/smaps): the memory charged for that file alone
    (whole-process PSS also moves when another process maps the same shared libraries)."""
    total, current = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
            current = len(head) >= 6 and head[5] == str(path)
        elif current and line.startswith("Pss:"):
            total += int(head[1]) * 1024
    return total


def _hold_table(path: str, ready, done) -> None:
    table = open_prompts(path, cache_dir=Path(path).parent / "cache")
    sum(len(p) for p in table)  # touch every page, as an epoch of training does
    ready.set()
    done.wait(60)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="PSS from /proc (Linux)")
def test_a_second_rank_halves_the_prompt_memory_each_rank_is_charged(tmp_path):
    # PSS charges each shared page 1/k to each of the k processes mapping it. One reader of the mapped table is
    # charged all of it; with a second reader (another rank) each is charged about half. A list of Python
    # strings (load_prompts) would be private to every rank, and charged whole to each.
    src = _messy_parquet(tmp_path / "p.parquet", 200_000)
    table = open_prompts(str(src), cache_dir=tmp_path / "cache")
    size = table.path.stat().st_size
    touched = sum(len(p) for p in table)
    alone = _mapped_pss(table.path)
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_table, args=(str(src), ready, done))
    other.start()
    try:
        assert ready.wait(120), "the second reader did not start"
        shared = _mapped_pss(table.path)
    finally:
        done.set()
        other.join(60)
    assert touched > 0 and 0.8 * size < alone < 1.3 * size, (alone, size)
    assert 0.35 * alone < shared < 0.65 * alone, (shared, alone)
