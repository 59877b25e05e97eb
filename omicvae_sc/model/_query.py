"""A query's cells made readable by a reference model: its genes put in the reference's order
(the unmeasured ones zero-filled), its covariates named as the reference's, and the checks
that say what is wrong with a query before anything is trained.

Plain functions on AnnData and the reference's parts; :class:`~omicvae_sc.OmicVAE` calls them
from ``load_query_data`` and ``prepare_query_anndata``.
"""

from __future__ import annotations

import base64
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from omicvae_sc.data import (
    BLOCK_ROWS,
    AnnDataSetup,
    RowReader,
    check_anndata_object,
    checked_counts,
)
from omicvae_sc.data._setup import obs_column
from omicvae_sc.data._validate import check_batch_sizes, warn_small_categories
from omicvae_sc.module import UNFREEZE, VAE, freeze, new_entries

MIN_GENE_OVERLAP = 0.5
"""Default least share of the reference's genes a query must have measured. The encoder reads
the missing ones as zeros; below half of them, the latent says more about what is missing than
about the cell."""

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


@dataclass(frozen=True)
class QueryRecord:
    """What makes a model a query's: how many categories of each covariate the reference had
    (the rest are the query's, trained), the reference genes the query did not measure, the
    query's names of the covariate columns, and what its training may change."""

    reference_categories: tuple[int, ...]
    missing: tuple[str, ...]
    columns: tuple[str, ...]  # the query's obs column of each covariate, in the setup's order
    unfreeze: str

    def to_dict(self) -> dict:
        return {"reference_categories": list(self.reference_categories),
                "missing": list(self.missing), "columns": list(self.columns),
                "unfreeze": self.unfreeze}

    @classmethod
    def from_dict(cls, d: dict) -> QueryRecord:
        return cls(reference_categories=tuple(int(n) for n in d["reference_categories"]),
                   missing=tuple(str(g) for g in d["missing"]),
                   columns=tuple(str(c) for c in d["columns"]), unfreeze=str(d["unfreeze"]))


@dataclass(frozen=True)
class ReferenceParts:
    """A trained reference, from a model in memory or a saved folder: all a query needs."""

    setup: AnnDataSetup
    hparams: dict
    var_names: np.ndarray
    module: VAE  # read, never changed


def reference_parts(reference) -> ReferenceParts:
    """The parts of ``reference``: an ``OmicVAE`` or the folder of a saved one."""
    from omicvae_sc.model._io import read_model

    if isinstance(reference, str | Path):
        meta, state = read_model(Path(reference))
        if "query" in meta:
            msg = (f"{reference} holds a query's model; map the query onto the reference it "
                   "was mapped to, not onto another query.")
            raise ValueError(msg)
        if not meta["is_trained"]:
            msg = f"The reference saved in {reference} was never trained; train it first."
            raise ValueError(msg)
        setup = AnnDataSetup.from_dict(meta["setup"])
        var_names = np.asarray(meta["var_names"], dtype=str)
        module = VAE(len(var_names), n_categories=setup.n_categories,
                     has_batch=setup.batch_key is not None,
                     **{k: v for k, v in meta["hparams"].items() if k != "seed"})
        module.load_state_dict(state)
        return ReferenceParts(setup, dict(meta["hparams"]), var_names, module)
    if not hasattr(reference, "module") or not hasattr(reference, "setup"):
        msg = (f"reference must be a trained OmicVAE or the folder of a saved one, got "
               f"{type(reference).__name__}.")
        raise TypeError(msg)
    if reference._query is not None:
        msg = ("reference is a query's model; map the query onto the reference it was mapped "
               "to, not onto another query.")
        raise ValueError(msg)
    if not reference.is_trained:
        msg = "The reference model was never trained; call reference.train() first."
        raise ValueError(msg)
    return ReferenceParts(reference.setup, dict(reference.hparams), reference.var_names,
                          reference.module)


# ---------------------------------------------------------------------------- genes
def _share(names: np.ndarray, pattern: re.Pattern) -> float:
    sample = names[:2000]
    return float(np.mean([bool(pattern.match(str(g))) for g in sample])) if len(sample) else 0.0


