"""Which genes a one-call fit models: all of them, or the most variable ones of the raw counts.

A raw 10x matrix has 33k genes. Every gene costs the model time in training and in every
output; the genes that are not variable add little to the latent. ``n_top_genes`` picks the
most variable genes by scanpy's ``highly_variable_genes`` with the ``seurat_v3`` flavour, which
is made for raw counts (a variance-stabilized rank of each gene; per batch and combined across
batches when there is a batch key), so no normalized copy of the data is made.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
from anndata import AnnData

from omicvae_sc.data._setup import obs_column
from omicvae_sc.data._validate import check_anndata_object, check_counts, get_counts

logger = logging.getLogger("omicvae_sc")

MANY_GENES = 10_000
"""Above this many genes without gene selection, a log line names ``n_top_genes``."""


def check_n_top_genes(n_top_genes: int | None) -> None:
    if n_top_genes is None:
        return
    if isinstance(n_top_genes, bool) or not isinstance(n_top_genes, int | np.integer) \
            or n_top_genes < 2:
        msg = (f"n_top_genes must be an integer of at least 2 or None (all genes), got "
               f"{n_top_genes!r}; 2000 is usual.")
        raise ValueError(msg)


def genes_to_model(adata: AnnData, *, layer: str | None, batch_key: str | None,
                   n_top_genes: int | None, allow_non_integer: bool = False
                   ) -> np.ndarray | None:
    """Boolean mask of the ``n_top_genes`` most variable genes of the raw counts, or ``None``
    to model every gene (``n_top_genes`` is ``None`` or not smaller than the number of genes).

    The counts and the batch column are validated on every gene first, so bad input is
    reported as it is, before any selection. Nothing is written to ``adata``.
    """
    check_n_top_genes(n_top_genes)
    check_anndata_object(adata)
    if n_top_genes is None:
        if adata.n_vars > MANY_GENES:
            logger.warning(
                "adata has %d genes and all of them are modelled, which is slow; "
                "n_top_genes=2000 (command line: --n-top-genes 2000) models the 2,000 most "
                "variable genes of the counts instead.", adata.n_vars)
        return None
    if n_top_genes >= adata.n_vars:
        return None
    counts = get_counts(adata, layer)
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    check_counts(adata, counts, where, allow_non_integer=allow_non_integer)
    if batch_key is not None:
        obs_column(adata, batch_key, "batch_key")  # present, no missing values
    mask = _most_variable(adata, counts, n_top_genes, batch_key)
    _check_cells_have_counts(adata, counts, mask)
    return mask


def _most_variable(adata: AnnData, counts, n_top_genes: int, batch_key: str | None
                   ) -> np.ndarray:
    import scanpy as sc

    # a throwaway AnnData sharing the counts: scanpy writes its columns there, not in adata
    obs = adata.obs[[batch_key]].copy() if batch_key is not None else None
    scratch = AnnData(X=counts, obs=obs)
    scratch.var_names = adata.var_names
    with _torch_threads_kept():
        table = sc.pp.highly_variable_genes(scratch, flavor="seurat_v3",
                                            n_top_genes=n_top_genes, batch_key=batch_key,
                                            inplace=False)
    mask = np.asarray(table["highly_variable"], dtype=bool)
    logger.info("omicvae_sc models the %d most variable of %d genes (seurat_v3 on the counts)",
                int(mask.sum()), adata.n_vars)
    return mask


@contextlib.contextmanager
def _torch_threads_kept():
    """Put torch's thread count back after scanpy's numba code.

    numba's parallel loops run on the OpenMP runtime that torch loaded and set its thread
    count to numba's: a user's ``torch.set_num_threads(1)`` would silently become one thread
    per core for the training that follows (measured: this package's test suite in two
    processes of one thread each took 24 minutes instead of 1.5, their OpenMP threads waiting
    on each other).
    """
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_cells_have_counts(adata: AnnData, counts, mask: np.ndarray) -> None:
    """Every cell needs a positive library over the selected genes (the model's exposure)."""
    library = np.asarray(counts[:, np.flatnonzero(mask)].sum(axis=1)).ravel()
    empty = np.flatnonzero(library == 0)
    if empty.size:
        msg = (f"{empty.size} cell(s) have no counts in the {int(mask.sum())} selected genes "
               f"(first: {adata.obs_names[empty[0]]!r}); the model needs a positive library "
               "size. Choose more genes with a larger n_top_genes, or remove those cells.")
        raise ValueError(msg)
