"""`symi data prepare`: a byte-level BPE tokenizer trained offline on text files, and the token files it makes.

A prepared data folder (the nanoGPT convention):
  tokenizer.json   the tokenizer (Hugging Face `tokenizers`), for decoding samples or encoding more text
  train.bin        flat token ids, uint16 (uint32 when the vocabulary exceeds 65,535 ids), no header
  val.bin          the same, the last `val_fraction` of the tokens
  meta.json        vocab_size, dtype, token counts, the sources (name, bytes, sha256), the tokenizers version

The sources are concatenated in the order given, each followed by the end-of-text token. Same sources, vocabulary
size and fraction: the same files, byte for byte. Free of torch (symi_exec.config reads meta.json without it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from symi_sim.checks import check_number
from symi_sim.outputs import atomic_dir

logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
BYTE_ALPHABET = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET + 1          # every byte, plus the end-of-text token
UINT16_MAX_VOCAB = 65_535                   # larger vocabularies store their ids as uint32
CHUNK_CHARS = 1 << 20                       # text is encoded in pieces of about this many characters (line ends)
FILES = ("tokenizer.json", "train.bin", "val.bin", "meta.json")


def token_dtype(vocab_size: int) -> str:
    """The numpy dtype name of the token files for a vocabulary of `vocab_size` ids."""
    return "uint16" if vocab_size <= UINT16_MAX_VOCAB else "uint32"


def prepare_data(*, sources: Sequence[str | Path], vocab_size: int, out: str | Path, val_fraction: float = 0.1,
                 force: bool = False) -> dict[str, Any]:
    """Train the tokenizer on `sources`, write the data folder `out` (see the module doc), return its meta.json.

    ValueError naming the problem (and nothing written) for a missing or empty source, text that is not UTF-8, a
    vocabulary smaller than MIN_VOCAB_SIZE, a fraction outside (0, 1), too little text for both splits, or an
    existing non-empty `out` without `force`.
    """
    from tokenizers import __version__ as tokenizers_version

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"--vocab-size must be an integer of at least {MIN_VOCAB_SIZE} (the {BYTE_ALPHABET} byte "
                         f"tokens and {END_OF_TEXT}), got {vocab_size!r}")
    check_number(val_fraction, "--val-fraction", low=0, high=1, low_open=True, high_open=True)
    if not sources:
        raise ValueError("no text file given")
    raws = [_read_source(Path(source)) for source in sources]
    texts = [raw.decode("utf-8") for raw in raws]
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        state = "is a file" if not out.is_dir() else "already exists and is not empty; pass --force to replace it"
        raise ValueError(f"--out {str(out)!r} {state}")

    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    eot = tokenizer.token_to_id(END_OF_TEXT)
    ids = np.concatenate([np.append(_encode(tokenizer, text), eot) for text in texts])
    num_val = int(ids.size * val_fraction)
    if num_val < 1 or ids.size - num_val < 1:
        raise ValueError(f"the text makes {ids.size} tokens: too few for a validation fraction of {val_fraction:g} "
                         f"(both splits need tokens)")
    actual_vocab = tokenizer.get_vocab_size()
    if actual_vocab < vocab_size:
        logger.warning("the text has only enough merges for %d tokens (asked for %d)", actual_vocab, vocab_size)
    dtype = token_dtype(actual_vocab)
    meta = {"vocab_size": actual_vocab, "requested_vocab_size": vocab_size, "dtype": dtype,
            "train_tokens": int(ids.size - num_val), "val_tokens": num_val, "val_fraction": val_fraction,
            "end_of_text": END_OF_TEXT, "end_of_text_id": eot, "tokenizer": "byte-level BPE",
            "tokenizers_version": tokenizers_version,
            "sources": [{"name": Path(source).name, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
                        for source, raw in zip(sources, raws, strict=True)]}
    with atomic_dir(out, replace=force) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        ids[:ids.size - num_val].astype(dtype).tofile(tmp / "train.bin")
        ids[ids.size - num_val:].astype(dtype).tofile(tmp / "val.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("wrote %s: %d train and %d validation tokens, vocabulary %d", out, meta["train_tokens"], num_val,
                actual_vocab)
    return meta


def train_tokenizer(texts: Sequence[str], *, vocab_size: int) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` of at most `vocab_size` ids trained on `texts` (GPT-2's scheme: every
    byte is a token, so any text encodes; END_OF_TEXT is a special token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((chunk for text in texts for chunk in _chunks(text)), trainer=trainer)
    return tokenizer


def _encode(tokenizer: Any, text: str) -> np.ndarray:
    """Token ids of `text` (int64), encoded in pieces cut at line ends so that memory stays bounded."""
    pieces = [np.asarray(encoding.ids, dtype=np.int64) for encoding in tokenizer.encode_batch(list(_chunks(text)))]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _chunks(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = text.find("\n", start + CHUNK_CHARS)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _read_source(path: Path) -> bytes:
    """The bytes of a text file; ValueError unless it exists and holds UTF-8 text beyond white space."""
    if not path.is_file():
        raise ValueError(f"text file {str(path)!r} does not exist" if not path.exists()
                         else f"text file {str(path)!r} is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {str(path)!r} is not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} holds no text")
    return raw


def read_meta(folder: str | Path) -> dict[str, Any]:
    """meta.json of a prepared data folder, checked against the token files; ValueError naming what is wrong."""
    folder = Path(folder)
    missing = [name for name in ("meta.json", "train.bin", "val.bin") if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"data folder {str(folder)!r} lacks {', '.join(missing)} (make one with symi data prepare)")
    try:
        meta = json.loads((folder / "meta.json").read_text())
        vocab_size, dtype = meta["vocab_size"], meta["dtype"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"data folder {str(folder)!r}: meta.json is not a `symi data prepare` meta file "
                         f"({exc})") from None
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"data folder {str(folder)!r}: meta.json's vocab_size must be a positive integer, got "
                         f"{vocab_size!r}")
    if dtype != token_dtype(vocab_size):
        raise ValueError(f"data folder {str(folder)!r}: meta.json's dtype {dtype!r} does not match a vocabulary of "
                         f"{vocab_size} (expected {token_dtype(vocab_size)!r})")
    itemsize = np.dtype(dtype).itemsize
    for split in ("train", "val"):
        size = (folder / f"{split}.bin").stat().st_size
        if size % itemsize or (f"{split}_tokens" in meta and size != meta[f"{split}_tokens"] * itemsize):
            raise ValueError(f"data folder {str(folder)!r}: {split}.bin holds {size} bytes, not the "
                             f"{meta.get(f'{split}_tokens', '?')} {dtype} tokens meta.json says")
        meta[f"{split}_tokens"] = size // itemsize
    return meta