def gene_positions(reference_genes: np.ndarray, query_genes: pd.Index,
                   min_gene_overlap: float) -> np.ndarray:
    """Where each reference gene is among the query's (-1: not measured). Raises, saying why,
    when fewer than ``min_gene_overlap`` of the reference's genes are there."""
    if not 0.0 < min_gene_overlap <= 1.0:
        msg = f"min_gene_overlap must be a fraction in (0, 1], got {min_gene_overlap!r}."
        raise ValueError(msg)
    query = pd.Index(np.asarray(query_genes, dtype=str))
    if query.has_duplicates:
        dup = query[query.duplicated()][:3].tolist()
        msg = (f"The query's gene names repeat (e.g. {dup}); make them unique first "
               "(adata_query.var_names_make_unique()).")
        raise ValueError(msg)
    positions = query.get_indexer(reference_genes)
    shared = int((positions >= 0).sum())
    if shared >= min_gene_overlap * len(reference_genes):
        return positions
    msg = (f"The query shares {shared} of the reference's {len(reference_genes)} genes "
           f"(min_gene_overlap={min_gene_overlap} needs at least "
           f"{int(np.ceil(min_gene_overlap * len(reference_genes)))}).")
    ref_ens, query_ens = _share(reference_genes, _ENSEMBL), _share(np.asarray(query), _ENSEMBL)
    if ref_ens < 0.5 <= query_ens:
        msg += (" The query's genes look like Ensembl IDs (e.g. "
                f"{query[0]!r}) and the reference's like gene symbols (e.g. "
                f"{reference_genes[0]!r}): name the query's genes by symbol, e.g. "
                "adata_query.var_names = adata_query.var['gene_symbols'].")
    elif query_ens < 0.5 <= ref_ens:
        msg += (" The reference's genes are Ensembl IDs (e.g. "
                f"{reference_genes[0]!r}) and the query's look like gene symbols (e.g. "
                f"{query[0]!r}): name the query's genes by Ensembl ID, e.g. "
                "adata_query.var_names = adata_query.var['gene_ids'].")
    else:
        upper = pd.Index(query.str.upper()).get_indexer(pd.Index(reference_genes).str.upper())
        if (upper >= 0).sum() >= 2 * max(shared, 1):
            msg += (f" Ignoring case, {int((upper >= 0).sum())} match: the two name genes in "
                    "different cases (another species' symbols, or a changed convention).")
        else:
            msg += " Is the query from the same species and gene annotation as the reference?"
    raise ValueError(msg)


def _read_columns(adata: AnnData, layer: str | None, where: str, columns: np.ndarray,
                  allow_non_integer: bool, rows: np.ndarray | None) -> sp.csr_matrix:
    """The counts of the genes ``columns`` (increasing) of the cells ``rows`` (a boolean
    mask; ``None``: all), checked, as float32 CSR in memory."""
    counts = checked_counts(adata, layer, where, allow_non_integer=allow_non_integer,
                            columns=columns)
    if isinstance(counts, RowReader):  # on disk: a block at a time, its rows taken
        return sp.vstack([block if rows is None else block[rows[lo:hi]]
                          for lo, hi, block in counts.blocks(BLOCK_ROWS)], format="csr")
    counts = sp.csr_matrix(counts, dtype=np.float32)
    return counts if rows is None else counts[rows]


