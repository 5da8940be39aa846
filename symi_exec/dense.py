"""The dense (non-expert) parameters: plain data parallelism with their gradients all-reduced in buckets during the
backward, and their AdamW (float32 master weights and moments under a bfloat16 model).

Legend: G ranks, M micro-batches per step, n elements of one bucket.

Gradient sync (DenseGradSync), DDP's scheme:
  buckets     the parameters in reverse order of use (the backward produces their gradients in that order),
              packed into flat buffers of about bucket_mb MiB each; every parameter's .grad is a view into its
              bucket, so autograd accumulates straight into the buffers (gradient memory 1x: no flat copy of all
              gradients, no copy back)
  backward    a post-accumulate-grad hook per parameter counts the parameters of its bucket that are done; when the
              buckets up to this one are all done they are all-reduced (sum) asynchronously, in bucket order, while
              the backward goes on (every rank launches the same collectives in the same order, whatever order its
              hooks fire in). Only the last micro-batch's backward is armed: the ones before just accumulate.
  finish      launches whatever bucket is left (a parameter the backward did not reach: its gradient stays zero),
              waits for all, divides by G (the mean over ranks)
The loss rides in the last bucket, one extra element: the sum over ranks of every rank's loss is finite only if each
is, so the loop's finiteness check needs no all-reduce of its own (the gradient norm is finite on every rank or on
none: the dense gradients are reduced, the expert norm is a global sum). Gradients, and so the all-reduce, are in
the model's dtype (bfloat16: 2 bytes per element); the `dense_grad` bytes count the gradients only (ring model:
2 (G - 1) / G of them), as before the buckets.

Optimizer (DenseOptimizer): torch's AdamW with nanoGPT's groups, over the parameters themselves in float32/float64;
under bfloat16 over float32 master copies (the bfloat16 parameters hold their cast after every step), the
gradients cast up to float32 for the step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from symi_exec.comm import Comm
from symi_exec.config import MASTER_DTYPES, TrainConfig
from symi_exec.model import TORCH_DTYPES, param_groups

logger = logging.getLogger(__name__)


class _Bucket:
    """One flat buffer [n] (+ the loss rider in the last bucket) and the parameters whose gradients it holds."""

    def __init__(self, params: list[nn.Parameter], *, rider: bool) -> None:
        self.params = params
        self.numel = sum(p.numel() for p in params)
        first = params[0]
        self.buffer = torch.zeros(self.numel + int(rider), dtype=first.dtype, device=first.device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in params:
            self.views.append(self.buffer[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.num_done = 0
        self.work: Any = None   # the in-flight all-reduce (dist.Work)


def make_buckets(params: Sequence[nn.Parameter], bucket_bytes: int) -> list[list[int]]:
    """Indices into `params` of each bucket: the parameters in reverse order, a bucket closed once it holds at least
    `bucket_bytes` (a parameter larger than that gets a bucket of its own); a bucket holds one dtype."""
    buckets: list[list[int]] = []
    size = 0
    for i in reversed(range(len(params))):
        p = params[i]
        if not buckets or size >= bucket_bytes or params[buckets[-1][0]].dtype != p.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += p.numel() * p.element_size()
    return buckets


class DenseGradSync:
    """The dense gradients' mean over ranks, all-reduced bucket by bucket while the backward runs (see the module)."""

    def __init__(self, params: Sequence[nn.Parameter], comm: Comm, *, bucket_bytes: int) -> None:
        self.params = list(params)
        self.comm = comm
        groups = make_buckets(self.params, bucket_bytes)
        self.buckets = [_Bucket([self.params[i] for i in group], rider=b == len(groups) - 1)
                        for b, group in enumerate(groups)]
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket.params}
        self._armed = False
        self._next = 0   # the next bucket to launch
        if comm.world_size > 1:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._grad_ready)
        logger.debug("dense gradients: %d buckets of %s elements", len(self.buckets),
                     [bucket.numel for bucket in self.buckets])

    def zero_grads(self) -> None:
        """Zero every gradient and make it a view into its bucket again (a step starts)."""
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.num_done = 0
            bucket.work = None
            for p, view in zip(bucket.params, bucket.views, strict=True):
                p.grad = view
        self._armed = False
        self._next = 0

    def arm(self, loss: torch.Tensor) -> None:
        """The next backward is the step's last: reduce the buckets as they fill; `loss` (this rank's, a scalar)
        rides in the last bucket."""
        self.buckets[-1].buffer[-1] = loss.detach()
        self._armed = True

    def _grad_ready(self, p: torch.Tensor) -> None:
        if not self._armed:
            return
        bucket = self.buckets[self._bucket_of[id(p)]]
        bucket.num_done += 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if bucket.num_done < len(bucket.params):
                return
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        for p, view in zip(bucket.params, bucket.views, strict=True):
            # autograd accumulates into the view in place; anything else would leave the buffer stale
            assert p.grad is not None and p.grad.data_ptr() == view.data_ptr(), "a gradient left its bucket"
        bucket.work = dist.all_reduce(bucket.buffer, async_op=True)
        self._next += 1

    def finish(self) -> tuple[float, float]:
        """Wait for every bucket (launching those the backward did not complete, in order), divide by G.

        Returns (squared norm of the mean dense gradients, the mean over ranks of the loss that rode along)."""
        comm = self.comm
        if comm.world_size > 1:
            while self._next < len(self.buckets):
                self._launch(self.buckets[self._next])
            for bucket in self.buckets:
                bucket.work.wait()
                bucket.buffer /= comm.world_size
            numel = sum(bucket.numel for bucket in self.buckets)
            element_size = self.buckets[0].buffer.element_size()
            comm.count("dense_grad", 2 * (comm.world_size - 1) * numel * element_size // comm.world_size)
        self._armed = False
        sq = sum(float((bucket.buffer[:bucket.numel].double() ** 2).sum()) for bucket in self.buckets)
        return sq, float(self.buckets[-1].buffer[-1])


class DenseOptimizer:
    """AdamW over the dense parameters (nanoGPT's groups) and their gradient sync (`sync`)."""

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]], config: TrainConfig, comm: Comm) -> None:
        self.params = [p for _, p in named_params]
        self.sync = DenseGradSync(self.params, comm, bucket_bytes=max(int(config.bucket_mb * 2**20), 1))
        master_dtype = TORCH_DTYPES[MASTER_DTYPES[config.dtype]]
        self.masters: list[nn.Parameter] | None = None
        if any(p.dtype != master_dtype for p in self.params):
            self.masters = [nn.Parameter(p.detach().to(master_dtype).clone()) for p in self.params]
            named_params = [(n, m) for (n, _), m in zip(named_params, self.masters, strict=True)]
        self.adamw = torch.optim.AdamW(param_groups(list(named_params), config.weight_decay), lr=config.lr,
                                       betas=(config.beta1, config.beta2), eps=1e-8)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """AdamW with learning rate `lr` on the synced gradients multiplied by `grad_scale` (clipping)."""
        for group in self.adamw.param_groups:
            group["lr"] = lr
        if self.masters is None:
            if grad_scale != 1.0:
                for p in self.params:
                    p.grad.mul_(grad_scale)
            self.adamw.step()
            return
        for m, p in zip(self.masters, self.params, strict=True):
            m.grad = p.grad.to(m.dtype) * grad_scale if grad_scale != 1.0 else p.grad.to(m.dtype)
        self.adamw.step()
        with torch.no_grad():
            for m, p in zip(self.masters, self.params, strict=True):
                p.copy_(m)
                m.grad = None   # the float32 copies live only for the step

    def state_dict(self) -> dict[str, Any]:
        """torch's AdamW state dict (loadable by a plain AdamW), plus the float32 master weights under bfloat16."""
        state = self.adamw.state_dict()
        if self.masters is not None:
            state["master_weights"] = [m.detach().clone() for m in self.masters]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of state_dict; a state without master weights (a float32 run's) starts them from the
        parameters as loaded."""
        state = dict(state)
        masters = state.pop("master_weights", None)
        self.adamw.load_state_dict(state)
        if self.masters is None:
            return
        with torch.no_grad():
            for i, (m, p) in enumerate(zip(self.masters, self.params, strict=True)):
                m.copy_(masters[i] if masters is not None else p)
