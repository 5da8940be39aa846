"""Checkpoints of a `symi train` job: atomic, one directory per step, every rank its own shard.

Legend: L MoE layers, E experts, P parameters of one expert (flat), p a rank's shard of P, G ranks.

Layout of a checkpoint root (`--checkpoint-dir`):
  step-00000010/              the state after 10 steps (the next step to run is 10)
    rank-00000.pt ...         one file per rank (torch.save), each written to a temporary name, then renamed:
                                step, world size, RNG states (python, numpy, torch), the expert optimizer state
                                (SYMI layout: this rank's 1/G shard of every expert - master weights and both
                                AdamW moments; DeepSpeed's group layout: this rank's 1/r shard of every expert it
                                holds, with its bounds; FlexMoE layout: the full weights and moments of the
                                experts whose lowest holder this rank is: every element is stored exactly once);
                                rank 0 also: dense parameters, dense AdamW state, the placement of the next step,
                                the last step's loads
    metrics.csv ...           copies of the run directory's streamed files (outputs.History) as they were at
                                this step: the whole run's metrics rows, placements and (--record-trace) trace
                                counts so far, whatever the step count (rank 0's file does not grow with it)
    meta.json                 human-readable summary (rank 0): also the run id, the run's settings (run_identity.py)
                                and the sha256 of every rank file
    COMPLETE                  written last, by rank 0, after every rank's file is in place: the step and the sha256
                                of meta.json
  sparse-00000011/            with sparse snapshots (snapshots.py): the hot experts after step 11, the same way
  run.json                    the identity of the run that writes here (run_identity.py)
A directory without COMPLETE is ignored (the job died while writing it); a complete one whose files do not match
their checksums is damaged (`damage`), and a resume falls back to the newest intact one (`latest_intact`).
The data position and the learning rate are functions of the step (get_batch draws step `s`'s batch from
(seed, s); lr_at(s)), so the step is the whole of both.

Loading reads only what a rank needs (ExpertStateReader): the rank files are opened memory-mapped
(torch.load(mmap=True)) as they are needed, this rank's own first, and each rank copies out only the slices of the
saved pieces that overlap its own part under the new world size and placement, so a job can resume on fewer (or
more) ranks without any rank assembling every expert's state. Same layout, world size and placement: a rank opens
its own file (and rank 0's, for the dense state) and nothing else. SYMI's layout never opens a file whose shard does
not overlap (its bounds follow from the world size). assemble_expert_state, which builds every expert's full state,
is kept for tests and tools.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from symi_exec.optim import shard_bounds

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_NAMES = ("weights", "exp_avg", "exp_avg_sq")   # an expert's optimizer state, per element of its P
STEP_PREFIX = "step-"
RUN_FILE = "run.json"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}{step:08d}"


def rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank:05d}.pt"


def checkpoint_dirs(root: str | Path, prefix: str = STEP_PREFIX) -> dict[int, Path]:
    """Step -> directory `<prefix>NNNNNNNN` under `root` (complete or not); ValueError naming an entry that starts
    with `prefix` but is no such directory (a stray `step-abc/` is refused, not guessed at)."""
    root = Path(root)
    found: dict[int, Path] = {}
    if not root.is_dir():
        return found
    for entry in root.iterdir():
        if not entry.name.startswith(prefix):
            continue
        digits = entry.name.removeprefix(prefix)
        if not (entry.is_dir() and len(digits) == 8 and digits.isascii() and digits.isdigit()):
            raise ValueError(f"checkpoint dir {str(root)!r} holds {entry.name!r}, which is not a checkpoint "
                             f"({prefix}NNNNNNNN folder): move it out of the checkpoint dir")
        found[int(digits)] = entry
    return found


def latest_complete(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `root` (None: none)."""
    done = {step: d for step, d in checkpoint_dirs(root).items() if (d / MARKER).is_file()}
    return done[max(done)] if done else None


