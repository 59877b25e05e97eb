"""Which counts and covariates a model uses: validated once, recorded as a small plain dict."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from omicvae_sc.data._disk import RowReader
from omicvae_sc.data._stream import BLOCK_ROWS
from omicvae_sc.data._validate import (
    NON_INTEGER_ACCEPTED,
    check_anndata_object,
    check_batch_sizes,
    checked_counts,
    warn_empty_genes,
    warn_small_categories,
    warn_unusual_counts,
)

SETUP_KEY = "omicvae_setup"
"""``adata.uns`` key where :meth:`OmicVAE.setup_anndata` records the setup."""


@dataclass(frozen=True)
class AnnDataSetup:
    """The data a model is fitted to: the count layer and the categorical covariates.

    ``covariate_keys`` lists the batch key first (when given), then the other covariates;
    ``categories`` holds, for each of them, the category names in code order.
    ``allow_non_integer`` records that the user accepted non-integer counts. ``genes``, when
    set, names the genes modelled (a subset of the AnnData's, in its order), read from the
    counts a block at a time; ``None`` models every gene.
    """

    layer: str | None
    batch_key: str | None
    covariate_keys: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]
    allow_non_integer: bool = False
    genes: tuple[str, ...] | None = None

    @property
    def counts_where(self) -> str:
        """Where the counts are, as error messages name it."""
        return "adata.X" if self.layer is None else f"adata.layers[{self.layer!r}]"

    @property
    def n_categories(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.categories)

    def to_dict(self) -> dict:
        """Plain, h5ad-serializable dict (``None`` is not storable in h5ad, so it is omitted)."""
        d: dict = {"covariate_keys": list(self.covariate_keys)}
        if self.layer is not None:
            d["layer"] = self.layer
        if self.batch_key is not None:
            d["batch_key"] = self.batch_key
        d["categories"] = {k: list(c) for k, c in zip(self.covariate_keys, self.categories,
                                                       strict=True)}
        if self.allow_non_integer:
            d["allow_non_integer"] = True
        if self.genes is not None:
            d["genes"] = list(self.genes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AnnDataSetup:
        keys = tuple(str(k) for k in np.atleast_1d(d.get("covariate_keys", [])))
        cats = d.get("categories", {})
        return cls(
            layer=d.get("layer"),
            batch_key=d.get("batch_key"),
            covariate_keys=keys,
            categories=tuple(tuple(str(c) for c in np.atleast_1d(cats[k])) for k in keys),
            allow_non_integer=bool(d.get("allow_non_integer", False)),
            genes=(tuple(str(g) for g in np.atleast_1d(d["genes"])) if "genes" in d
                   else None),
        )


def obs_column(adata: AnnData, key: str, role: str, *, missing_ok: bool = False) -> pd.Series:
    """``adata.obs[key]`` (passed as ``role``); a missing value is an error unless
    ``missing_ok`` (the groups of a comparison, where a cell without one belongs to none)."""
    if key not in adata.obs.columns:
        cols = list(adata.obs.columns)
        shown = cols[:10] + (["..."] if len(cols) > 10 else [])
        msg = f"adata.obs has no column {key!r} (passed as {role}); available columns: {shown}."
        raise KeyError(msg)
    col = adata.obs[key]
    if not missing_ok and col.isna().any():
        cell = adata.obs_names[np.flatnonzero(col.isna().to_numpy())[0]]
        msg = (
            f"adata.obs[{key!r}] (passed as {role}) has missing values (first at cell {cell!r}); "
            "give every cell a category, e.g. 'unknown'."
        )
        raise ValueError(msg)
    return col


def build_setup(
    adata: AnnData, *, layer: str | None = None, batch_key: str | None = None,
    categorical_covariate_keys: list[str] | tuple[str, ...] | None = None,
    allow_non_integer: bool = False, genes=None,
) -> AnnDataSetup:
    """Validate ``adata`` and describe its counts and covariates, without writing anything.

    ``genes`` (a boolean ``var`` column name, a boolean mask or gene names) selects the genes
    to model; only those columns are checked and read. Warns (and goes on) about genes
    without counts and covariate categories of one cell.
    """
    check_anndata_object(adata)
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    columns = gene_positions(adata, genes)
    counts = checked_counts(adata, layer, where, allow_non_integer=allow_non_integer,
                            columns=columns)
    if isinstance(counts, RowReader):  # on disk: one pass that checks every block
        _, detected = counts.scan(BLOCK_ROWS)
        if counts.saw_non_integer:
            msg = f"{counts.name} holds non-integer values. {NON_INTEGER_ACCEPTED}"
            warnings.warn(msg, UserWarning, stacklevel=2)
    extra = tuple(categorical_covariate_keys or ())
    keys = ((batch_key,) if batch_key is not None else ()) + extra
    if len(set(keys)) != len(keys):
        msg = f"Covariate keys must be distinct; got batch_key={batch_key!r} and {list(extra)}."
        raise ValueError(msg)
    categories = []
    for i, key in enumerate(keys):
        role = "batch_key" if i == 0 and batch_key is not None else "categorical_covariate_keys"
        col = obs_column(adata, key, role)
        if role == "batch_key":
            check_batch_sizes(key, col.astype(str).to_numpy())
        else:
            warn_small_categories(key, col.astype(str).to_numpy())
        if isinstance(col.dtype, pd.CategoricalDtype):
            cats = col.cat.remove_unused_categories().cat.categories.astype(str)
        else:
            cats = pd.Index(np.unique(col.astype(str)))
        categories.append(tuple(str(c) for c in cats))
    named = adata if columns is None else adata[:, columns]  # for the genes' names only
    if isinstance(counts, RowReader):
        warn_empty_genes(named, detected, where)
    else:
        warn_unusual_counts(named, counts, where)
    return AnnDataSetup(layer=layer, batch_key=batch_key, covariate_keys=keys,
                        categories=tuple(categories), allow_non_integer=allow_non_integer,
                        genes=None if columns is None
                        else tuple(str(g) for g in adata.var_names[columns]))


def gene_positions(adata: AnnData, genes) -> np.ndarray | None:
    """Positions in ``adata.var_names`` (increasing) of the genes ``genes`` selects: the name
    of a boolean ``adata.var`` column, a boolean mask over the genes, or gene names; ``None``
    (and a selection of every gene) gives ``None``."""
    if genes is None:
        return None
    if isinstance(genes, str):
        if genes not in adata.var.columns:
            msg = (f"adata.var has no column {genes!r} (passed as genes); available columns: "
                   f"{list(adata.var.columns)[:10]}. Pass a boolean var column, a boolean "
                   "mask or a list of gene names.")
            raise KeyError(msg)
        values = adata.var[genes].to_numpy()
        if values.dtype != bool:
            msg = (f"adata.var[{genes!r}] (passed as genes) has dtype {values.dtype}; "
                   "expected booleans (True for the genes to model).")
            raise ValueError(msg)
        mask = values
    else:
        given = np.asarray(genes)
        if given.dtype == bool:
            if given.shape != (adata.n_vars,):
                msg = (f"genes is a boolean mask of {given.size} values; adata has "
                       f"{adata.n_vars} genes.")
                raise ValueError(msg)
            mask = given
        else:
            names = given.astype(str).ravel()
            index = pd.Index(adata.var_names).get_indexer(names)
            if (index < 0).any():
                missing = names[index < 0][:3].tolist()
                msg = (f"{int((index < 0).sum())} of the genes passed as genes are not in "
                       f"adata.var_names (e.g. {missing}).")
                raise KeyError(msg)
            if len(np.unique(index)) != len(index):
                msg = "genes names a gene more than once; pass each gene once."
                raise ValueError(msg)
            mask = np.zeros(adata.n_vars, dtype=bool)
            mask[index] = True
    positions = np.flatnonzero(mask)
    if positions.size == 0:
        msg = "genes selects no gene; select at least one gene to model."
        raise ValueError(msg)
    return None if positions.size == adata.n_vars else positions


def read_setup(adata: AnnData) -> AnnDataSetup:
    """The setup recorded by :meth:`OmicVAE.setup_anndata`."""
    if SETUP_KEY not in adata.uns:
        msg = (
            f"adata.uns has no {SETUP_KEY!r}: this AnnData was not set up. Run "
            "`OmicVAE.setup_anndata(adata, layer=..., batch_key=...)` first."
        )
        raise KeyError(msg)
    return AnnDataSetup.from_dict(adata.uns[SETUP_KEY])


def covariate_codes(adata: AnnData, setup: AnnDataSetup) -> np.ndarray | None:
    """Integer codes ``(n_cells, n_covariates)`` of the covariates, in the setup's category order.

    Raises if ``adata`` holds a category the setup (and so a trained model) has not seen.
    """
    if not setup.covariate_keys:
        return None
    codes = np.empty((adata.n_obs, len(setup.covariate_keys)), dtype=np.int64)
    for j, (key, cats) in enumerate(zip(setup.covariate_keys, setup.categories, strict=True)):
        values = obs_column(adata, key, "a covariate of the model").astype(str).to_numpy()
        index = pd.Index(cats).get_indexer(values)
        if (index < 0).any():
            unseen = sorted(set(values[index < 0]))[:5]
            msg = (
                f"adata.obs[{key!r}] holds categories the model was not trained on: {unseen}; "
                f"known categories: {list(cats)[:10]}. Map them to known ones or retrain."
            )
            raise ValueError(msg)
        codes[:, j] = index
    return codes

