"""Checks on an AnnData before anything is written to it. Each error says what was found, where,
and what to do next."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from omicvae_sc.data._disk import RowReader, is_on_disk, lazy_counts
from omicvae_sc.module import Pass, chunk_rows

CPU = torch.device("cpu")  # the counts are checked on the host

NON_INTEGER_ACCEPTED = ("Fitting them as given (allow_non_integer=True): the NB/ZINB likelihood "
                        "is defined on counts, so likelihoods are approximate.")
"""What the warning about non-integer counts adds when they were accepted, in memory or on
disk."""


def check_anndata_object(adata: AnnData) -> None:
    """Reject empty objects and duplicated gene names.

    Views are accepted as scanpy's tools accept them: they are read as they are, and writing
    results into one makes it an actual AnnData the way anndata does it (with anndata's
    ``ImplicitModificationWarning``); the parent object is never changed. Counts on disk (a
    backed AnnData, or one from ``ov.read_lazy``) are read a block of rows at a time.
    """
    if not isinstance(adata, AnnData):
        msg = f"Expected an AnnData object, found {type(adata).__name__}."
        raise TypeError(msg)
    if adata.n_obs == 0 or adata.n_vars == 0:
        msg = f"adata is empty ({adata.n_obs} cells x {adata.n_vars} genes); nothing to fit."
        raise ValueError(msg)
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()][:3].tolist()
        msg = (
            f"adata.var_names has duplicated gene names (e.g. {dup}); results are written per "
            "gene and need unique names. Run `adata.var_names_make_unique()` first."
        )
        raise ValueError(msg)


def get_counts(adata: AnnData, layer: str | None) -> np.ndarray | sp.spmatrix:
    """The count matrix named by ``layer`` (``None`` means ``adata.X``), without copying."""
    if layer is None:
        if adata.X is None:
            msg = "adata.X is empty; pass layer= naming the layer that holds the raw counts."
            raise ValueError(msg)
        return adata.X
    if layer not in adata.layers:
        msg = (
            f"adata.layers has no layer {layer!r}; available layers: {_layer_names(adata)}. "
            "Pass layer= naming the raw-count layer, or layer=None to use adata.X."
        )
        raise KeyError(msg)
    on_disk = lazy_counts(adata, layer)  # a backed file's layer, read from the file
    return adata.layers[layer] if on_disk is None else on_disk


def _where(adata: AnnData, matrix, mask_values) -> tuple[str, str, float]:
    """Cell name, gene name and value of the first entry where ``mask_values(values)`` holds."""
    if sp.issparse(matrix):
        m = matrix.tocsr() if matrix.format != "csr" else matrix
        pos = int(np.flatnonzero(mask_values(m.data))[0])
        row = int(np.searchsorted(m.indptr, pos, side="right") - 1)
        col, value = int(m.indices[pos]), float(m.data[pos])
    else:
        arr = np.asarray(matrix)
        row, col = (int(i) for i in np.argwhere(mask_values(arr))[0])
        value = float(arr[row, col])
    return str(adata.obs_names[row]), str(adata.var_names[col]), value


def _layer_names(adata: AnnData) -> list[str]:
    """The named layers (anndata 0.13 also lists ``None``, its alias for ``X``)."""
    return [name for name in adata.layers if name is not None]


def _any_in_blocks(values: np.ndarray, bad) -> bool:
    """Whether ``bad(v)`` holds anywhere in ``values``, a block of rows (or values) at a time
    (the memory policy's ``Pass.VALIDATION``: the checks' temporaries stay a few MiB, not the
    matrix's size)."""
    step = chunk_rows(int(np.prod(values.shape[1:])), CPU, Pass.VALIDATION, least=1)
    return any(bool(bad(values[i:i + step]).any()) for i in range(0, values.shape[0], step))


def check_counts(adata: AnnData, matrix, where: str, *, allow_non_integer: bool = False
                 ) -> np.ndarray:
    """Raise unless ``matrix`` holds finite, non-negative integers and every cell has a count.

    With ``allow_non_integer``, non-integer values only warn (ambient-corrected or imputed
    counts). Returns the per-cell library sizes (float64).
    """
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    dtype = values.dtype
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        msg = f"{where} has dtype {values.dtype}; expected numeric raw counts."
        raise TypeError(msg)
    checks = [
        (lambda v: ~np.isfinite(v), "NaN or infinite values",
         "Remove or fix those entries; the likelihood is defined on finite counts."),
        (lambda v: v < 0, "negative values",
         "The NB/ZINB likelihood needs raw counts. Pass layer= naming the raw-count layer."),
        (lambda v: v != np.round(v), "non-integer values",
         "The NB/ZINB likelihood needs raw counts, not normalized or log values. Pass layer= "
         "naming the raw-count layer."),
    ]
    if np.issubdtype(values.dtype, np.floating):
        for bad, what, todo in checks:
            if _any_in_blocks(values, bad):
                cell, gene, value = _where(adata, matrix, bad)
                msg = f"{where} holds {what} (first {value:g} at cell {cell!r}, gene {gene!r}). "
                if what == "non-integer values" and allow_non_integer:
                    warnings.warn(msg + NON_INTEGER_ACCEPTED, UserWarning, stacklevel=2)
                    continue
                raise ValueError(msg + todo)
    elif _any_in_blocks(values, lambda v: v < 0):
        cell, gene, value = _where(adata, matrix, lambda v: v < 0)
        msg = f"{where} holds negative values (first {value:g} at cell {cell!r}, gene {gene!r})."
        raise ValueError(msg)
    library = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
    empty = np.flatnonzero(library == 0)
    if empty.size:
        msg = (
            f"{empty.size} cell(s) in {where} have zero total counts (first: "
            f"{adata.obs_names[empty[0]]!r}); the library size is the model's exposure and must be "
            "positive. Remove them first, e.g. `sc.pp.filter_cells(adata, min_counts=1)`."
        )
        raise ValueError(msg)
    return library


def warn_unusual_counts(adata: AnnData, matrix, where: str) -> None:
    """Warn about genes without a single count: they are kept (the model learns they are
    zero), and said."""
    warn_empty_genes(adata, np.asarray((matrix != 0).sum(axis=0)).ravel(), where)


def warn_empty_genes(adata: AnnData, per_gene: np.ndarray, where: str) -> None:
    """The warning of :func:`warn_unusual_counts`, from the number of cells with a count of
    each gene."""
    empty = np.flatnonzero(per_gene == 0)
    if empty.size:
        names = adata.var_names[empty[:3]].tolist()
        msg = (f"{empty.size} of {adata.n_vars} genes in {where} have no counts in any cell "
               f"(e.g. {names}); they are kept and the model learns to predict zeros for them. "
               "`sc.pp.filter_genes(adata, min_cells=1)` removes them.")
        warnings.warn(msg, UserWarning, stacklevel=3)


def _single_cell_categories(values: np.ndarray) -> np.ndarray:
    cats, counts = np.unique(values, return_counts=True)
    return cats[counts == 1]


def warn_small_categories(key: str, values: np.ndarray) -> None:
    """Warn when a covariate category holds a single cell: its effect rests on that cell."""
    single = _single_cell_categories(values)
    if single.size:
        msg = (f"adata.obs[{key!r}] has {single.size} categor{'y' if single.size == 1 else 'ies'} "
               f"with a single cell ({single[:3].tolist()}); the decoder learns that category's "
               "effect (and with dispersion='gene-batch' its dispersion) from one cell. Merge "
               "it into a larger category if that is not intended.")
        warnings.warn(msg, UserWarning, stacklevel=2)


def check_batch_sizes(key: str, values: np.ndarray) -> None:
    """Raise when a batch holds a single cell: its batch effect could not be told apart from
    that cell's own biology, so the cell would be 'corrected' into anything."""
    single = _single_cell_categories(values)
    if single.size:
        msg = (f"adata.obs[{key!r}] (the batch) has {single.size} batch"
               f"{'' if single.size == 1 else 'es'} of a single cell ({single[:3].tolist()}): "
               "a batch effect cannot be learned from one cell, which would be corrected into "
               "anything. Merge it into the batch it was processed with, or drop the cell.")
        raise ValueError(msg)


def checked_counts(adata: AnnData, layer: str | None, where: str, *,
                   allow_non_integer: bool = False, columns: np.ndarray | None = None):
    """The counts of ``adata`` ready to read, of the genes ``columns`` (positions; ``None``:
    all): a matrix in memory, checked whole, or for counts on disk a :class:`RowReader` that
    takes the columns from every block and checks the block as it reads it."""
    counts = get_counts(adata, layer)
    if is_on_disk(counts):
        return RowReader(counts, where, adata.obs_names, allow_non_integer=allow_non_integer,
                         columns=columns)
    if columns is not None:
        counts = counts[:, columns]
        adata = adata[:, columns]  # a view, for the genes' names in messages
    check_counts(adata, counts, where, allow_non_integer=allow_non_integer)
    return counts
