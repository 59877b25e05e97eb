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

ACCELERATOR_CHUNK_ELEMENTS = 2**25
"""The least chunk size on an accelerator (128 MiB of float32 per tensor): there the CPU's
cache-sized chunks would give thousands of small kernel launches and host copies (latents of
1M cells in 3,800 chunks, log p(x) with K=100 in chunks of 2 cells)."""


def chunk_rows(device: torch.device, per_row: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk of outputs: about ``elements`` numbers on the CPU, at least
    :data:`ACCELERATOR_CHUNK_ELEMENTS` elsewhere, and never fewer than 2 rows (BatchNorm)."""
    if device.type != "cpu":
        elements = max(elements, ACCELERATOR_CHUNK_ELEMENTS)
    return max(2, elements // max(1, per_row))


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


PRECISIONS = ("auto", "float32", "bfloat16")


def fast_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (faster than float32): a CUDA
    GPU with bfloat16 support, or a CPU with AVX512-BF16 or AMX instructions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` means ``"bfloat16"`` where :func:`fast_bfloat16` holds, else ``"float32"``."""
    if precision not in PRECISIONS:
        msg = f"precision={precision!r} is not supported; expected one of {PRECISIONS}."
        raise ValueError(msg)
    if precision == "auto":
        return "bfloat16" if fast_bfloat16(device) else "float32"
    return precision
