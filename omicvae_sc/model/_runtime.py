"""Device choice, precision, seeding and stage timing shared by the model's functions."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import torch

logger = logging.getLogger("omicvae_sc")

def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` means CUDA when present (under ``torchrun`` with several processes on a
    machine, GPU ``LOCAL_RANK``), else the CPU. A device this torch cannot use is a
    ``ValueError`` that says what it has, before anything is built."""
    if isinstance(device, str) and device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # one GPU per process when a launcher (torchrun) started several on this machine
        local = os.environ.get("LOCAL_RANK")
        if local is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1) > 1:
            return torch.device("cuda", int(local) % torch.cuda.device_count())
        return torch.device("cuda")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        msg = (f"device={device!r} is not a device torch knows; use 'auto' (CUDA when present),"
               f" 'cpu', 'cuda' or 'cuda:N'.")
        raise ValueError(msg) from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            build = f"torch {torch.__version__}, built for CUDA {torch.version.cuda}" \
                if torch.version.cuda else f"torch {torch.__version__}, a CPU-only build"
            msg = (f"device={str(device)!r}, but this torch sees no CUDA GPU ({build}). "
                   "Use device='auto' to take a GPU when there is one, or device='cpu'.")
            raise ValueError(msg)
        if device.index is not None and device.index >= count:
            msg = (f"device={str(device)!r}, but this torch sees {count} CUDA GPU(s) "
                   f"(cuda:0 to cuda:{count - 1}).")
            raise ValueError(msg)
    if device.type == "mps" and not torch.backends.mps.is_available():
        msg = "device='mps', but this torch cannot use an Apple GPU here; use device='cpu'."
        raise ValueError(msg)
    return device


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


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Log how long the block took: ``omicvae_sc: <name> in <s> s`` (INFO)."""
    start = time.perf_counter()
    yield
    logger.info("omicvae_sc: %s in %.1f s", name, time.perf_counter() - start)


PROGRESS_CELLS = 20_000
"""From this many cells on, the output stages show a progress bar over the cells (below, they
take seconds)."""


class _Counted:
    """``data`` whose passes over its cells (``batches``) move ``bar`` by the cells they
    yield; everything else is ``data``'s."""

    def __init__(self, data, bar):
        self._data, self._bar = data, bar

    def __getattr__(self, name: str):
        return getattr(self._data, name)

    def part(self, lo: int, hi: int) -> _Counted:
        """Rows ``lo:hi``, for a pass this process shares with others (torchrun): the bar
        counts only the cells it computes, so that it ends full."""
        self._bar.total -= self._data.n_cells - (hi - lo)
        self._bar.refresh()
        return _Counted(self._data.part(lo, hi), self._bar)

    def batches(self, batch_size: int, **kwargs):
        for item in self._data.batches(batch_size, **kwargs):
            self._bar.update(len(item[0]))
            yield item


@contextlib.contextmanager
def cell_progress(data, desc: str, *, enabled: bool, passes: int = 1):
    """``data``, or with ``enabled`` and at least ``PROGRESS_CELLS`` cells a view of it whose
    ``passes`` passes over the cells advance a tqdm bar (closed, and gone, when done)."""
    if not enabled or data.n_cells < PROGRESS_CELLS:
        yield data
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=passes * data.n_cells, desc=desc, unit="cell", unit_scale=True,
               leave=False)
    try:
        yield _Counted(data, bar)
    finally:
        bar.close()

