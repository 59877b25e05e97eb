"""What a runner measures on a CUDA device besides wall time: the kernels finished before a
clock is read, and the peak of the device memory that torch allocated during training."""

from __future__ import annotations

import torch


class GPUClock:
    """Synchronizes a CUDA device around timed work and records its memory peak; on any other
    device every method does nothing and :meth:`figures` is empty."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def start(self) -> None:
        """Call just before the timed training: queued work done, the memory peak reset."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> None:
        """Call before reading a clock: the kernels launched so far have finished."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def figures(self) -> dict:
        """``peak_gpu_mb`` (torch's allocations since :meth:`start`) and ``gpu``, the name."""
        if not self.cuda:
            return {}
        return {"peak_gpu_mb": torch.cuda.max_memory_allocated(self.device) / 2**20,
                "gpu": torch.cuda.get_device_name(self.device)}
