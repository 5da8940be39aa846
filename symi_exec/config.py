"""A training job's options (TrainConfig) and their checks; the planner's type.

Free of torch, so that the CLI reads the defaults of `symi train` from here without loading it; the checks that
need the model or a checkpoint import those modules when they run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from symi_sim.checks import check_choice, check_non_negative_int, check_number, check_positive_int
from symi_sim.cluster import Cluster
from symi_sim.placement import Placement
from symi_sim.policies import get_policy
from symi_sim.routing import CAPACITY_MODES, check_capacity_factor

if TYPE_CHECKING:
    from symi_exec.model import ModelConfig

DEFAULT_DATA = Path(__file__).parent / "data" / "wikipedia_texts.txt"
BYTE_VAL_FRACTION = 0.1   # a text file's last tenth of bytes is its validation data (data.load_data)
DTYPE_NAMES = ("float32", "float64", "bfloat16")   # model.TORCH_DTYPES maps them to torch dtypes
# the dtype of the optimizers' master weights and AdamW moments: float32 under a bfloat16 model (its 8-bit
# mantissa would lose most updates), the model's own otherwise
MASTER_DTYPES = {"float32": "float32", "float64": "float64", "bfloat16": "float32"}
# the largest finite value of each dtype (numpy has no bfloat16)
DTYPE_MAX = {"float32": float(np.finfo(np.float32).max), "float64": float(np.finfo(np.float64).max),
             "bfloat16": 3.3895313892515355e38}

# planner(step, load_LE, cluster, previous) -> the placement of the next step: the policy's plan by default
# (loop.policy_planner); launch takes another (tests use it for arbitrary placements)
Planner = Callable[[int, np.ndarray, Cluster, Placement | None], Placement]


# --record-trace writes trace.parquet; megatron-router-trace also the per-token ids as Megatron's router traces
TRACE_FORMATS = ("parquet", "megatron-router-trace")


@dataclass(frozen=True)
class TrainConfig:
    out: str
    model: str = "tiny"
    num_experts: int = 4
    slots_per_rank: int = 2
    top_k: int = 1
    policy: str = "symi"
    policy_options: dict[str, Any] = field(default_factory=dict)
    capacity_factor: float | None = 1.0    # None: dropless
    capacity_mode: str = "slot"
    steps: int = 50
    batch_size: int = 4                    # sequences per rank per micro-batch
    grad_accum: int = 1                    # micro-batches per step (each rank: grad_accum x batch_size sequences)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                 # 0 disables clipping
    aux_loss_coef: float = 0.01
    router_skew: float = 0.0               # s: expert e's router logit biased by -s ln(1 + e) (skewed load)
    seed: int = 0
    data: str | None = None                # a text file (bytes are tokens), a `symi data prepare` folder; None: the
                                           # shipped Wikipedia sample
    eval_every: int = 0                    # validation loss after every N-th step and the last one; 0: never
    eval_batches: int = 8                  # fixed validation batches (of batch_size sequences per rank) per evaluation
    record_trace: bool = False
    trace_format: str = "parquet"          # with record_trace: megatron-router-trace also writes router_trace/
    dtype: str = "float32"
    log_interval: int = 10
    bucket_mb: float = 25.0                # MiB of dense gradients per all-reduce bucket (dense.py; DDP's default)
    dist_timeout_s: float = 300.0          # a collective waiting this long for a silent rank ends the job (launch.py)
    model_overrides: dict[str, int] = field(default_factory=dict)
    checkpoint_every: int = 0              # 0: no checkpoints; K: every K steps and after the last step
    checkpoint_dir: str | None = None      # None: the --resume directory, else "<out>-checkpoints"
    resume: str | None = None              # a checkpoint root: continue from its latest complete checkpoint
    sparse_hot_share: float | None = None  # F: between full checkpoints, a sparse snapshot of the hot experts
                                           # (covering F of the unsaved tokens) after every step (snapshots.py)
    keep_checkpoints: int = 0              # 0: keep every full checkpoint; N: only the newest N
    overlap_checkpoints: bool = False      # write checkpoints in a background thread while training goes on
    fail_at_step: int | None = None        # failure drill: every rank SIGKILLs itself when this step starts
    overwrite_checkpoints: bool = False    # a new run deletes the checkpoints in its checkpoint dir (else refused)
    allow_config_change: tuple[str, ...] = ()   # settings a resume may change (run_identity.SETTINGS)
    run_id: str | None = None              # set by the launcher (run_identity.claim): the run's identity

    def checkpoint_root(self) -> Path:
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir)
        if self.resume is not None:
            return Path(self.resume)
        out = Path(self.out)
        return out.with_name(f"{out.name}-checkpoints")

    def model_config(self) -> ModelConfig:
        from symi_exec.model import model_config

        # a prepared folder sets the vocabulary; raw bytes keep the model's default (256)
        vocab = {"vocab_size": self.data_meta()["vocab_size"]} if self.data_path().is_dir() else {}
        return model_config(self.model, num_experts=self.num_experts, top_k=self.top_k,
                            aux_loss_coef=self.aux_loss_coef, router_skew=self.router_skew,
                            **{**vocab, **self.model_overrides})

    def data_path(self) -> Path:
        return Path(self.data) if self.data is not None else DEFAULT_DATA

    def data_meta(self) -> dict[str, Any]:
        """meta.json of a prepared data folder (prepare.read_meta), checked against its token files."""
        from symi_exec.prepare import read_meta

        return read_meta(self.data_path())

    def token_counts(self) -> tuple[int, int]:
        """Training and validation tokens of the data (a folder's token files, or a text file's byte split)."""
        path = self.data_path()
        if path.is_dir():
            meta = self.data_meta()
            return int(meta["train_tokens"]), int(meta["val_tokens"])
        return byte_split(path.stat().st_size)

    def validate(self, world_size: int) -> None:
        """ValueError naming the first bad option (checked before any process starts)."""
        for name in ("num_experts", "slots_per_rank", "top_k", "steps", "batch_size", "grad_accum", "log_interval"):
            check_positive_int(getattr(self, name), name)
        check_positive_int(world_size, "the number of ranks")
        if self.num_experts > world_size * self.slots_per_rank:
            raise ValueError(f"{self.num_experts} experts need at least {self.num_experts} slots, but {world_size} "
                             f"ranks x {self.slots_per_rank} slots = {world_size * self.slots_per_rank}")
        self.model_config()
        check_capacity_factor(self.capacity_factor)
        check_choice(self.capacity_mode, "capacity mode", CAPACITY_MODES)
        check_choice(self.dtype, "dtype", DTYPE_NAMES)
        check_choice(self.trace_format, "trace format", TRACE_FORMATS)
        if self.trace_format != "parquet" and not self.record_trace:
            raise ValueError(f"--trace-format {self.trace_format} goes with --record-trace")
        if self.trace_format == "megatron-router-trace" and self.resume is not None:
            # checkpoints keep the per-rank counts, not the per-token ids: a resumed run could not write them whole
            raise ValueError("--trace-format megatron-router-trace cannot resume a run (checkpoints do not keep the "
                             "per-token expert ids); record the whole run in one go")
        for name in ("lr", "min_lr", "weight_decay"):
            check_number(getattr(self, name), name, low=0)
        check_number(self.grad_clip, "grad_clip (--clip-grad)", low=0)
        check_number(self.bucket_mb, "bucket_mb", low=0, low_open=True)
        for name in ("beta1", "beta2"):
            check_number(getattr(self, name), name, low=0, high=1, high_open=True)
        largest = DTYPE_MAX[self.dtype]
        if self.lr / (1 - self.beta1) > largest:
            raise ValueError(f"lr {self.lr:g} is too large for {self.dtype}: AdamW's first step multiplies by "
                             f"lr / (1 - beta1) = {self.lr / (1 - self.beta1):g}, over the largest {self.dtype} "
                             f"({largest:g})")
        check_non_negative_int(self.warmup_steps, "warmup_steps")
        policy = get_policy(self.policy, **self.policy_options)
        if policy.uses_current_load:
            raise ValueError(f"policy {self.policy!r} plans on the current step's loads; the executor cannot run it")
        if policy.shadows_experts:
            raise ValueError(f"policy {self.policy!r} shadows hot experts (their weights broadcast to every rank, "
                             f"their tokens computed where they are), which the executor does not run; compare it "
                             f"with symi simulate")
        self._validate_data()
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            partial = out.is_dir() and (out / "metrics.csv").is_file() and not (out / "COMPLETE").is_file()
            raise ValueError(f"output directory {self.out!r} already exists and is not empty"
                             + (" (the partial outputs of a failed run): give another --out" if partial else ""))
        check_non_negative_int(self.checkpoint_every, "checkpoint_every")
        check_non_negative_int(self.keep_checkpoints, "keep_checkpoints")
        if self.sparse_hot_share is not None:
            check_number(self.sparse_hot_share, "sparse hot share", low=0, high=1, low_open=True)
            if not self.checkpoint_every:
                raise ValueError("sparse snapshots need full checkpoints to start from: set checkpoint_every "
                                 "(--checkpoint-every K) too")
        if self.fail_at_step is not None:
            check_non_negative_int(self.fail_at_step, "fail_at_step")
        self._validate_checkpoint_dir()
        if self.resume is not None:
            self._validate_resume(world_size)

    def _validate_data(self) -> None:
        path = self.data_path()
        if not path.exists():
            raise ValueError(f"data file {str(path)!r} does not exist")
        check_non_negative_int(self.eval_every, "eval_every")
        check_positive_int(self.eval_batches, "eval_batches")
        num_train, num_val = self.token_counts()
        need = self.model_config().seq_len + 2
        what = "tokens" if path.is_dir() else "bytes"
        if num_train < need:
            raise ValueError(f"data {str(path)!r} holds {num_train} training {what}, fewer than a sequence needs "
                             f"({need})")
        if self.eval_every and num_val < need:
            raise ValueError(f"data {str(path)!r} holds {num_val} validation {what}, fewer than a sequence needs "
                             f"({need}) for --eval-every")

    def _validate_checkpoint_dir(self) -> None:
        from symi_exec import run_identity

        run_identity.allowed_changes(self.allow_config_change)
        if not run_identity.uses_checkpoint_dir(self):
            return
        root, out = self.checkpoint_root().resolve(), Path(self.out).resolve()
        if root.exists() and not root.is_dir():
            raise ValueError(f"checkpoint dir {str(self.checkpoint_root())!r} is a file, not a folder")
        if root == out or out in root.parents:
            # the run folder is the run's outputs alone (a partial one is kept, a complete one is whole)
            raise ValueError(f"checkpoint dir {str(self.checkpoint_root())!r} is inside --out {self.out!r}, which "
                             f"holds the run's outputs only: give --checkpoint-dir a folder outside it")
        run_identity.check_root(self)

    def _validate_resume(self, world_size: int) -> None:
        from symi_exec import run_identity

        resume = run_identity.resolve(self, world_size)
        step = int(resume.meta["step"])
        if step >= self.steps:
            raise ValueError(f"checkpoint {str(resume.directory)!r} reaches step {step}; nothing left of "
                             f"{self.steps} steps")
        if self.record_trace and resume.meta["world_size"] != world_size:
            raise ValueError(f"--record-trace needs the checkpoint's world size ({resume.meta['world_size']}), got "
                             f"{world_size}")
        if self.record_trace and not resume.meta.get("trace_counts"):
            raise ValueError(f"--record-trace needs trace counts from the run's first step, which checkpoint "
                             f"{str(resume.directory)!r} does not hold (written without --record-trace)")


def byte_split(num_bytes: int) -> tuple[int, int]:
    """Training and validation bytes of a text file of `num_bytes` bytes: the last BYTE_VAL_FRACTION validates."""
    num_val = int(num_bytes * BYTE_VAL_FRACTION)
    return num_bytes - num_val, num_val


def default_of(name: str) -> Any:
    """TrainConfig's default for field `name` (a fresh one for a default factory): `symi train` shows and uses it,
    so that every default lives here only."""
    for spec in dataclasses.fields(TrainConfig):
        if spec.name == name:
            if spec.default is not dataclasses.MISSING:
                return spec.default
            if spec.default_factory is not dataclasses.MISSING:
                return spec.default_factory()
            raise ValueError(f"TrainConfig.{name} has no default")
    raise ValueError(f"TrainConfig has no field {name!r}")
