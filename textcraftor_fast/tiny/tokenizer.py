"""A real transformers `CLIPTokenizer` for the tiny world, built from a word-level BPE of its vocabulary.

The files (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) have the same format
as SD1.5's tokenizer folder, so the same loading code reads both. Every caption word is one token; other
text falls back to single letters (CLIP BPE's normal behaviour), so arbitrary prompts still tokenize.
Like SD1.5, sequences are padded with the end-of-text token to `model_max_length`.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from .data import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # "a small red circle on black" is 6 words + BOS/EOS


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Reference BPE (as CLIP applies it): merge the lowest-ranked adjacent pair until none applies."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style BPE tables: letters (with and without the '</w>' word-end marker), merges that turn every
    caption word into one token, then the two special tokens (CLIP puts them last too).

    Merges are added word by word: BPE is run with the merges so far and the leftover pieces are joined
    left to right by new (lower-priority) merges, so earlier words' merges can never split a later word.
    """
    tokens: list[str] = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = _bpe(word, {m: r for r, m in enumerate(merges)})
        left = pieces[0]
        for right in pieces[1:]:
            merges.append((left, right))
            left = left + right
            tokens.append(left)
    for word in words:
        assert _bpe(word, {m: r for r, m in enumerate(merges)}) == [word + "</w>"], word
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def save_tokenizer(folder: str | Path) -> Path:
    """Write the tokenizer files into `folder` (created) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(vocabulary())
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return folder


def build_tokenizer():
    """An in-memory CLIPTokenizer with the tiny vocabulary (transformers 5: pass dict/list, not file paths)."""
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab_and_merges(vocabulary())
    tok = CLIPTokenizer(vocab=vocab, merges=merges, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    tok.model_max_length = MAX_LENGTH
    return tok


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
