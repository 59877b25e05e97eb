"""Shared fixtures: copies of cached data sets, an AnnData fingerprint, the real-data folder.

Nothing global is set here (no seeding, no logging configuration, no torch flags) but torch's
thread count: under pytest-xdist each worker gets its share of the cores as torch threads (and
as ``OMP_NUM_THREADS`` for the commands tests start), and every test leaves it as it found it.
With a thread per core in every worker, two workers on two cores oversubscribe them, and
OpenMP's waiting made ``tests/test_writeback.py`` 13x slower (129 s, against 9.9 s with one
thread per worker) and the whole suite 16x (24 minutes against 1.5).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

import omicvae_sc as ov

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None or "PYTEST_XDIST_WORKER" not in os.environ:
        return  # not an xdist worker: torch's defaults
    import torch

    share = max(1, (os.cpu_count() or 1) // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(share)
    torch.set_num_threads(share)
    # scanpy's numba loops run on torch's OpenMP runtime and set its thread count to numba's:
    # the same share keeps torch's steady inside a test (a notebook that trains twice, with a
    # UMAP between, gets the same numbers twice)
    import numba

    numba.set_num_threads(share)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Each test leaves torch's thread count as it found it. scanpy's numba loops (neighbors,
    UMAP, seurat_v3 with a batch key) run on torch's OpenMP runtime and set its count to a
    thread per core: one such test made every later test in its worker oversubscribe the
    cores, and the suite took 24 minutes instead of 1.5."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- cached data
@functools.cache
def _synthetic() -> AnnData:
    return ov.datasets.synthetic_counts(n_cells=300, n_genes=60, n_groups=3, n_batches=2, seed=0)


@functools.cache
def _pbmc() -> AnnData:
    return ov.datasets.pbmc68k_reduced()


@pytest.fixture
def synthetic() -> AnnData:
    """300 cells x 60 genes, 3 groups, 2 batches; integer counts (CSR float32) in X and
    layers['counts']. A fresh copy per test."""
    return _synthetic().copy()


@pytest.fixture
def pbmc() -> AnnData:
    """scanpy's 700-cell PBMC subset as integer counts. A fresh copy per test."""
    return _pbmc().copy()


@pytest.fixture
def shared_data_dir() -> Path:
    """The real data folder (``$OMICVAE_SC_DATA`` or ``../shared/data``); skips if absent."""
    env = os.environ.get("OMICVAE_SC_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(
            f"real data folder {path} not found; set OMICVAE_SC_DATA to the folder holding the "
            "shared .h5ad files to run this test"
        )
    return path


# ---------------------------------------------------------------------------- fingerprint
def _update(h: hashlib._Hash, value) -> None:
    """Feed a deterministic, pickle-free description of ``value`` into ``h``."""
    if isinstance(value, AnnData):
        h.update(repr(("AnnData", value.shape, value.is_view)).encode())
        _update(h, value.X)
        for attr in ("layers", "obsm", "varm", "obsp", "varp", "uns"):
            h.update(attr.encode())
            _update(h, dict(getattr(value, attr)))
        _update(h, value.obs)
        _update(h, value.var)
    elif isinstance(value, dict):
        h.update(b"dict")
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _update(h, value[key])
    elif isinstance(value, list | tuple):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _update(h, item)
    elif sp.issparse(value):
        csr = value.tocsr()
        h.update(repr((type(value).__name__, value.format, value.shape, str(value.dtype))).encode())
        for part in (csr.indptr, csr.indices, csr.data):
            h.update(np.ascontiguousarray(part).tobytes())
    elif isinstance(value, pd.DataFrame):
        h.update(repr(("DataFrame", list(map(str, value.columns)), value.shape)).encode())
        _update(h, value.index)
        for col in value.columns:
            _update(h, value[col])
    elif isinstance(value, pd.Index | pd.Series):
        h.update(repr((type(value).__name__, str(value.dtype), len(value))).encode())
        if isinstance(value.dtype, pd.CategoricalDtype):
            _update(h, list(map(str, value.cat.categories)) if isinstance(value, pd.Series)
                    else list(map(str, value.categories)))
            codes = value.cat.codes if isinstance(value, pd.Series) else value.codes
            _update(h, np.asarray(codes))
        else:
            _update(h, np.asarray(value))
    elif isinstance(value, np.ndarray):
        h.update(repr(("ndarray", str(value.dtype), value.shape)).encode())
        if value.dtype.kind == "O":
            h.update(repr(value.tolist()).encode())
        else:
            h.update(np.ascontiguousarray(value).tobytes())
    elif value is None or isinstance(value, str | bytes | int | float | bool | np.generic):
        h.update(repr((type(value).__name__, value)).encode())
    else:  # anything else: its type and repr (stable for the values tests store)
        h.update(repr((type(value).__name__, repr(value))).encode())


def _adata_fingerprint(adata: AnnData) -> str:
    """SHA-256 over X, every layer, obs, var, obsm/varm/obsp/varp and uns (no pickling)."""
    h = hashlib.sha256()
    _update(h, adata)
    return h.hexdigest()


@pytest.fixture
def adata_fingerprint() -> Callable[[AnnData], str]:
    """``adata_fingerprint(adata) -> str``: equal strings mean an unchanged AnnData."""
    return _adata_fingerprint
