"""The 700-cell PBMC subset that ships inside scanpy, turned back into integer counts."""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import version

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse

_MAX_RESIDUAL = 0.25
_TARGET_SUM = 1e4


@lru_cache(maxsize=1)
def _load_scanpy_pbmc68k() -> ad.AnnData:
    # Cached read of the file bundled with scanpy; callers must never hand it out uncopied.
    return sc.datasets.pbmc68k_reduced()


def _recover_counts(logged: sparse.csr_matrix, n_counts: np.ndarray) -> sparse.csr_matrix:
    """Invert ``log1p(x / n_counts * 1e4)`` and check the result is integer up to float noise."""
    logged = sparse.csr_matrix(logged, dtype=np.float64)  # (cells, genes), float64 for the inverse
    scale = np.repeat(n_counts / _TARGET_SUM, np.diff(logged.indptr))
    values = np.expm1(logged.data) * scale
    rounded = np.rint(values)
    residual = float(np.abs(values - rounded).max(initial=0.0))
    if residual >= _MAX_RESIDUAL:
        msg = (
            f"Recovering counts from scanpy's pbmc68k_reduced().raw.X left a residual of "
            f"{residual:.3f} before rounding (expected < {_MAX_RESIDUAL}); the bundled file no "
            "longer looks like log1p(counts / obs['n_counts'] * 1e4). Check the installed "
            "scanpy version, or load the original 10x counts instead."
        )
        raise RuntimeError(msg)
    counts = sparse.csr_matrix(
        (rounded.astype(np.float32), logged.indices.copy(), logged.indptr.copy()),
        shape=logged.shape,
    )
    counts.eliminate_zeros()
    return counts


def pbmc68k_reduced() -> ad.AnnData:
    """Load 700 PBMCs x 765 genes as integer counts, from the copy bundled with scanpy.

    Nothing is downloaded. scanpy stores ``.raw.X`` as ``log1p(counts / n_counts * 1e4)``,
    where ``obs['n_counts']`` is each cell's total over all genes, so the counts are
    recovered as ``round(expm1(raw.X) * n_counts / 1e4)``; the function checks that the
    values were integers up to float noise before rounding.

    Returns
    -------
    A new AnnData (700 cells x 765 genes), independent of any cached data, with

    - ``X``: integer counts as a ``scipy.sparse.csr_matrix`` of float32;
    - ``layers['counts']``: a copy of ``X``;
    - ``obs_names``: cell barcodes; ``var_names``: gene symbols of ``.raw``;
    - ``obs['cell_type']``: the 10 ``bulk_labels`` (categorical);
    - ``obs['total_counts_all_genes']``: scanpy's ``n_counts``, the total over all genes
      before subsetting to 765 (so it exceeds the row sums of ``X``);
    - ``uns['provenance']``: a plain-string description of the source and recovery.

    Raises
    ------
    RuntimeError
        If the bundled data no longer invert to integer counts.
    """
    source = _load_scanpy_pbmc68k()
    n_counts = source.obs["n_counts"].to_numpy(dtype=np.float64)
    counts = _recover_counts(source.raw.X, n_counts)

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(source.obs["bulk_labels"].astype(str)),
            "total_counts_all_genes": n_counts.astype(np.float32),
        },
        index=pd.Index(source.obs_names.astype(str), name=None),
    )
    var = pd.DataFrame(index=pd.Index(source.raw.var_names.astype(str), name=None))
    adata = ad.AnnData(X=counts, obs=obs, var=var, layers={"counts": counts.copy()})
    adata.uns["provenance"] = (
        "scanpy.datasets.pbmc68k_reduced() (10x Genomics PBMC 68k, Zheng et al. 2017, "
        f"700-cell subset bundled with scanpy {version('scanpy')}); integer counts recovered as "
        "round(expm1(raw.X) * obs['n_counts'] / 1e4), residual before rounding checked "
        f"< {_MAX_RESIDUAL}; bulk_labels kept as obs['cell_type']."
    )
    return adata
