"""Argument checks and look-ups of the model class; each error says what was found and what
to do next."""

from __future__ import annotations

import numpy as np
import pandas as pd

from omicvae_sc.data import AnnDataSetup
from omicvae_sc.module import DISPERSIONS, LIKELIHOODS


def check_hyperparameters(hparams: dict, setup: AnnDataSetup) -> None:
    """Reject hyperparameters the model cannot be built with."""
    if hparams["likelihood"] not in LIKELIHOODS:
        msg = f"likelihood={hparams['likelihood']!r} is not one of {list(LIKELIHOODS)}."
        raise ValueError(msg)
    if hparams["dispersion"] not in DISPERSIONS:
        msg = f"dispersion={hparams['dispersion']!r} is not one of {list(DISPERSIONS)}."
        raise ValueError(msg)
    if hparams["dispersion"] == "gene-batch" and setup.batch_key is None:
        msg = "dispersion='gene-batch' needs a batch; run setup_anndata with batch_key=."
        raise ValueError(msg)
    for key in ("n_latent", "n_hidden", "n_layers"):
        if not isinstance(hparams[key], int | np.integer) or hparams[key] < 1:
            msg = f"{key} must be a positive integer, got {hparams[key]!r}."
            raise ValueError(msg)
    if not 0.0 <= hparams["dropout_rate"] < 1.0:
        msg = f"dropout_rate must be in [0, 1), got {hparams['dropout_rate']!r}."
        raise ValueError(msg)


def check_count(name: str, value: int, *, minimum: int = 1) -> None:
    """``value`` must be an integer of at least ``minimum`` (sample and draw counts)."""
    if not isinstance(value, int | np.integer) or value < minimum:
        msg = f"{name} must be an integer >= {minimum}, got {value!r}."
        raise ValueError(msg)


def check_same_genes(expected: np.ndarray, found: pd.Index, *,
                     subset: str = "adata = adata[:, model.var_names].copy()") -> None:
    """The model's genes, in the model's order, must be the AnnData's genes.

    ``subset`` is the line the message suggests, written with objects the user has at that
    point (on load there is no ``model`` yet).
    """
    found = np.asarray(found, dtype=str)
    if len(found) == len(expected) and not (found != expected).any():
        return
    if len(found) != len(expected):
        msg = f"adata has {len(found)} genes but the model was trained on {len(expected)}. "
    else:
        mismatch = np.flatnonzero(found != expected)
        i = int(mismatch[0])
        msg = (f"adata's genes differ from the model's ({mismatch.size} positions; first at "
               f"{i}: {str(found[i])!r} where the model has {str(expected[i])!r}). ")
    missing = np.setdiff1d(expected, found)
    if missing.size:
        msg += (f"{missing.size} of the model's genes are not in adata (e.g. "
                f"{missing[:3].tolist()}), so subsetting cannot help: use an AnnData with every "
                "gene the model was trained on (the full matrix, before genes were selected).")
    else:
        msg += f"Reorder or subset adata to the model's genes first: `{subset}`."
    raise ValueError(msg)


def model_columns(expected: np.ndarray, found: pd.Index) -> np.ndarray | None:
    """Positions of the model's genes ``expected`` among the AnnData's genes ``found``
    (``None`` when they are exactly its genes, in order); raises naming missing genes."""
    found = pd.Index(np.asarray(found, dtype=str))
    index = found.get_indexer(expected)
    if (index < 0).any():
        missing = expected[index < 0]
        msg = (f"{missing.size} of the model's {len(expected)} genes are not in adata (e.g. "
               f"{missing[:3].tolist()}); use an AnnData with every gene the model was "
               "trained on.")
        raise ValueError(msg)
    if len(index) == len(found) and (index == np.arange(len(found))).all():
        return None
    return index


def validation_split(
    n: int, fraction: float, early_stopping: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) cell indices; the validation share drawn with ``seed``."""
    held_out = validation_mask(n, fraction, early_stopping, seed)
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def validation_mask(n: int, fraction: float, early_stopping: bool, seed: int) -> np.ndarray:
    """Which of ``n`` cells are held out for validation (a boolean mask, one byte a cell: the
    form streaming from disk keeps); the cells :func:`validation_split` holds out."""
    if not 0.0 <= fraction < 1.0:
        msg = f"validation_fraction must be in [0, 1), got {fraction}."
        raise ValueError(msg)
    n_val = round(n * fraction)
    if early_stopping and n_val == 0:
        msg = (f"early_stopping=True needs a validation split, but validation_fraction={fraction} "
               f"of {n} cells holds out none; raise validation_fraction.")
        raise ValueError(msg)
    if n - n_val < 2:
        msg = f"Training needs at least 2 cells outside the validation split; found {n - n_val}."
        raise ValueError(msg)
    held_out = np.zeros(n, dtype=bool)
    if n_val:
        held_out[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return held_out


def gene_columns(var_names: np.ndarray, gene_list: list[str] | None) -> np.ndarray:
    if gene_list is None:
        return np.arange(len(var_names))
    index = {g: i for i, g in enumerate(var_names)}
    missing = [g for g in gene_list if g not in index]
    if missing:
        msg = f"gene_list names genes the model does not have: {missing[:5]}."
        raise KeyError(msg)
    return np.asarray([index[g] for g in gene_list])


def batch_code_of(setup: AnnDataSetup, transform_batch: str | None) -> int | None:
    if transform_batch is None:
        return None
    if setup.batch_key is None:
        msg = "transform_batch needs a model set up with batch_key=."
        raise ValueError(msg)
    cats = list(setup.categories[0])
    if str(transform_batch) not in cats:
        msg = f"transform_batch={transform_batch!r} is not a known batch; known: {cats[:10]}."
        raise ValueError(msg)
    return cats.index(str(transform_batch))
