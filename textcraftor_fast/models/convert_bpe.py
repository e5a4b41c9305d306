"""Convert OpenAI's CLIP BPE file (``bpe_simple_vocab_16e6.txt.gz``, MIT) into a transformers tokenizer folder.

Why: SD1.5's tokenizer is OpenAI's CLIP BPE; the hub is unreachable here, but the BPE file ships in the
open_clip_torch and clip-anytorch wheels. This reproduces the vocab.json/merges.txt that
``openai/clip-vit-large-patch14`` (and SD1.5's ``tokenizer/`` folder) publish, following OpenAI's
``simple_tokenizer.py``: 256 byte symbols, the same with ``</w>``, one token per merge (the first
48894 merges), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

    python -m textcraftor_fast.models.convert_bpe SOURCE [--out FOLDER]

SOURCE is the ``.txt.gz`` file or a wheel/zip that contains it (e.g. ``open_clip_torch-*.whl``).
The output folder defaults to the shipped ``textcraftor_fast/models/sd15/tokenizer``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_OUT = Path(__file__).parent / "sd15" / "tokenizer"

TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": MODEL_MAX_LENGTH,
    "bos_token": BOS,
    "eos_token": EOS,
    "unk_token": EOS,
    # SD1.5 pads with <|endoftext|> (49407); open_clip pads with 0. The UNet was trained on the former.
    "pad_token": EOS,
    "do_lower_case": True,
    "add_prefix_space": False,
    "errors": "replace",
    "clean_up_tokenization_spaces": True,
}
SPECIAL_TOKENS_MAP = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI/GPT-2's reversible byte -> printable unicode table (same order as simple_tokenizer.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def read_bpe_lines(source: str | Path) -> list[str]:
    """Read the gzipped BPE text from the .gz file itself or from inside a wheel/zip."""
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"BPE source '{source}' does not exist (expected {BPE_NAME} or a wheel holding it)")
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            names = [n for n in zf.namelist() if n.endswith(BPE_NAME)]
            if not names:
                raise ValueError(f"'{source}' is a zip without {BPE_NAME}")
            data = gzip.decompress(zf.read(names[0]))
    else:
        data = gzip.decompress(source.read_bytes())
    return data.decode("utf-8").split("\n")


def build_vocab_and_merges(lines: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    # Line 0 is a version header; OpenAI keeps exactly the merges that fill the 49408-token vocabulary.
    n_merges = VOCAB_SIZE - 2 * 256 - 2  # 48894: OpenAI's slice lines[1:49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise ValueError(f"BPE file gave {len(tokens)} tokens ({len(set(tokens))} unique), expected {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def write_tokenizer_folder(source: str | Path, out: str | Path = DEFAULT_OUT) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges(read_bpe_lines(source))
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
    logger.info("Wrote CLIP tokenizer (%d tokens, %d merges) to %s", len(vocab), len(merges), out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help=f"{BPE_NAME} or a wheel/zip containing it")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output tokenizer folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_tokenizer_folder(args.source, args.out)


if __name__ == "__main__":
    main()
