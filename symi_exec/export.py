"""The run's single-device checkpoint.pt, written a few experts at a time: rank 0 never holds every expert.

Legend: L MoE layers, E experts, D d_model, F d_ff, P = 2 D F parameters of one expert (w_in then w_out, flat).

torch.save needs every tensor of the state dict at once, which would make rank 0 hold all L E P expert weights (and
a second copy while reshaping them into the state dict). Instead the file is written in the two passes torch
offers for that (torch.serialization.skip_data, the GPUDirect Storage tutorial's recipe):
  1. the skeleton: torch.save of the final dict under skip_data(materialize_fake_tensors=True), every tensor a
     FakeTensor of its final shape and dtype (no memory): the pickle and every zip record, each storage record's
     space reserved, its bytes not written;
  2. the record offsets: torch.load of the skeleton under FakeTensorMode (each storage's _checkpoint_offset);
  3. the bytes: the dense tensors, then the experts as rank 0 receives them (ExpertOptimizer.export_chunks: a
     slot's worth of experts at a time), expert by expert (os.pwrite at the record's offset), and each record's
     CRC-32 (in its zip data descriptor and central-directory entry, which the skeleton leaves at 0) so that every
     member checks (zipfile.testzip).
The result is an ordinary torch.save file: torch.load (weights_only=True too) returns plain tensors, bit for bit
those of the state dict built whole (outputs.single_device_state_dict). It is written under a temporary name and
renamed at the end: a failed export leaves no checkpoint.pt.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from symi_exec.model import ModelConfig

DESCRIPTOR_FLAG = 0x8         # a zip member's general-purpose flag: a data descriptor follows its bytes
DESCRIPTOR_SIG = 0x08074B50   # a zip data descriptor's optional signature
CENTRAL_SIG = 0x02014B50      # a central-directory entry's signature
CENTRAL_FIXED = 46            # a central-directory entry's fixed part; its CRC-32 at +16, name/extra/comment at +28


def expert_names(layer: int) -> tuple[str, str]:
    """The single-device state dict's names of `layer`'s expert weights: w_in [E, D, F], w_out [E, F, D]."""
    return f"blocks.{layer}.moe.experts.w_in_EDF", f"blocks.{layer}.moe.experts.w_out_EFD"


@dataclass
class _Record:
    """One tensor's storage record: where its bytes go in the file and their CRC-32 so far."""

    offset: int
    nbytes: int
    name: str
    written: int = 0
    crc: int = 0


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, in its memory order (torch.save's: native byte order)."""
    return memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def save_streamed(path: Path, *, dense: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype,
                  chunks: Iterable[tuple[int, torch.Tensor]], extra: dict[str, Any]) -> None:
    """Write torch.save({"model": state, **extra}) to `path`, where state is `dense` (name -> tensor, in order) then,
    per layer l, expert_names(l) ([E, D, F] and [E, F, D] in `dtype`) from `chunks`: (layer, chunk_nP), the [n, P]
    weights of the layer's next n experts (any device), layer by layer, experts ascending, consumed one at a time
    (it may be a collective generator). The whole file or nothing."""
    expert_shapes = [(cfg.num_experts, cfg.d_model, cfg.d_ff), (cfg.num_experts, cfg.d_ff, cfg.d_model)]
    with FakeTensorMode():
        fake = {name: torch.empty(tuple(t.shape), dtype=t.dtype) for name, t in dense.items()}
        for layer in range(cfg.num_layers):
            for name, shape in zip(expert_names(layer), expert_shapes, strict=True):
                fake[name] = torch.empty(shape, dtype=dtype)
    tmp = path.with_name(path.name + ".tmp")
    try:
        _write_file(tmp, fake, dense=dense, cfg=cfg, dtype=dtype, chunks=chunks, extra=extra)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _write_file(tmp: Path, fake: dict[str, torch.Tensor], *, dense: dict[str, torch.Tensor], cfg: ModelConfig,
                dtype: torch.dtype, chunks: Iterable[tuple[int, torch.Tensor]], extra: dict[str, Any]) -> None:
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save({"model": fake, **extra}, tmp)
    records = _records(tmp)
    num_dff = cfg.d_model * cfg.d_ff
    with open(tmp, "r+b") as f:
        fd = f.fileno()
        for name, tensor in dense.items():
            _write(fd, records[name], _raw(tensor.cpu()))
        at_layer, at_expert = 0, 0   # the next expert to write
        for layer, chunk_nP in chunks:
            num = chunk_nP.shape[0] if chunk_nP.dim() == 2 else 0
            if (layer != at_layer or at_layer >= cfg.num_layers or chunk_nP.dim() != 2 or num < 1 or chunk_nP.dtype
                    != dtype or at_expert + num > cfg.num_experts or chunk_nP.shape[1] != 2 * num_dff):
                raise ValueError(f"export: a chunk {tuple(chunk_nP.shape)} {chunk_nP.dtype} of layer {layer}, expected "
                                 f"up to {cfg.num_experts - at_expert} experts x {2 * num_dff} {dtype} of layer "
                                 f"{at_layer} (of {cfg.num_layers})")
            chunk_nP = chunk_nP.detach().cpu()
            w_in, w_out = (records[name] for name in expert_names(layer))
            item = chunk_nP.element_size()
            for expert in range(num):   # w_in_EDF is the experts' first D F values, one after another
                row = _raw(chunk_nP[expert])
                _write(fd, w_in, row[:num_dff * item])
                _write(fd, w_out, row[num_dff * item:])
            del chunk_nP, row
            at_expert += num
            if at_expert == cfg.num_experts:
                at_layer, at_expert = at_layer + 1, 0
        if at_layer != cfg.num_layers:
            raise ValueError(f"export: {at_layer} complete layers of {cfg.num_layers}")
        _write_crcs(f, records.values())


def _records(path: Path) -> dict[str, _Record]:
    """Each state-dict tensor's storage record in the skeleton at `path`: its data offset (torch.load under
    FakeTensorMode reads no bytes and gives each storage's offset in the file) and zip member name."""
    with FakeTensorMode():
        skeleton = torch.load(path, weights_only=True)["model"]
    with zipfile.ZipFile(path) as zf:
        by_offset = {_data_offset(path, info): info.filename for info in zf.infolist()}
    records: dict[str, _Record] = {}
    for name, tensor in skeleton.items():
        offset = tensor.untyped_storage()._checkpoint_offset
        nbytes = tensor.numel() * tensor.element_size()
        if offset not in by_offset or tensor.storage_offset() != 0 or not tensor.is_contiguous():
            raise RuntimeError(f"checkpoint skeleton: no storage record of its own for {name!r}")
        records[name] = _Record(offset, nbytes, by_offset[offset])
    if len({r.name for r in records.values()}) != len(records):
        raise RuntimeError("checkpoint skeleton: tensors share a storage record")
    return records


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


def _write(fd: int, record: _Record, data: memoryview) -> None:
    """Append `data` to `record`'s bytes (in order), updating its CRC-32."""
    if record.written + len(data) > record.nbytes:
        raise RuntimeError(f"{record.name}: {record.written + len(data)} bytes for a record of {record.nbytes}")
    done = 0
    while done < len(data):   # one pwrite moves at most ~2 GiB
        done += os.pwrite(fd, data[done:], record.offset + record.written + done)
    record.crc = zlib.crc32(data, record.crc)
    record.written += len(data)


def _write_crcs(f: Any, records: Iterable[_Record]) -> None:
    """Each record's CRC-32 into its data descriptor (after its bytes: torch's writer sets the data-descriptor
    flag, and the local header's CRC stays 0) or else its local header, and into its central-directory entry."""
    f.flush()
    path = f.name
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        start_dir = zf.start_dir
    flags = {info.filename: info.flag_bits for info in infos}
    crcs = {}
    for record in records:
        if record.written != record.nbytes:
            raise RuntimeError(f"{record.name}: {record.written} of {record.nbytes} bytes written")
        crcs[record.name] = record.crc
        if flags[record.name] & DESCRIPTOR_FLAG:
            f.seek(record.offset + record.nbytes)
            (sig,) = struct.unpack("<I", f.read(4))
            f.seek(record.offset + record.nbytes + (4 if sig == DESCRIPTOR_SIG else 0))
        else:   # no data descriptor: the CRC-32 is in the local header
            f.seek(next(i.header_offset for i in infos if i.filename == record.name) + 14)
        f.write(struct.pack("<I", record.crc))
    f.seek(start_dir)
    for info in infos:   # the central directory lists the members in infolist's order
        entry = f.tell()
        fixed = f.read(CENTRAL_FIXED)
        sig, name_len, extra_len, comment_len = struct.unpack("<I24xHHH12x", fixed)
        if sig != CENTRAL_SIG:
            raise RuntimeError(f"{path}: no central-directory entry for {info.filename} at {entry}")
        if info.filename in crcs:
            f.seek(entry + 16)
            f.write(struct.pack("<I", crcs[info.filename]))
        f.seek(entry + CENTRAL_FIXED + name_len + extra_len + comment_len)
    f.flush()
