import json

import pytest

from textcraftor_fast.data import PromptStream, load_prompts


def test_txt_drops_blanks_and_duplicates(tmp_path, caplog):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  \na dog\na cat\n b \n")
    with caplog.at_level("INFO"):
        assert load_prompts(str(f)) == ["a cat", "a dog", "b"]
    assert "2 blank dropped, 1 duplicates dropped, 3 used" in caplog.text


def test_jsonl_csv_parquet(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    assert load_prompts(str(j), field="text") == ["x", "y"]
    with pytest.raises(ValueError, match="no field 'prompt'"):
        load_prompts(str(j))
    c = tmp_path / "p.csv"
    c.write_text("id,Prompt\n1,hello\n2,world\n")
    assert load_prompts(str(c)) == ["hello", "world"]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt": ["p", "q", "p"]}), tmp_path / "p.parquet")
    assert load_prompts(str(tmp_path / "p.parquet")) == ["p", "q"]


def test_builtin_parti():
    prompts = load_prompts("builtin:parti")
    assert len(prompts) > 1500


def test_empty_and_missing_sources_are_clear(tmp_path):
    f = tmp_path / "e.txt"
    f.write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(str(f))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(IsADirectoryError, match="is a folder; data.path must be one .txt/.jsonl/.csv/.parquet file"):
        load_prompts(str(tmp_path))
    with pytest.raises(ValueError, match="unsupported extension"):
        (tmp_path / "p.xml").write_text("x")
        load_prompts(str(tmp_path / "p.xml"))


def test_stream_is_deterministic_sharded_and_resumable():
    prompts = [f"p{i}" for i in range(10)]
    a = PromptStream(prompts, 3, seed=1)
    b = PromptStream(prompts, 3, seed=1)
    assert [a.next_batch() for _ in range(5)] == [b.next_batch() for _ in range(5)]
    # resume mid-epoch from the cursor
    c = PromptStream(prompts, 3, seed=1)
    c.next_batch(); c.next_batch()
    d = PromptStream(prompts, 3, seed=1)
    d.load_state_dict(c.state_dict())
    assert [c.next_batch() for _ in range(4)] == [d.next_batch() for _ in range(4)]
    # ranks see disjoint prompts within an epoch
    r0 = PromptStream(prompts, 5, seed=2, rank=0, world_size=2).next_batch()
    r1 = PromptStream(prompts, 5, seed=2, rank=1, world_size=2).next_batch()
    assert set(r0).isdisjoint(r1) and set(r0) | set(r1) == set(prompts)
