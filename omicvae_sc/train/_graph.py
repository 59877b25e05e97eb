"""The training step replayed as a CUDA graph: one launch for the few hundred kernels of a step.

On a GPU the model is small enough that a step's time is Python queuing kernels, not the
kernels themselves. A CUDA graph records the step once (forward, backward, the non-finite guard
and the fused Adam update) and replays it, so each later step costs one launch plus copying the
minibatch into the graph's input buffers. What a step reads and writes therefore lives at fixed
addresses: the minibatch and the KL weight are copied into buffers made here, the loss and the
per-batch sums are copied out of buffers the graph writes, and the guard's tensors are made
once per fit. A minibatch of another size (the epoch's last) runs eagerly.

The capture needs a step free of host synchronisation, which ``tests/test_device_path.py``
checks on the meta device; the logic around it (buffers, warm-up, the eager last batch) is
tested on the CPU with ``capture`` replaced by a function that replays the step eagerly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch

WARMUP_STEPS = 3
"""Eager steps before the capture (on a side stream on CUDA): they build the optimizer's state
and let cuBLAS set up its workspaces, which a capture cannot do. They are real training steps."""


def cuda_capture(body: Callable[[], None]) -> Callable[[], None]:
    """Record ``body``'s kernels into a CUDA graph (they do not run now); return its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay  # the bound method keeps the graph (and its memory pool) alive


@contextlib.contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)


def batch_sums(out) -> torch.Tensor:
    """A minibatch's [distortion, rate] sums over its cells, on the device."""
    return torch.stack([out.distortion.sum(), out.rate.sum()]).detach()


class GraphedStep:
    """Training steps of ``batch_size`` cells: ``WARMUP_STEPS`` eager ones, then the step
    captured once by ``capture`` and replayed.

    ``step_fn(x, codes, kl_weight, record)`` is the eager training step (it must not read values
    back from the device); with ``record=False`` it leaves the loss unrecorded, which this class
    then does outside the graph, where the step index may change.
    """

    def __init__(self, step_fn, guard, batch_size: int,
                 capture: Callable[[Callable[[], None]], Callable[[], None]] = cuda_capture):
        self.step_fn = step_fn
        self.guard = guard
        self.batch_size = batch_size
        self.capture = capture
        self.warmup_left = WARMUP_STEPS
        self.replay: Callable[[], None] | None = None
        self.failed = False  # the capture failed: every step is eager

    def takes(self, x: torch.Tensor) -> bool:
        """Whether this minibatch goes through the graph (else the caller steps eagerly)."""
        return len(x) == self.batch_size and not self.failed

    def step(self, x: torch.Tensor, codes: torch.Tensor | None, kl_weight: float
             ) -> torch.Tensor:
        """One training step on ``x``; returns the minibatch's [distortion, rate] sums."""
        if self.warmup_left:
            self.warmup_left -= 1
            with _side_stream(x.device):
                return self._eager(x, codes, kl_weight)
        if self.replay is None and not self._capture(x, codes):
            return self._eager(x, codes, kl_weight)
        self.x.copy_(x)
        if codes is not None:
            self.codes.copy_(codes)
        self.kl.fill_(kl_weight)  # a scalar launch argument: no wait for the device
        self.replay()
        self.guard.record(self.loss)
        return self.sums.clone()

    def _eager(self, x, codes, kl_weight) -> torch.Tensor:
        return batch_sums(self.step_fn(x, codes, kl_weight, True))

    def _capture(self, x: torch.Tensor, codes: torch.Tensor | None) -> bool:
        """Record the step; on failure warn, and return False (training goes on eagerly: a
        capture runs no kernel, so the weights and the optimizer are as they were)."""
        self.x = torch.empty_like(x)
        self.codes = None if codes is None else torch.empty_like(codes)
        self.kl = torch.zeros((), device=x.device)
        self.loss = torch.zeros((), device=x.device)
        self.sums = torch.zeros(2, device=x.device)

        def body() -> None:
            out = self.step_fn(self.x, self.codes, self.kl, False)
            self.loss.copy_(out.loss.detach())
            self.sums.copy_(batch_sums(out))

        try:
            self.replay = self.capture(body)
        except RuntimeError as err:
            self.failed = True
            msg = (f"The training step could not be captured as a CUDA graph ({err}); "
                   "training goes on without cuda_graphs.")
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            return False
        return True
