"""One training step shared by several processes: what the networks need to know about it.

When ``K`` processes train together (``torch.distributed``), each step's minibatch is the union
of the ``K`` processes' parts. Two things in a forward pass depend on the whole minibatch and not
only on one process's rows, and :func:`shared_step` tells them:

- **random draws** (dropout masks, the reparameterization noise): every process draws the noise
  of the whole minibatch from the same random state and keeps its own rows, so the draws are
  those one process would make for the whole minibatch, and no two processes share noise;
- **BatchNorm statistics** (with a process group): the mean and variance are summed over the
  processes (a differentiable all-reduce), so normalisation is that of the whole minibatch.
  Without a group each process normalises by its own rows.

Outside :func:`shared_step` (one process, inference) nothing changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn


class StepShare(NamedTuple):
    """This process's part of a minibatch shared by several processes."""

    start: int  # first row of this process in the step's whole minibatch
    total: int  # rows of the whole minibatch
    group: object | None  # process group that sums BatchNorm statistics; None: per process


_SHARE: StepShare | None = None


@contextlib.contextmanager
def shared_step(start: int, total: int, group: object | None) -> Iterator[None]:
    """Inside the block, forward passes are this process's rows ``start:start + n`` of a
    minibatch of ``total`` rows (see the module's docstring)."""
    global _SHARE
    previous, _SHARE = _SHARE, StepShare(start, total, group)
    try:
        yield
    finally:
        _SHARE = previous


def _rows(draw, shape: torch.Size | tuple[int, ...], **kwargs) -> torch.Tensor:
    share = _SHARE
    if share is None:
        return draw(shape, **kwargs)
    full = draw((share.total, *shape[1:]), **kwargs)
    return full[share.start:share.start + shape[0]]


def rand_rows(shape: torch.Size | tuple[int, ...], *, device: torch.device) -> torch.Tensor:
    """``torch.rand(shape)``, or this process's rows of the shared minibatch's draw."""
    return _rows(torch.rand, shape, device=device)


def randn_rows(like: torch.Tensor) -> torch.Tensor:
    """``torch.randn_like(like)``, or this process's rows of the shared minibatch's draw."""
    return _rows(torch.randn, like.shape, device=like.device, dtype=like.dtype)


def shared_dropout_active() -> bool:
    """Whether dropout masks must come from :func:`rand_rows` (a shared step)."""
    return _SHARE is not None


class _SumOver(torch.autograd.Function):
    """A tensor summed over the processes of ``group``; its gradient is summed likewise (each
    process's part reaches every process's sum)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = t.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.clone()
        torch.distributed.all_reduce(out, group=ctx.group)
        return out, None


class BatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (same parameters, buffers and state dict) whose training statistics,
    inside a :func:`shared_step` with a group, are those of the whole shared minibatch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        share = _SHARE
        if share is None or share.group is None or not self.training:
            return super().forward(x)
        return self._shared_forward(x, share.group)

    def _shared_forward(self, x: torch.Tensor, group) -> torch.Tensor:
        # one sum over the processes a layer (and one for its gradient): every collective is
        # a point where the processes wait for each other. Sums of the deviations from the
        # running mean (the same in every process), not of x itself, keep E[d^2] - E[d]^2
        # free of cancellation: the running mean is close to the minibatch's.
        c = x.shape[1]
        shift = self.running_mean.detach()
        d = x - shift
        count = torch.full((1,), float(x.shape[0]), device=x.device, dtype=x.dtype)
        sums = _SumOver.apply(torch.cat([d.sum(0), d.square().sum(0), count]), group)
        n = sums[-1].detach()
        mean_d = sums[:c] / n
        var = (sums[c:2 * c] / n - mean_d.square()).clamp_min(0.0)  # biased, as in training
        mean = mean_d + shift
        out = (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            unbiased = var.detach() * (n / (n - 1).clamp_min(1.0))
            self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return out
