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

from omicvae_sc.data._disk import RowReader
from omicvae_sc.data._setup import obs_column
from omicvae_sc.data._stream import BLOCK_ROWS
from omicvae_sc.data._validate import check_anndata_object, checked_counts

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
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    counts = checked_counts(adata, layer, where, allow_non_integer=allow_non_integer)
    if batch_key is not None:
        obs_column(adata, batch_key, "batch_key")  # present, no missing values
    if isinstance(counts, RowReader):
        # on disk: two passes of blocks; a cell left without counts in the chosen genes is
        # reported, with its rows, by the set-up's pass over them
        mask = seurat_v3_on_disk(counts, _batch_labels(adata, batch_key), n_top_genes)
    else:
        mask = _most_variable(adata, counts, n_top_genes, batch_key)
        _check_cells_have_counts(adata, counts, mask)
    logger.info("omicvae_sc models the %d most variable of %d genes (seurat_v3 on the counts)",
                int(mask.sum()), adata.n_vars)
    return mask


def _batch_labels(adata: AnnData, batch_key: str | None) -> np.ndarray:
    """A small integer per cell for its batch (all zero without a batch key)."""
    if batch_key is None:
        return np.zeros(adata.n_obs, dtype=np.int32)
    return np.unique(adata.obs[batch_key].to_numpy(), return_inverse=True)[1].astype(np.int32)


def seurat_v3_on_disk(reader: RowReader, batches: np.ndarray, n_top_genes: int,
                      *, span: float = 0.3, progress_bar: bool = True) -> np.ndarray:
    """The genes scanpy's ``highly_variable_genes(flavor="seurat_v3")`` picks, computed in two
    passes over blocks of rows of counts on disk, never holding the matrix.

    Per batch: the mean and variance of each gene (first pass); a loess fit of log variance on
    log mean (scikit-misc, as scanpy); then (second pass) the variance of the counts
    standardized by the fitted spread, each count clipped at ``sqrt(n_cells)`` standard
    deviations above the mean. Genes are ranked per batch and ordered by median rank over the
    batches where they are in the top ``n_top_genes``, then by the number of such batches,
    as scanpy does. Sums are float64; the selection matches scanpy 1.11's on the data in
    memory (``tests/test_streaming.py``); scanpy 1.12 picked one other gene of 2,000 there.
    """
    from skmisc.loess import loess
    from tqdm.auto import tqdm

    n_batches = int(batches.max()) + 1 if len(batches) else 1
    n_genes = reader.n_genes

    def passes(what: str):
        n_blocks = -(-reader.n_cells // BLOCK_ROWS)
        return tqdm(reader.blocks(BLOCK_ROWS), total=n_blocks, unit="block",
                    desc=f"{what} of {reader.name}", leave=False,
                    disable=not progress_bar or n_blocks < 20)

    def per_batch(block, lo: int, hi: int, clip=None):
        """Sums by batch and gene of the block's counts and of their squares, each count
        clipped at its batch's ``clip`` when given, ``(2, batches, genes)``."""
        codes = batches[lo:hi]
        out = np.zeros((2, n_batches, n_genes))
        for b in np.unique(codes):
            part = block if (codes == b).all() else block[codes == b]
            values = part.data.astype(np.float64)
            if clip is not None:
                values = np.minimum(values, clip[b, part.indices])
            out[0, b] = np.bincount(part.indices, weights=values, minlength=n_genes)
            out[1, b] = np.bincount(part.indices, weights=values * values, minlength=n_genes)
        return out

    cells = np.bincount(batches, minlength=n_batches).astype(np.float64)
    sums, squares = sum(per_batch(block, lo, hi) for lo, hi, block in
                        passes("gene means and variances"))
    mean = sums / cells[:, None]
    var = (squares / cells[:, None] - mean**2) * (cells / (cells - 1))[:, None]
    reg_std = np.zeros_like(mean)
    for b in range(n_batches):
        fitted = np.zeros(n_genes)
        varies = var[b] > 0
        model = loess(np.log10(mean[b, varies]), np.log10(var[b, varies]), span=span, degree=2)
        model.fit()
        fitted[varies] = model.outputs.fitted_values
        reg_std[b] = np.sqrt(10**fitted)
    clip = reg_std * np.sqrt(cells)[:, None] + mean
    clipped, clipped_squares = sum(per_batch(block, lo, hi, clip) for lo, hi, block in
                                   passes("clipped gene variances"))
    with np.errstate(divide="ignore", invalid="ignore"):
        norm_var = (cells[:, None] * mean**2 + clipped_squares - 2 * clipped * mean) / (
            (cells[:, None] - 1) * reg_std**2)
    return _seurat_v3_ranking(norm_var, n_top_genes)


def _seurat_v3_ranking(norm_var: np.ndarray, n_top_genes: int) -> np.ndarray:
    """scanpy's choice from the per-batch normalized variances ``(batches, genes)``."""
    import pandas as pd

    ranks = np.argsort(np.argsort(-norm_var, axis=1), axis=1).astype(np.float32)
    n_high = (ranks < n_top_genes).sum(axis=0)
    ranks[ranks >= n_top_genes] = np.nan
    median = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)
    table = pd.DataFrame({"rank": median, "n_high": n_high})
    chosen = table.sort_values(["rank", "n_high"], ascending=[True, False],
                               na_position="last").index[:n_top_genes]
    mask = np.zeros(norm_var.shape[1], dtype=bool)
    mask[chosen] = True
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
    return np.asarray(table["highly_variable"], dtype=bool)


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
