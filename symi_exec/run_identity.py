"""Whose checkpoints these are: a run's identity in its checkpoint dir, the settings a resume must keep, and the
locks that keep two runs off the same run folder and checkpoint dir.

Every checkpoint root holds run.json (the run id, its --out, when it started, the settings that define it, and for
a resume into another dir the checkpoint it continued); every checkpoint's meta.json holds the run id and the
settings it was written with. A new run (no --resume) takes only an empty checkpoint dir, unless
--overwrite-checkpoints deletes the checkpoints there first; a resume into the dir it reads continues that run's
identity. A resume keeps every setting in SETTINGS (those that shape the numbers the run produces) unless
--allow-config-change names it, and keeps the global batch (per-rank batch x ranks) on another number of ranks.
The launcher holds an flock on a lock file beside --out and beside the checkpoint dir for the run's lifetime: the
kernel drops it when the launcher dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from symi_exec.config import TrainConfig

logger = logging.getLogger(__name__)

# TrainConfig fields a resume must keep (global_batch: batch_size x ranks); steps, out, ranks, slots per rank, the
# checkpoint options, log interval and trace recording may change freely
SETTINGS = ("seed", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "global_batch",
            "data", "dtype", "capacity_factor", "capacity_mode", "policy", "policy_options", "model", "model_overrides",
            "num_experts", "top_k", "aux_loss_coef", "router_skew")
ALIASES = {"batch_size": "global_batch", "experts": "num_experts"}   # --allow-config-change names, as options
# ModelConfig fields that shape the saved tensors: no resume can change them
SHAPE_FIELDS = ("num_layers", "d_model", "num_heads", "d_ff", "seq_len", "num_experts", "vocab_size")


def settings(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """The settings that define a run, as JSON stores them."""
    values = {name: getattr(config, name) for name in SETTINGS if name not in ("global_batch", "data")}
    # the shipped sample as None: a checkout moved elsewhere still resumes
    values.update(global_batch=config.batch_size * world_size * config.grad_accum,
                  data=None if config.data is None else str(config.data_path().resolve()))
    return json.loads(json.dumps({name: values[name] for name in SETTINGS}))


def allowed_changes(names: tuple[str, ...]) -> set[str]:
    """--allow-config-change names as SETTINGS keys; ValueError naming an unknown one."""
    allowed = set()
    for raw in names:
        name = raw.strip().replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in SETTINGS:
            raise ValueError(f"--allow-config-change: {raw!r} is not a setting a resume keeps (one of "
                             f"{', '.join(sorted({*SETTINGS, *ALIASES} - {'global_batch'}))})")
        allowed.add(name)
    return allowed


@dataclass(frozen=True)
class Resume:
    """Where a resume starts, what it changes, and the per-rank batch it runs."""

    full_dir: Path
    chain: list[Path]
    damaged: list[tuple[Path, str]]     # checkpoints / the snapshot passed over, and what is wrong with each
    meta: dict[str, Any]                # meta.json of the last checkpoint or snapshot resumed
    changes: dict[str, list[Any]]       # setting -> [recorded, now], each allowed by --allow-config-change
    batch_size: int

    @property
    def directory(self) -> Path:
        return self.chain[-1] if self.chain else self.full_dir


def resolve(config: TrainConfig, world_size: int) -> Resume:
    """The resume point of config.resume (the newest intact checkpoint and sparse chain) and the settings checks;
    ValueError naming every refused change, or why the recorded global batch cannot be kept."""
    from symi_exec import checkpoint, snapshots

    assert config.resume is not None
    full_dir, chain, damaged = snapshots.resume_point(config.resume)
    directory = chain[-1] if chain else full_dir
    meta = checkpoint.read_meta(directory)
    recorded = meta.get("settings")
    if not isinstance(recorded, dict) or not isinstance(meta.get("model"), dict):
        raise ValueError(f"{str(directory / 'meta.json')!r} records no settings or model (written by an older symi)")
    model = config.model_config().to_dict()
    shape = [f"model.{k} {meta['model'].get(k)!r} -> {v!r}" for k, v in model.items()
             if k in SHAPE_FIELDS and meta["model"].get(k) != v]
    if shape:
        raise ValueError(f"checkpoint {str(directory)!r} holds another model: {', '.join(shape)} (its weights "
                         f"cannot be loaded into this model)")
    allowed = allowed_changes(config.allow_config_change)
    now = settings(config, world_size)
    changes = {k: [recorded.get(k), v] for k, v in now.items() if k != "global_batch" and recorded.get(k) != v}
    batch_size, recorded_global = config.batch_size, recorded.get("global_batch")
    if recorded_global != now["global_batch"]:
        if "global_batch" in allowed or not isinstance(recorded_global, int):
            changes["global_batch"] = [recorded_global, now["global_batch"]]
        elif recorded_global % world_size:
            raise ValueError(f"global batch {recorded_global} (recorded in {str(directory)!r}) cannot be split over "
                             f"{world_size} ranks: resume on a number of ranks that divides it, or pass "
                             f"--allow-config-change batch_size to train with {config.batch_size} per rank")
        else:
            batch_size = recorded_global // world_size
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        raise ValueError(f"resume would change settings recorded in {str(directory)!r}: {format_changes(refused)}; "
                         f"pass --allow-config-change {','.join(refused)} to accept")
    return Resume(full_dir, chain, damaged, meta, changes, batch_size)


def format_changes(changes: dict[str, list[Any]]) -> str:
    return ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())


# ---------------------------------------------------------------------------------------------- the checkpoint dir


def read_run(root: Path) -> dict[str, Any]:
    from symi_exec.checkpoint import RUN_FILE, read_json

    return read_json(root / RUN_FILE)


def continues_in_place(config: TrainConfig) -> bool:
    """A resume whose checkpoints go to the dir it reads: the same run goes on there."""
    return config.resume is not None and config.checkpoint_root().resolve() == Path(config.resume).resolve()


def uses_checkpoint_dir(config: TrainConfig) -> bool:
    return bool(config.checkpoint_every) or config.resume is not None


def check_root(config: TrainConfig) -> None:
    """ValueError unless the checkpoint dir suits the run: the resumed run's own dir (with its run.json), or else
    empty (with --overwrite-checkpoints: holding nothing but checkpoints, which the run deletes)."""
    root = config.checkpoint_root()
    if continues_in_place(config):
        if config.overwrite_checkpoints:
            raise ValueError("--overwrite-checkpoints would delete the checkpoints --resume continues from: give "
                             "--checkpoint-dir another folder")
        from symi_exec.checkpoint import latest_complete

        if latest_complete(root) is None:
            raise ValueError(f"no complete checkpoint in {str(root)!r}")
        if not (root / "run.json").is_file():
            raise ValueError(f"checkpoint dir {str(root)!r} holds no run.json: it was not written by this version "
                             f"of symi train")
        read_run(root)
        return
    entries = sorted(root.iterdir()) if root.is_dir() else []
    if not entries:
        return
    if config.overwrite_checkpoints:
        foreign = [e.name for e in entries if not _is_checkpoint_entry(e)]
        if foreign:
            raise ValueError(f"checkpoint dir {str(root)!r} holds {foreign[0]!r}, which is not a checkpoint: "
                             f"--overwrite-checkpoints deletes only checkpoints; choose another --checkpoint-dir")
        return
    try:
        run = read_run(root)
        owner = (f"checkpoints of run {run.get('run_id')} (out {run.get('out')!r}, seed "
                 f"{run.get('settings', {}).get('seed')}, started {run.get('started')})")
    except ValueError:
        names = ", ".join(e.name for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        owner = f"{len(entries)} entries ({names})"
    raise ValueError(f"checkpoint dir {str(root)!r} already holds {owner}: a new run does not mix its checkpoints "
                     f"with them; continue that run with --resume {str(root)}, delete them with "
                     f"--overwrite-checkpoints, or choose another --checkpoint-dir")


def _is_checkpoint_entry(entry: Path) -> bool:
    from symi_exec.checkpoint import RUN_FILE, STEP_PREFIX
    from symi_exec.snapshots import SPARSE_PREFIX

    return entry.name == RUN_FILE or (entry.is_dir() and entry.name.startswith((STEP_PREFIX, SPARSE_PREFIX)))


def _start_root(config: TrainConfig, root: Path, record: dict[str, Any]) -> None:
    """A new identity in the checkpoint dir: its old checkpoints deleted (--overwrite-checkpoints), run.json."""
    from symi_exec.checkpoint import RUN_FILE, write_atomic_text

    check_root(config)
    if root.is_dir() and any(root.iterdir()):
        logger.warning("--overwrite-checkpoints: deleting the checkpoints in %s", root)
        for entry in root.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    root.mkdir(parents=True, exist_ok=True)
    write_atomic_text(root / RUN_FILE, json.dumps(record, indent=1) + "\n")


def drop_newer(root: Path, step: int) -> None:
    """Resuming in place from `step` (rank 0, once every rank has read it): checkpoints and snapshots after it
    (damaged, or after a damaged one) belong to a history the run no longer continues; removed, so that a later
    resume never mixes them with the new one."""
    from symi_exec.checkpoint import STEP_PREFIX, checkpoint_dirs
    from symi_exec.snapshots import SPARSE_PREFIX

    for prefix in (STEP_PREFIX, SPARSE_PREFIX):
        for later, directory in checkpoint_dirs(root, prefix).items():
            if later > step:
                logger.warning("removing %s: newer than the step %d this resume continues from", directory, step)
                shutil.rmtree(directory)


# ---------------------------------------------------------------------------------------------- locks and the claim


def lock_path(target: str | Path) -> Path:
    """The lock file of a run folder or checkpoint dir: hidden, beside it (the run folder appears only at the end)."""
    target = Path(target).resolve()
    return target.with_name(f".{target.name}.lock")


@contextmanager
def hold_lock(target: str | Path, what: str, owner: str) -> Iterator[None]:
    """An exclusive flock on `target`'s lock file while the block runs; ValueError naming the holder (the text it
    wrote into the file) when another process holds it."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "starting"
            os.close(fd)
            raise ValueError(f"{what} {str(target)!r} is in use by another symi train ({holder}): wait for it to "
                             f"finish or choose another one") from None
        # the previous holder unlinks the file as it lets go: lock it only if the path still names this file
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)   # still held: no one can lock a file that nobody else can find any more
        os.close(fd)


