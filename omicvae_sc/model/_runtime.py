"""Device choice, seeding and chunk size shared by the model's methods."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

CHUNK_ELEMENTS = 2**19
"""Outputs (latents, expression, log p(x)) work on chunks of at most about this many numbers
(cells x genes x samples): 2 MB of float32 per tensor stays in cache. On the project's 2-core
CPU that made log p(x) with K=100 about 2.5x faster than chunks of 2**25 (a scratch timing on
pbmc3k, see benchmarks/README.md)."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` means CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG inside the block and restore the caller's RNG state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
