"""``map_query``: a query's cells placed on a trained reference in one call: query surgery and
training (``OmicVAE.load_query_data``), the shared latent, labels from the reference's
neighbours (``tl.transfer_labels``) and the cells the reference does not explain
(:mod:`omicvae_sc.model._novelty`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.spatial import cKDTree

from omicvae_sc.data import (
    check_anndata_object,
    check_key_added,
    holds_disk_arrays,
)
from omicvae_sc.data._writeback import write_keys
from omicvae_sc.model import (
    NOVELTY_ALPHA,
    NOVELTY_NEIGHBORS,
    Novelty,
    OmicVAE,
    aligned_anndata,
    combine_novelty,
    neighbour_distance_ratio,
)
from omicvae_sc.tl._transfer import check_vote, write_labels

MIN_CALIBRATION = 10
"""Fewest held-out reference cells that calibrate novelty (fewer: a random tenth, warned)."""

CALIBRATION_SHARE = 0.1
"""Share of the reference taken as calibration cells when the reference model does not say
which cells its training held out."""


def _reference_model(reference, adata_ref: AnnData, device) -> OmicVAE:
    if isinstance(reference, OmicVAE):
        return reference
    return OmicVAE.load(Path(reference), adata_ref, device=device)


def _calibration_cells(model: OmicVAE, n_ref: int, seed: int) -> np.ndarray:
    """The reference cells its training held out (a boolean mask), or a random tenth with a
    warning when the model does not record them for this many cells."""
    held = model.held_out_cells
    if held is not None and held.size == n_ref and held.sum() >= MIN_CALIBRATION:
        return held
    msg = ("The reference model does not record which of these reference cells its training "
           "held out (it was trained on other cells, loaded from an older file, or with "
           "validation_fraction=0), so novelty is calibrated on a random tenth of the "
           "reference, which the model was trained on: expect more than novelty_alpha of the "
           "query's known cells to be flagged. Train the reference with "
           "validation_fraction > 0 and pass its own cells as adata_ref.")
    warnings.warn(msg, UserWarning, stacklevel=3)
    mask = np.zeros(n_ref, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n_ref)[:max(MIN_CALIBRATION, round(
        CALIBRATION_SHARE * n_ref))]] = True
    return mask


def _as_query(adata_ref: AnnData, reference: OmicVAE, query: OmicVAE,
              cells: np.ndarray) -> AnnData:
    """Reference ``cells`` (a mask) as the query measured them: the genes the query did not
    measure zeroed, counts where the query's model reads them."""
    positions = pd.Index(np.asarray(adata_ref.var_names, dtype=str)).get_indexer(
        reference.var_names)
    if (positions < 0).any():
        msg = "adata_ref lacks genes of the reference model; pass the AnnData it was trained on."
        raise ValueError(msg)
    positions[np.isin(reference.var_names, np.asarray(query.missing_genes, dtype=str))] = -1
    return aligned_anndata(adata_ref, reference.var_names, positions,
                           layer=query.setup.layer, source_layer=reference.setup.layer,
                           covariates={k: k for k in reference.setup.covariate_keys},
                           allow_non_integer=reference.setup.allow_non_integer, rows=cells,
                           name="adata_ref")


def _novelty(query: OmicVAE, reference: OmicVAE, adata_query: AnnData, adata_ref: AnnData,
             *, z_ref: np.ndarray, z_query: np.ndarray, alpha: float, seed: int) -> Novelty:
    """The anomaly score comes from the query's trained model, which has learned the query's
    batch. Scored with the reference's weights before query training (the new batch at the
    mean of the reference's), the withheld type of pbmc3k and CellBench ranked 0.05 to 0.15
    AUPRC higher, but half the cells of a strongly shifted synthetic batch, all of known
    types, were flagged: the batch effect read as novelty (benchmarks/README.md, "Mapping
    onto a reference")."""
    cal = _calibration_cells(reference, adata_ref.n_obs, seed)
    cal_view = _as_query(adata_ref, reference, query, cal)
    tree = cKDTree(z_ref[~cal])
    k = min(NOVELTY_NEIGHBORS, int((~cal).sum()))
    z_cal = query.get_latent_representation(cal_view)
    calibration = np.column_stack([
        query.get_anomaly_score(cal_view, seed=seed),
        neighbour_distance_ratio(z_ref[~cal], z_cal, k, tree)])
    statistics = np.column_stack([
        query.get_anomaly_score(adata_query, seed=seed),
        neighbour_distance_ratio(z_ref[~cal], z_query, k, tree)])
    return combine_novelty(calibration, statistics, alpha)