@contextmanager
def claim(config: TrainConfig, world_size: int, *, leader: bool = True) -> Iterator[TrainConfig]:
    """For the run's lifetime (validated before): the locks on --out and the checkpoint dir, the run's identity
    in the checkpoint dir (`leader`: the launcher, or rank 0 of a torchrun job; the others only read). Yields the
    config the ranks run: with its run id and, when resuming, the per-rank batch that keeps the recorded global
    batch."""
    root = config.checkpoint_root()
    in_place = continues_in_place(config)
    run_id = str(read_run(root).get("run_id")) if in_place else uuid.uuid4().hex[:12]
    started = datetime.now().isoformat(timespec="seconds")
    with ExitStack() as stack:
        if leader:
            owner = f"pid {os.getpid()}, run id {run_id}, out {str(config.out)!r}, started {started}"
            stack.enter_context(hold_lock(config.out, "run folder", owner))
            if uses_checkpoint_dir(config):
                stack.enter_context(hold_lock(root, "checkpoint dir", owner))
        resume = resolve(config, world_size) if config.resume is not None else None
        if resume is not None and leader:
            _log_resume(resume, config, world_size)
        resolved = dataclasses.replace(config, run_id=run_id,
                                       batch_size=resume.batch_size if resume is not None else config.batch_size)
        if leader and uses_checkpoint_dir(config) and not in_place:
            record = {"run_id": run_id, "out": str(Path(config.out).resolve()), "started": started,
                      "settings": settings(resolved, world_size),
                      "resumed_from": None if resume is None else {
                          "checkpoint": str(resume.directory.resolve()), "run_id": resume.meta.get("run_id")}}
            _start_root(config, root, record)
        yield resolved


def _log_resume(resume: Resume, config: TrainConfig, world_size: int) -> None:
    for directory, reason in resume.damaged:
        logger.warning("damaged checkpoint %s (%s): resuming from %s instead", directory, reason, resume.directory)
    if resume.changes:
        logger.warning("resume changes settings recorded in %s (--allow-config-change): %s", resume.directory,
                       format_changes(resume.changes))
    if resume.batch_size != config.batch_size:
        logger.warning("per-rank batch %d on %d ranks keeps the global batch %d recorded in %s (not --batch-size %d)",
                       resume.batch_size, world_size, resume.batch_size * world_size, resume.directory,
                       config.batch_size)