def latest_intact(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under `root` whose files match their checksums (None: none), and the newer
    complete ones that do not, each with what is wrong."""
    damaged: list[tuple[Path, str]] = []
    done = {step: d for step, d in checkpoint_dirs(root).items() if (d / MARKER).is_file()}
    for step in sorted(done, reverse=True):
        reason = damage(done[step])
        if reason is None:
            return done[step], damaged
        damaged.append((done[step], reason))
    return None, damaged


def keep_latest(root: str | Path, num_keep: int, run_id: str | None = None) -> list[Path]:
    """Remove all but the `num_keep` newest complete checkpoints under `root` (and any incomplete one older than
    the oldest kept); returns the removed directories. With `run_id`, only checkpoints whose meta.json names that
    run count and go: another run's are never touched."""
    steps = sorted(checkpoint_dirs(root).items())
    complete = [step for step, d in steps if (d / MARKER).is_file()]
    if run_id is not None:
        complete = [step for step in complete if _run_id_of(dict(steps)[step]) == run_id]
    if len(complete) <= num_keep:
        return []
    oldest_kept = complete[-num_keep]
    removed = [d for step, d in steps if step < oldest_kept and
               (run_id is None or not (d / MARKER).is_file() or step in complete)]
    for directory in removed:
        shutil.rmtree(directory)
    return removed


def _run_id_of(directory: Path) -> str | None:
    try:
        return read_meta(directory).get("run_id")
    except ValueError:
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def damage(directory: Path) -> str | None:
    """What is wrong with the complete checkpoint or snapshot `directory` (a file missing, unreadable or not
    matching its checksum), None when every file matches: COMPLETE holds meta.json's sha256, meta.json every rank
    file's."""
    try:
        marker = (directory / MARKER).read_text().split()
        meta_bytes = (directory / "meta.json").read_bytes()
    except OSError as exc:
        return f"cannot read {exc.filename}: {exc.strerror}"
    if len(marker) < 2:
        return f"{directory / MARKER} holds no checksum (written by an older symi)"
    if hashlib.sha256(meta_bytes).hexdigest() != marker[1]:
        return f"{directory / 'meta.json'} does not match its checksum"
    try:
        files = read_meta(directory).get("files")
    except ValueError as exc:
        return str(exc)
    if not isinstance(files, dict) or not files:
        return f"{directory / 'meta.json'} lists no checksums"
    for name, want in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != want:
            return f"{path} does not match its checksum"
    return None


def _write_atomic(path: Path, write: Any) -> None:
    """write(tmp_path), fsync, then rename onto `path` (a reader never sees a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic_text(path: Path, text: str) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(text))


def prepare_dir(directory: Path) -> Path:
    """Rank 0, before the others write: an empty checkpoint directory (a stale incomplete one is removed)."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def save_rank(directory: Path, rank: int, state: dict[str, Any]) -> tuple[int, str]:
    """This rank's file; returns its size in bytes and its sha256."""
    path = rank_file(directory, rank)
    _write_atomic(path, lambda tmp: torch.save(state, tmp))
    return path.stat().st_size, sha256_file(path)


def mark_complete(directory: Path, meta: dict[str, Any]) -> None:
    """Rank 0, after every rank's file is in place: meta.json (with the rank files' checksums in meta["files"]),
    then the completion marker holding the step and meta.json's checksum."""
    text = json.dumps(meta, indent=1) + "\n"
    write_atomic_text(directory / "meta.json", text)
    write_atomic_text(directory / MARKER, f"{meta['step']}\n{hashlib.sha256(text.encode()).hexdigest()}\n")


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON object; ValueError naming the file when it is unreadable or not a JSON object."""
    try:
        value = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object")
    return value


def read_meta(directory: Path) -> dict[str, Any]:
    return read_json(Path(directory) / "meta.json")


def load_rank(directory: Path, rank: int, *, mmap: bool = False) -> dict[str, Any]:
    """One rank's file; mmap: its tensors stay in the file until read (only the pages touched are loaded)."""
    # our own files: they hold numpy RNG states and tuples, which weights_only loading refuses
    return torch.load(rank_file(directory, rank), map_location="cpu", weights_only=False, mmap=mmap)


Key = tuple[int, int]   # (layer, expert)
Piece = tuple[int, int, dict[str, torch.Tensor]]   # [start, stop) of an expert's P and its state there ([stop-start])


class RankFiles:
    """The rank files of one checkpoint or snapshot directory, each loaded memory-mapped on first use."""

    def __init__(self, directory: Path, world_size: int) -> None:
        self.directory, self.world_size = Path(directory), world_size
        self._loaded: dict[int, dict[str, Any]] = {}

    def get(self, rank: int) -> dict[str, Any]:
        if rank not in self._loaded:
            self._loaded[rank] = load_rank(self.directory, rank, mmap=True)
        return self._loaded[rank]

    @property
    def opened(self) -> list[int]:
        """The ranks whose files were opened so far (in order)."""
        return sorted(self._loaded)


def saved_pieces(part: dict[str, Any], key: Key, *, shard: tuple[int, int] | None = None) -> list[Piece]:
    """The pieces of expert `key` in one rank's part of a checkpoint ("expert_optimizer") or sparse snapshot
    ("hot_experts"), in any layout: SYMI's (the rank's `shard` [start, stop) of every expert; a snapshot: of its
    "keys"), the group layout's (shards with their "bounds") or FlexMoE's (whole experts)."""
    if part["layout"] == "sharded":
        assert shard is not None, "SYMI's layout: pass the rank's shard bounds"
        layer, expert = key
        if "keys" in part:   # a sparse snapshot: [K, p] stacked in the order of its keys
            if "_index" not in part:   # built once per loaded part
                part["_index"] = {tuple(k): i for i, k in enumerate(part["keys"])}
            if key not in part["_index"]:
                return []
            return [(*shard, {name: part[name][part["_index"][key]] for name in STATE_NAMES})]
        return [(*shard, {name: part[name][layer][expert] for name in STATE_NAMES})]
    if key not in part["weights"]:
        return []
    value = part["weights"][key]
    start, stop = part["bounds"][key] if "bounds" in part else (0, value.numel())
    return [(start, stop, {name: part[name][key] for name in STATE_NAMES})]


class ExpertStateReader:
    """The saved state of every expert, read slice by slice: a full checkpoint's rank files, overridden expert by
    expert by the sparse snapshots after it (add_sparse, oldest first). Implements optim.ExpertStateSource."""

    def __init__(self, files: RankFiles, *, layout: str, expert_numel: int, rank: int) -> None:
        self.layout, self.expert_numel, self.rank = layout, expert_numel, rank
        self._sources: list[tuple[RankFiles, str]] = [(files, "expert_optimizer")]
        self._newest: dict[Key, int] = {}   # experts a sparse snapshot saved -> index of the newest such source
        self.num_steps = int(files.get(rank if rank < files.world_size else 0)["expert_optimizer"]["num_steps"])

    def add_sparse(self, files: RankFiles, hot_keys: list[Key]) -> None:
        """A sparse snapshot taken one step after the newest state so far, holding the experts `hot_keys`."""
        self._sources.append((files, "hot_experts"))
        for key in hot_keys:
            self._newest[tuple(key)] = len(self._sources) - 1
        self.num_steps += 1

    def _ranks(self, files: RankFiles, start: int, stop: int) -> list[int]:
        """The ranks whose files may hold part of [start, stop): this rank's own first."""
        ranks = sorted(range(files.world_size), key=lambda r: (r != self.rank, r))
        if self.layout == "sharded":   # bounds known without opening the file
            ranks = [r for r in ranks if _overlap(shard_bounds(self.expert_numel, files.world_size, r), start, stop)]
        return ranks

    def read(self, layer: int, expert: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Elements [start, stop) of the expert's weights, exp_avg and exp_avg_sq from its newest save ([stop -
        start] each, the saved dtype, CPU); files are opened only until the slice is covered."""
        key = (layer, expert)
        files, field = self._sources[self._newest.get(key, 0)]
        out: dict[str, torch.Tensor] = {}
        covered = 0
        for rank in self._ranks(files, start, stop):
            shard = shard_bounds(self.expert_numel, files.world_size, rank)
            for piece_start, piece_stop, state in saved_pieces(files.get(rank)[field], key, shard=shard):
                lo, hi = max(piece_start, start), min(piece_stop, stop)
                if lo >= hi:
                    continue
                for name, value in state.items():
                    if name not in out:
                        out[name] = torch.empty(stop - start, dtype=value.dtype)
                    out[name][lo - start:hi - start] = value[lo - piece_start:hi - piece_start]
                covered += hi - lo   # every element is stored exactly once
            if covered == stop - start:
                break
        assert covered == stop - start, f"expert {key}: the checkpoint holds {covered} of [{start}, {stop})"
        return out

    def assemble(self, num_layers: int, num_experts: int) -> dict[str, Any]:
        """Every expert's full state ([L] x [E, P] each, and num_steps: assemble_expert_state's layout) - for tests
        and tools; a resume never builds it."""
        full: dict[str, Any] = {name: [] for name in STATE_NAMES}
        for layer in range(num_layers):
            states = [self.read(layer, expert, 0, self.expert_numel) for expert in range(num_experts)]
            for name in STATE_NAMES:
                full[name].append(torch.stack([state[name] for state in states]))
        full["num_steps"] = self.num_steps
        return full


class FullStateSource:
    """optim.ExpertStateSource over an assembled full state (assemble_expert_state's layout)."""

    def __init__(self, full: dict[str, Any]) -> None:
        self.full, self.num_steps = full, int(full["num_steps"])

    def read(self, layer: int, expert: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        return {name: self.full[name][layer][expert][start:stop] for name in STATE_NAMES}


def _overlap(bounds: tuple[int, int], start: int, stop: int) -> bool:
    return max(bounds[0], start) < min(bounds[1], stop)


def assemble_expert_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Every expert's full state from all ranks' files (ranks in order): weights, exp_avg, exp_avg_sq, each
    [L] x [E, P], and num_steps. SYMI layout: the G shards of each expert concatenated; DeepSpeed's group layout:
    each expert's shards from its holders' files joined (keyed_expert_state); FlexMoE layout: each expert from the
    one file that stores it."""
    layouts = {s["expert_optimizer"]["layout"] for s in states}
    assert len(layouts) == 1, layouts
    num_steps = {s["expert_optimizer"]["num_steps"] for s in states}
    assert len(num_steps) == 1, num_steps
    if layouts == {"sharded"}:
        parts = [s["expert_optimizer"] for s in states]
        numel = parts[-1]["stop"]
        for rank, part in enumerate(parts):
            assert (part["start"], part["stop"]) == shard_bounds(numel, len(parts), rank), "shards out of order"
        full = {name: [torch.cat([part[name][layer] for part in parts], dim=1)
                       for layer in range(len(parts[0][name]))] for name in STATE_NAMES}
    else:
        stored = keyed_expert_state([s["expert_optimizer"] for s in states])
        num_layers = 1 + max(layer for layer, _ in stored)
        num_experts = 1 + max(expert for _, expert in stored)
        assert len(stored) == num_layers * num_experts, "an expert is missing from the checkpoint"
        full = {name: [torch.stack([stored[layer, e][name] for e in range(num_experts)])
                       for layer in range(num_layers)] for name in STATE_NAMES}
    full["num_steps"] = num_steps.pop()
    return full


def keyed_expert_state(parts: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """(layer, expert) -> {weights, exp_avg, exp_avg_sq} ([P] each) from the ranks' parts of a checkpoint or sparse
    snapshot in a keyed layout: FlexMoE's (whole experts, each in one part) or the group layout's (shards with
    their "bounds", joined in order; together they must cover [0, P) exactly once)."""
    pieces: dict[tuple[int, int], list[tuple[int, int, dict[str, torch.Tensor]]]] = {}
    for part in parts:
        for key, value in part["weights"].items():
            start, stop = part["bounds"][key] if "bounds" in part else (0, value.numel())
            pieces.setdefault(tuple(key), []).append((start, stop, {name: part[name][key] for name in STATE_NAMES}))
    joined: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, shards in pieces.items():
        shards.sort(key=lambda piece: piece[0])
        stops = [0] + [stop for _, stop, _ in shards]
        assert [start for start, _, _ in shards] == stops[:-1], f"expert {key}: shards overlap or leave a gap"
        numel = parts[0].get("numel", stops[-1])
        assert stops[-1] == numel, f"expert {key}: shards end at {stops[-1]} of {numel} elements"
        joined[key] = {name: torch.cat([shard[name] for _, _, shard in shards]) for name in STATE_NAMES}
    return joined