def _check(adata_query, adata_ref, labels_key, *, novelty_alpha, key_added, n_neighbors,
           unknown_above) -> None:
    check_anndata_object(adata_query)
    check_key_added(key_added)
    if adata_ref is not None:
        check_anndata_object(adata_ref)
    if labels_key is not None:
        if adata_ref is None:
            msg = (f"labels_key={labels_key!r} names labels of the reference's cells; pass "
                   "them as adata_ref= (the AnnData the reference was trained on).")
            raise ValueError(msg)
        check_vote(adata_ref, labels_key, n_neighbors, unknown_above)
    if not 0.0 < novelty_alpha < 1.0:
        msg = f"novelty_alpha must be in (0, 1), got {novelty_alpha!r}; the default is 0.01."
        raise ValueError(msg)


def map_query(
    adata_query: AnnData, reference: OmicVAE | str | Path, *, adata_ref: AnnData | None = None,
    labels_key: str | None = None, batch_key: str | None = None, layer: str | None = "auto",
    unfreeze: str = "new", max_epochs: int | None = None, novelty: bool = True,
    novelty_alpha: float = NOVELTY_ALPHA, n_neighbors: int = 15, unknown_above: float = 0.5,
    key_added: str = "omicvae", seed: int = 0, progress_bar: bool = True,
    train_kwargs: dict | None = None, save_model: str | Path | None = None, copy: bool = False,
) -> AnnData | None:
    """Map a query's cells onto a trained reference, label them and flag novel cells.

    The query gets the reference's latent, labels with an uncertainty, and a flag on the
    cells the reference does not explain.

    1. :meth:`OmicVAE.load_query_data` grafts the query's new batches onto the reference
       (genes found by name, unmeasured ones zero-filled and left out of the likelihood);
       :meth:`OmicVAE.train` fits what ``unfreeze`` allows (with ``"new"`` and no new
       category there is nothing to fit, and the reference is used as it is).
    2. The query's latent goes to ``adata_query.obsm['X_<key_added>']``; with ``adata_ref``,
       the reference's latent (from the reference model) to ``adata_ref.obsm`` under the same
       key, so ``sc.pp.neighbors(use_rep='X_omicvae')`` on ``anndata.concat([adata_ref,
       adata_query])`` shows both in one embedding (:func:`omicvae_sc.pl.mapping`).
    3. With ``labels_key``, :func:`transfer_labels` writes ``obs['<key>_label']`` and
       ``obs['<key>_label_uncertainty']``.
    4. With ``adata_ref`` and ``novelty``, each query cell's novelty from two statistics:
       its anomaly score under the query's model (which has learned the query's batch) and
       its mean latent distance to the 15 nearest reference cells over those cells' own
       spacing (a local outlier factor). Each becomes an empirical p-value against the
       reference cells the reference model held out of training, read as the query measured
       them (beyond their range an exponential tail carries it lower), after the query's
       median is brought down to theirs where it lies above (the query's batch moves all its
       cells alike; most of them are assumed of reference types). Fisher's method combines
       the two, and the combination gets its own empirical p-value. Writes
       ``obs['<key>_novelty_score']`` (Fisher's statistic, larger is more novel),
       ``obs['<key>_novelty_pvalue']`` and ``obs['<key>_is_novel']`` (p-value at most
       ``novelty_alpha``: about that share of the query's cells of reference types are
       flagged; 1.2% and 0.9% at the default 1% on pbmc3k and CellBench; a strong new batch
       the frozen encoder never saw raises it, which ``unfreeze="encoder_first_layer"``
       mends).

    ``uns['<key>_mapping']`` records the settings and figures. Bad input raises before
    anything is trained or written. The query's model can be kept with ``save_model`` and
    loaded with ``OmicVAE.load(path, adata_query)``.

    Parameters
    ----------
    adata_query
        The query's cells with raw counts, genes named as the reference's.
    reference
        A trained :class:`OmicVAE` or the folder it was saved to.
    adata_ref
        The reference's cells (the AnnData it was trained on, in the same order): for labels,
        novelty and a joint embedding.
    labels_key
        ``adata_ref.obs`` column of the labels to transfer.
    batch_key, layer, unfreeze
        As in :meth:`OmicVAE.load_query_data`.
    max_epochs
        Query training epochs (``None``: as :meth:`OmicVAE.train`, with early stopping).
    novelty
        Score and flag novel cells (needs ``adata_ref``).
    novelty_alpha
        Flag cells whose novelty p-value is at most this.
    n_neighbors, unknown_above
        As in :func:`transfer_labels`.
    key_added
        Prefix of every key written.
    seed
        Seeds training and the scores' draws.
    progress_bar
        Show the training bar.
    train_kwargs
        Further arguments of :meth:`OmicVAE.train`.
    save_model
        Save the query's model to this new folder.
    copy
        Write into a copy of ``adata_query`` and return it; ``adata_ref`` is then left as it
        is too (its latent is computed, not written). Not for a query whose counts are on
        disk (the results go into the object in memory; the file is not changed).

    Returns
    -------
    With ``copy=True`` the mapped copy of ``adata_query``, else ``None``.
    """
    _check(adata_query, adata_ref, labels_key, novelty_alpha=novelty_alpha,
           key_added=key_added, n_neighbors=n_neighbors, unknown_above=unknown_above)
    if save_model is not None and Path(save_model).exists():
        msg = f"save_model folder {str(save_model)!r} already exists; choose a new one."
        raise FileExistsError(msg)
    if copy and holds_disk_arrays(adata_query):
        msg = ("copy=True cannot copy an AnnData whose counts are on disk (backed, or from "
               "ov.read_lazy). Leave copy=False: the results go into the object in memory "
               "and the file is not changed; or load it first with adata_query.to_memory().")
        raise ValueError(msg)
    if copy:  # adata_ref is then only read
        adata_query = adata_query.copy()
    query = OmicVAE.load_query_data(adata_query, reference, layer=layer, batch_key=batch_key,
                                    unfreeze=unfreeze)
    trained = any(p.requires_grad for p in query.module.parameters())  # anything new?
    if trained:
        query.train(max_epochs, seed=seed, progress_bar=progress_bar, **(train_kwargs or {}))
    rep = f"X_{key_added}"
    z_query = query.get_latent_representation(adata_query)
    write_keys(adata_query, obsm={rep: z_query})
    record = {"reference": str(reference) if isinstance(reference, str | Path)
              else "model", "unfreeze": unfreeze, "trained": trained,
              "epochs": len(query.history), "n_missing_genes": len(query.missing_genes)}
    if adata_ref is not None:
        ref_model = _reference_model(reference, adata_ref, query.device)
        z_ref = ref_model.get_latent_representation(adata_ref)
        if not copy:
            write_keys(adata_ref, obsm={rep: z_ref})
        if labels_key is not None:
            write_labels(adata_query, z_ref, adata_ref.obs[labels_key], z_query,
                         labels_key=labels_key, use_rep=rep, n_neighbors=n_neighbors,
                         unknown_above=unknown_above, key_added=key_added, seed=seed)
        if novelty:
            found = _novelty(query, ref_model, adata_query, adata_ref, z_ref=z_ref,
                             z_query=z_query, alpha=novelty_alpha, seed=seed)
            write_keys(adata_query, obs={f"{key_added}_novelty_score": found.score,
                                         f"{key_added}_novelty_pvalue": found.pvalue,
                                         f"{key_added}_is_novel": found.flagged})
            record["novelty"] = found.to_dict()
    elif novelty:
        msg = ("Novelty needs the reference's cells: pass adata_ref= to score and flag query "
               "cells the reference does not explain.")
        warnings.warn(msg, UserWarning, stacklevel=2)
    write_keys(adata_query, uns={f"{key_added}_mapping": record})
    if save_model is not None:
        query.save(save_model)
    return adata_query if copy else None
