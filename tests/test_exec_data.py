"""`symi data prepare` and the data `symi train` reads: the tokenizer and token files (deterministic, exact round
trip, nanoGPT layout), bad input refused with nothing written, memory-mapped reading, the raw-bytes split, the
fixed validation batches, and the checks of --data, --eval-every and --eval-batches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import symi_exec.prepare
from cli import symi
from symi_exec.config import TrainConfig
from symi_exec.data import get_batch, load_data, load_tokens, val_batch
from symi_exec.prepare import END_OF_TEXT, prepare_data, read_meta, token_dtype
from tests.cli_checks import one_error_line

SAMPLE = Path(symi_exec.prepare.__file__).parent / "data" / "wikipedia_texts.txt"


def _sample_text(num_chars: int, offset: int = 0) -> str:
    return SAMPLE.read_text()[offset:offset + num_chars]


def _ids(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    meta = json.loads((folder / "meta.json").read_text())
    train, val = (np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"]) for split in ("train", "val"))
    return train, val, meta


def test_prepare_round_trips_the_text_exactly_and_is_deterministic(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, __version__

    rng = np.random.default_rng(0)
    for case in range(4):
        # several files (sample text of several languages, one with random code points), random sizes and fractions
        texts = [_sample_text(int(rng.integers(2_000, 20_000)), offset=int(rng.integers(0, 1_000_000)))
                 for _ in range(int(rng.integers(1, 4)))]
        if case == 3:
            texts.append("".join(chr(c) for c in rng.integers(32, 0x3000, size=3_000)))
        sources = []
        for i, text in enumerate(texts):
            sources.append(tmp_path / f"case{case}-{i}.txt")
            sources[-1].write_text(text)
        vocab_size, fraction = int(rng.integers(257, 1_500)), float(rng.uniform(0.05, 0.5))
        meta = prepare_data(sources=sources, vocab_size=vocab_size, out=tmp_path / f"a{case}", val_fraction=fraction)
        prepare_data(sources=sources, vocab_size=vocab_size, out=tmp_path / f"b{case}", val_fraction=fraction)
        for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json"):   # same input, same bytes
            assert (tmp_path / f"a{case}" / name).read_bytes() == (tmp_path / f"b{case}" / name).read_bytes(), name

        train, val, on_disk = _ids(tmp_path / f"a{case}")
        assert on_disk == meta and meta["dtype"] == "uint16" and meta["tokenizers_version"] == __version__
        ids = np.concatenate([train, val]).astype(np.int64)
        assert val.size == int(ids.size * fraction) and meta["train_tokens"] == train.size
        tokenizer = Tokenizer.from_file(str(tmp_path / f"a{case}" / "tokenizer.json"))
        assert meta["vocab_size"] == tokenizer.get_vocab_size() <= vocab_size and ids.max() < meta["vocab_size"]
        eot = tokenizer.token_to_id(END_OF_TEXT)
        # every file in order, each closed by the end-of-text token, decodes to its text exactly (byte level)
        ends = np.flatnonzero(ids == eot)
        assert ends.size == len(texts) and ends[-1] == ids.size - 1
        pieces = np.split(ids, ends + 1)[:-1]
        for text, piece in zip(texts, pieces, strict=True):
            assert tokenizer.decode(piece[:-1].tolist()) == text
            assert piece[:-1].tolist() == tokenizer.encode(text).ids   # one encoding of the whole text
        assert meta["sources"] == [{"name": p.name, "bytes": p.stat().st_size,
                                    "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in sources]


def test_token_files_widen_to_uint32_beyond_65535_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [token_dtype(v) for v in (257, 65_535, 65_536, 200_000)] == ["uint16", "uint16", "uint32", "uint32"]
    source = tmp_path / "t.txt"
    source.write_text(_sample_text(5_000))
    narrow = prepare_data(sources=[source], vocab_size=400, out=tmp_path / "narrow")
    monkeypatch.setattr(symi_exec.prepare, "UINT16_MAX_VOCAB", 300)   # a small vocabulary takes the wide path
    wide = prepare_data(sources=[source], vocab_size=400, out=tmp_path / "wide")
    assert (narrow["dtype"], wide["dtype"]) == ("uint16", "uint32")
    assert (tmp_path / "wide" / "train.bin").stat().st_size == 4 * wide["train_tokens"]
    for split in ("train", "val"):
        assert np.array_equal(np.fromfile(tmp_path / "narrow" / f"{split}.bin", dtype=np.uint16),
                              np.fromfile(tmp_path / "wide" / f"{split}.bin", dtype=np.uint32))


def test_data_prepare_cli_writes_the_folder_and_replaces_it_only_with_force(tmp_path: Path) -> None:
    source = tmp_path / "t.txt"
    source.write_text(_sample_text(8_000))
    out = tmp_path / "data"
    result = CliRunner().invoke(symi, ["data", "prepare", str(source), "--vocab-size", "300", "--out", str(out)])
    assert result.exit_code == 0, result.output
    train, val, meta = _ids(out)
    assert f"vocabulary {meta['vocab_size']}, {train.size} train and {val.size} validation tokens" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    line = one_error_line(tmp_path, "data", "prepare", source, "--vocab-size", "500", "--out", out)
    assert "already exists and is not empty; pass --force" in line
    assert _ids(out)[2] == meta
    result = CliRunner().invoke(symi, ["data", "prepare", str(source), "--vocab-size", "500", "--out", str(out),
                                       "--force"])
    assert result.exit_code == 0, result.output
    assert _ids(out)[2]["vocab_size"] == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "t.txt"]   # no temporary left behind


@pytest.mark.parametrize("make,args,message", [
    (None, ["missing.txt", "--vocab-size", "300"], "text file '{tmp}/missing.txt' does not exist"),
    ("   \n\t\n", ["t.txt", "--vocab-size", "300"], "text file '{tmp}/t.txt' holds no text"),
    (b"ok \xff\xfe", ["t.txt", "--vocab-size", "300"], "is not UTF-8 text (byte 3)"),
    ("some text", ["t.txt", "--vocab-size", "256"], "--vocab-size must be an integer of at least 257"),
    ("some text", ["t.txt", "--vocab-size", "300", "--val-fraction", "0"], "--val-fraction must be"),
    ("some text", ["t.txt", "--vocab-size", "300", "--val-fraction", "1"], "--val-fraction must be"),
    ("ab", ["t.txt", "--vocab-size", "300", "--val-fraction", "0.1"], "too few for a validation fraction of 0.1"),
    ("some text", ["t.txt", "t.txt/x", "--vocab-size", "300"], "'{tmp}/t.txt/x' does not exist"),
])
def test_data_prepare_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, make: str | bytes | None,
                                                               args: list[str], message: str) -> None:
    if isinstance(make, bytes):
        (tmp_path / "t.txt").write_bytes(make)
    elif make is not None:
        (tmp_path / "t.txt").write_text(make)
    args = [str(tmp_path / a) if a.endswith((".txt", "/x")) else a for a in args]
    line = one_error_line(tmp_path, "data", "prepare", *args, "--out", tmp_path / "out")
    assert message.format(tmp=tmp_path) in line


def test_training_data_are_memory_maps_and_raw_bytes_keep_their_last_tenth_for_validation(tmp_path: Path) -> None:
    source = tmp_path / "t.txt"
    source.write_text(_sample_text(6_000))
    prepare_data(sources=[source], vocab_size=320, out=tmp_path / "data")
    data = load_data(tmp_path / "data")
    train, val, meta = _ids(tmp_path / "data")
    assert isinstance(data.train, np.memmap) and isinstance(data.val, np.memmap)
    assert np.array_equal(data.train, train) and np.array_equal(data.val, val) and data.vocab_size == meta["vocab_size"]

    for num_bytes in (100, 101, 109, 110, 1_000, 1_234):
        raw = np.random.default_rng(num_bytes).integers(0, 256, size=num_bytes, dtype=np.uint8)
        raw.tofile(tmp_path / "raw.bin")
        data = load_data(tmp_path / "raw.bin")
        num_val = num_bytes // 10   # the last 10% (rounded down) validates
        assert isinstance(data.train, np.memmap) and data.vocab_size == 256
        assert np.array_equal(data.train, raw[:num_bytes - num_val])
        assert np.array_equal(data.val, raw[num_bytes - num_val:])
        assert np.array_equal(load_tokens(tmp_path / "raw.bin"), raw[:num_bytes - num_val])


def test_validation_batches_are_fixed_split_by_rank_and_apart_from_the_training_stream() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)
    kwargs = {"batch_size": 3, "seq_len": 16, "seed": 7}
    for index in range(3):
        x_full, y_full = val_batch(tokens, index, rank=0, world_size=1, **{**kwargs, "batch_size": 12})
        # any number of ranks sees the same global batch, each rank its rows
        for world in (2, 4):
            size = 12 // world
            rows = [val_batch(tokens, index, rank=r, world_size=world, **{**kwargs, "batch_size": size})
                    for r in range(world)]
            assert np.array_equal(np.concatenate([x for x, _ in rows]), x_full)
            assert np.array_equal(np.concatenate([y for _, y in rows]), y_full)
        assert np.array_equal(y_full[:, :-1], x_full[:, 1:]) and np.array_equal(y_full[:, -1], x_full[:, -1] + 1)
        x_again, _ = val_batch(tokens, index, rank=0, world_size=1, **{**kwargs, "batch_size": 12})
        assert np.array_equal(x_again, x_full)
        x_train, _ = get_batch(tokens, index, rank=0, world_size=1, **{**kwargs, "batch_size": 12})
        assert not np.array_equal(x_train[:, 0], x_full[:, 0])
    assert not np.array_equal(val_batch(tokens, 0, rank=0, world_size=1, **kwargs)[0],
                              val_batch(tokens, 1, rank=0, world_size=1, **kwargs)[0])


def _fake_folder(folder: Path, *, vocab_size: int, num_train: int, num_val: int) -> Path:
    folder.mkdir()
    dtype = token_dtype(vocab_size)
    rng = np.random.default_rng(vocab_size)
    rng.integers(0, vocab_size, size=num_train).astype(dtype).tofile(folder / "train.bin")
    rng.integers(0, vocab_size, size=num_val).astype(dtype).tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "dtype": dtype, "train_tokens": num_train,
                                                  "val_tokens": num_val}))
    return folder


def test_train_config_reads_the_vocabulary_and_checks_the_data(tmp_path: Path) -> None:
    folder = _fake_folder(tmp_path / "d", vocab_size=70_000, num_train=200, num_val=66)
    config = TrainConfig(out=str(tmp_path / "run"), data=str(folder))
    assert config.model_config().vocab_size == 70_000 and load_data(folder).val.dtype == np.uint32
    assert int(load_data(folder).train.max()) >= 65_536   # ids beyond uint16 survive the round trip
    config.validate(2)
    assert TrainConfig(out=str(tmp_path / "run")).model_config().vocab_size == 256   # raw bytes
    dataclasses.replace(config, eval_every=5).validate(2)   # 66 validation tokens: just one tiny sequence (64 + 2)

    def refused(message: str, **changes: object) -> None:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(config, **changes).validate(2)

    short = _fake_folder(tmp_path / "short", vocab_size=300, num_train=100, num_val=65)
    refused(r"holds 65 validation tokens, fewer than a sequence needs \(66\) for --eval-every", data=str(short),
            eval_every=1)
    dataclasses.replace(config, data=str(short)).validate(2)   # no evaluation: no validation sequence needed
    refused(r"holds 100 training tokens, fewer than a sequence needs \(130\)", data=str(short),
            model_overrides={"seq_len": 128})
    raw = tmp_path / "raw.txt"
    raw.write_bytes(b"x" * 650)   # 585 training bytes, 65 validation bytes
    refused(r"holds 65 validation bytes, fewer than a sequence needs \(66\)", data=str(raw), eval_every=3)
    refused("eval_every must be", eval_every=-1)
    refused("eval_batches must be", eval_batches=0)
    (tmp_path / "empty").mkdir()
    refused(r"lacks meta.json, train.bin, val.bin \(make one with symi data prepare\)", data=str(tmp_path / "empty"))
    (folder / "val.bin").write_bytes(b"\0" * 6)
    refused(r"val.bin holds 6 bytes, not the 66 uint32 tokens meta.json says")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 70_000, "dtype": "uint16"}))
    refused(r"dtype 'uint16' does not match a vocabulary of 70000 \(expected 'uint32'\)")
    (folder / "meta.json").write_text("{")
    refused("meta.json is not a `symi data prepare` meta file")
    assert read_meta(short)["val_tokens"] == 65