def aligned_anndata(adata: AnnData, genes: np.ndarray, positions: np.ndarray, *,
                    layer: str | None, covariates: dict[str, str], allow_non_integer: bool,
                    source_layer=..., rows: np.ndarray | None = None,
                    name: str = "adata_query") -> AnnData:
    """A new AnnData of ``adata``'s cells (those of the mask ``rows``; ``None``: all) on the
    model's ``genes``: counts (CSR, in ``layers[layer]`` or ``X`` as the query's setup reads
    them; read from ``source_layer``, by default the same) of the genes at ``positions``, zero
    columns where it is -1, and ``obs`` with each covariate under the reference's name
    (``covariates``: reference name -> the column of ``adata`` that holds it). ``name`` is how
    messages call ``adata``."""
    source_layer = layer if source_layer is ... else source_layer
    where = f"{name}.X" if source_layer is None else f"{name}.layers[{source_layer!r}]"
    present = np.flatnonzero(positions >= 0)
    order = np.argsort(positions[present], kind="stable")  # read in the file's order
    read = _read_columns(adata, source_layer, where, positions[present][order],
                         allow_non_integer, rows)
    target = present[order]  # the model's column of each column read
    coo = read.tocoo()
    counts = sp.csr_matrix((coo.data, (coo.row, target[coo.col])),
                           shape=(read.shape[0], len(genes)), dtype=np.float32)
    cells = slice(None) if rows is None else rows
    obs = pd.DataFrame(index=adata.obs_names[cells].copy())
    for key, column in covariates.items():
        obs[key] = adata.obs[column].to_numpy()[cells]
    out = AnnData(X=counts if layer is None else None, obs=obs,
                  var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    if layer is not None:
        out.X = sp.csr_matrix(counts.shape, dtype=np.float32)
        out.layers[layer] = counts
    library = np.asarray(counts.sum(1)).ravel()
    if (library == 0).any():
        cell = obs.index[int(np.flatnonzero(library == 0)[0])]
        msg = (f"{int((library == 0).sum())} cell(s) of {name} have no counts in the model's "
               f"genes (first: {cell!r}); the model cannot place them. Remove them first, e.g. "
               f"{name} = {name}[counts_in_those_genes > 0].copy().")
        raise ValueError(msg)
    return out


def covariate_columns(setup: AnnDataSetup, adata: AnnData, batch_key: str | None
                      ) -> dict[str, str]:
    """For each covariate of the reference, the column of the query's ``obs`` that holds it:
    the reference's name, or ``batch_key`` for the batch."""
    if batch_key is not None and setup.batch_key is None:
        msg = (f"batch_key={batch_key!r} was given, but the reference was trained without a "
               "batch covariate: its decoder has no batch to add the query's to. Leave "
               "batch_key out (the query is then read as the reference's cells are), or "
               "train a reference with a batch_key.")
        raise ValueError(msg)
    columns = {}
    for key in setup.covariate_keys:
        column = batch_key if key == setup.batch_key and batch_key is not None else key
        if column not in adata.obs.columns:
            role = "the batch" if key == setup.batch_key else "a covariate"
            hint = (f" Name the query's batch column with batch_key=, or give the query one, "
                    f"e.g. adata_query.obs[{key!r}] = 'query'.") if key == setup.batch_key \
                else f" Give the query that column (adata_query.obs[{key!r}])."
            msg = (f"The reference models {role} {key!r}, which adata_query.obs lacks "
                   f"(columns: {list(adata.obs.columns)[:10]}).{hint}")
            raise KeyError(msg)
        obs_column(adata, column, "a covariate of the reference")  # no missing values
        columns[key] = column
    return columns


def query_setup(reference: AnnDataSetup, adata: AnnData, columns: dict[str, str],
                layer: str | None) -> AnnDataSetup:
    """The reference's setup with the query's counts ``layer`` and each covariate's new query
    categories appended (reference categories keep their codes; the new ones follow in sorted
    order)."""
    categories = []
    for key, known in zip(reference.covariate_keys, reference.categories, strict=True):
        values = adata.obs[columns[key]].astype(str).to_numpy()
        if key == reference.batch_key:
            check_batch_sizes(columns[key], values)
        else:
            warn_small_categories(columns[key], values)
        new = sorted(set(np.unique(values)) - set(known))
        categories.append(tuple(known) + tuple(new))
    return AnnDataSetup(layer=layer, batch_key=reference.batch_key,
                        covariate_keys=reference.covariate_keys, categories=tuple(categories),
                        allow_non_integer=reference.allow_non_integer, genes=None)


def warn_missing(missing: np.ndarray, n_genes: int) -> None:
    if missing.size:
        msg = (f"The query did not measure {missing.size} of the reference's {n_genes} genes "
               f"(e.g. {missing[:3].tolist()}); they are read as zeros by the encoder and left "
               "out of the likelihood.")
        warnings.warn(msg, UserWarning, stacklevel=3)


def check_query_layer(adata: AnnData, layer: str | None) -> None:
    if layer is not None and layer not in adata.layers:
        msg = (f"adata_query has no layer {layer!r}, where the reference read its counts; "
               f"pass layer= naming the query's raw counts (layers: {list(adata.layers)}; "
               "None for adata_query.X).")
        raise KeyError(msg)


def readable(adata: AnnData, setup: AnnDataSetup, var_names: np.ndarray,
             record: QueryRecord) -> AnnData:
    """``adata`` as a query's model reads it: itself when it has the model's genes in order
    and the covariates under the reference's names, else :func:`aligned_anndata`. Genes the
    query did not measure may be absent; any other missing gene is an error."""
    positions = pd.Index(np.asarray(adata.var_names, dtype=str)).get_indexer(var_names)
    lacking = (positions < 0) & ~np.isin(var_names, np.asarray(record.missing, dtype=str))
    if lacking.any():
        msg = (f"adata lacks {int(lacking.sum())} of the genes this query's model was trained "
               f"on (e.g. {var_names[lacking][:3].tolist()}); cells measured on other genes "
               "need their own query model: OmicVAE.load_query_data(adata, reference).")
        raise ValueError(msg)
    columns = {}
    for key, column in zip(setup.covariate_keys, record.columns, strict=True):
        if key in adata.obs.columns:
            columns[key] = key
        elif column in adata.obs.columns:
            columns[key] = column
        else:
            msg = (f"adata.obs has neither {key!r} nor {column!r}, the column of the model's "
                   f"covariate {key!r}.")
            raise KeyError(msg)
    in_order = len(positions) == adata.n_vars and (positions == np.arange(adata.n_vars)).all()
    if in_order and all(k == c for k, c in columns.items()):
        return adata
    return aligned_anndata(adata, var_names, positions, layer=setup.layer, covariates=columns,
                           allow_non_integer=setup.allow_non_integer)


@dataclass(frozen=True)
class HeldOut:
    """The cells a model's last training held out (its validation split): a reference's
    cells the model did not fit, against which a query's novelty is measured."""

    mask: np.ndarray  # (n_cells,) bool

    def to_dict(self) -> dict:
        bits = base64.b64encode(np.packbits(self.mask).tobytes()).decode("ascii")
        return {"n_cells": int(self.mask.size), "bits": bits}

    @classmethod
    def from_dict(cls, d: dict) -> HeldOut:
        packed = np.frombuffer(base64.b64decode(d["bits"]), dtype=np.uint8)
        return cls(np.unpackbits(packed, count=int(d["n_cells"])).astype(bool))


def query_layout(adata_query: AnnData, parts: ReferenceParts, layer: str | None,
                 batch_key: str | None, min_gene_overlap: float
                 ) -> tuple[str | None, np.ndarray, dict[str, str], AnnDataSetup]:
    """The checks both query entry points make, in the order a user fixes them: the
    query's counts layer, genes, covariates and the setup extended by its categories."""
    check_anndata_object(adata_query)
    if layer == "auto":
        ref_layer = parts.setup.layer
        layer = ref_layer if ref_layer is not None and ref_layer in adata_query.layers \
            else None
    check_query_layer(adata_query, layer)
    positions = gene_positions(parts.var_names, adata_query.var_names, min_gene_overlap)
    columns = covariate_columns(parts.setup, adata_query, batch_key)
    setup = query_setup(parts.setup, adata_query, columns, layer)
    warn_missing(parts.var_names[positions < 0], len(parts.var_names))
    return layer, positions, columns, setup


def make_query(module, var_names: np.ndarray, record: QueryRecord) -> None:
    """Make ``module`` (grafted from the reference) the query's: its unmeasured genes out of
    the likelihood, and only what ``record.unfreeze`` allows trainable."""
    missing = np.isin(var_names, np.asarray(record.missing, dtype=str))
    module.mask_genes(torch.as_tensor(missing))
    freeze(module, new_entries(module, record.reference_categories), record.unfreeze)
    module.eval()


@dataclass(frozen=True)
class QueryPlan:
    """What a query's model is built from, every check passed: the reference's parts, the
    setup extended by the query's categories, the record and the aligned query."""

    reference: ReferenceParts
    setup: AnnDataSetup
    record: QueryRecord
    aligned: AnnData


def plan_query(adata_query: AnnData, reference, *, layer: str | None, batch_key: str | None,
               min_gene_overlap: float, unfreeze: str = "new") -> QueryPlan:
    """Check a query against ``reference`` (a model or a saved folder) and align it."""
    if unfreeze not in UNFREEZE:
        msg = f"unfreeze={unfreeze!r} is not one of {list(UNFREEZE)}."
        raise ValueError(msg)
    parts = reference_parts(reference)
    layer, positions, columns, setup = query_layout(adata_query, parts, layer, batch_key,
                                                    min_gene_overlap)
    aligned = aligned_anndata(adata_query, parts.var_names, positions, layer=layer,
                              covariates=columns, allow_non_integer=setup.allow_non_integer)
    record = QueryRecord(reference_categories=parts.setup.n_categories,
                         missing=tuple(str(g) for g in parts.var_names[positions < 0]),
                         columns=tuple(columns[k] for k in setup.covariate_keys),
                         unfreeze=unfreeze)
    return QueryPlan(parts, setup, record, aligned)
