"""Per-cell anomaly scores of a fitted VAE, and the rules that turn scores into flags (the
doublet probability is in :mod:`._doublets`).

Pure torch and numpy on :class:`~omicvae_sc.data.CountTensors`; chunk sizes from the memory
policy's ``Pass.SCORES``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from omicvae_sc.data import CountTensors, stack_rows
from omicvae_sc.module import VAE, Pass, chunk_rows

DOUBLETS_PER_THOUSAND_CELLS = 0.008
"""10x Genomics' rule of thumb: about 0.8% of cells are doublets per 1,000 cells loaded."""

MAX_DOUBLET_RATE = 0.25

ANOMALY_DRAWS = 10
"""Generated cells per cell for the anomaly score (their mean and spread calibrate it)."""

ANOMALY_SAMPLES = 10
"""Importance samples per log p estimate of the anomaly score."""


def _chunk_size(n_columns: int, device: torch.device) -> int:
    return chunk_rows(n_columns, device, Pass.SCORES)


# ---------------------------------------------------------------------------- anomaly
@torch.no_grad()
def anomaly_scores(
    module: VAE, data: CountTensors, *, n_draws: int, n_samples: int
) -> torch.Tensor:
    """Predictive z-score per cell, ``(n_cells,)``: how much less likely the cell is than cells
    the model generates at its library size, in standard deviations of their log-likelihood
    (see :meth:`VAE.predictive_check`)."""
    width = (n_draws + 1) * n_samples * data.n_genes
    return stack_rows(data.n_cells, (
        module.predictive_check(x, codes, n_draws=n_draws, n_samples=n_samples).z_score
        for x, codes in data.batches(_chunk_size(width, data.device), shuffle=False)))


# ---------------------------------------------------------------------------- flags
@dataclass(frozen=True)
class Flags:
    """Which cells a rule flags, and the rule: written to ``uns`` as :meth:`to_dict`."""

    flagged: np.ndarray  # (cells,) bool
    rule: str  # "robust_cutoff" or "expected_rate"
    threshold: float  # cells scoring above it are flagged
    value: float  # n_mads for "robust_cutoff", the rate for "expected_rate"

    def to_dict(self) -> dict:
        return {"rule": self.rule, "threshold": self.threshold, "value": self.value,
                "n_flagged": int(self.flagged.sum())}


def default_doublet_rates(loading: np.ndarray) -> np.ndarray:
    """Each cell's prior doublet rate, ``(n_cells,)`` float64: 0.8% per 1,000 cells of its
    loading (10x Genomics' table; ``loading``: a code per cell, the batch when the model has
    one, else one code for all), at most 25%. A warning says when a loading reaches the cap
    (from 31,250 cells): the rule assumes that those cells were loaded together."""
    _, inverse, sizes = np.unique(loading, return_inverse=True, return_counts=True)
    rates = DOUBLETS_PER_THOUSAND_CELLS * sizes / 1000
    if (rates > MAX_DOUBLET_RATE).any():
        n_capped = int((rates > MAX_DOUBLET_RATE).sum())
        msg = (f"The default doublet rate, 0.8% per 1,000 cells loaded together, is capped at "
               f"25% for {n_capped} loading{'' if n_capped == 1 else 's'} of more than "
               f"31,250 cells (the largest: {int(sizes.max()):,} cells); it assumes each "
               "batch is one loading. For cells of many loadings, set up the model with the "
               "sample as batch_key, pass doublet_rate= (get_doublet_score: expected_rate=), "
               "or doublets=False.")
        warnings.warn(msg, UserWarning, stacklevel=3)
    return np.minimum(rates, MAX_DOUBLET_RATE)[inverse.ravel()]


def check_rate(name: str, value: float | None) -> None:
    if value is not None and not 0.0 < value < 0.5:
        msg = (f"{name} must be a fraction of cells in (0, 0.5), got {value!r}; e.g. 0.05 flags "
               "the 5% highest-scoring cells.")
        raise ValueError(msg)


def check_n_mads(n_mads: float) -> None:
    if not n_mads > 0:
        msg = f"n_mads must be positive, got {n_mads!r}; the default is 3."
        raise ValueError(msg)


def flag_top_fraction(scores: np.ndarray, rate, groups: np.ndarray | None = None) -> Flags:
    """Flag exactly the ``ceil(rate * n)`` highest scores of each group (``groups``: a code per
    cell; ``None``: one group), ``rate`` a fraction or each cell's (the same within a group);
    ties at a group's threshold go to the cells that come first. The rule records the mean
    rate and the lowest flagged score."""
    rates = np.broadcast_to(np.asarray(rate, dtype=np.float64), scores.shape)
    flagged = np.zeros(len(scores), dtype=bool)
    members_of = [np.arange(len(scores))] if groups is None else \
        [np.flatnonzero(groups == g) for g in np.unique(groups)]
    for members in members_of:
        n_flag = math.ceil(rates[members[0]] * len(members))
        flagged[members[np.argsort(-scores[members], kind="stable")[:n_flag]]] = True
    threshold = float(scores[flagged].min()) if flagged.any() else math.inf
    value = rates[0] if (rates == rates[0]).all() else rates.mean()  # a rate given stays exact
    return Flags(flagged=flagged, rule="expected_rate", threshold=threshold, value=float(value))


def flag_robust(scores: np.ndarray, n_mads: float) -> Flags:
    """Flag scores above median + ``n_mads`` x the scaled median absolute deviation (1.4826 MAD,
    which is the standard deviation for normal scores)."""
    median = float(np.median(scores))
    mad = 1.4826 * float(np.median(np.abs(scores - median)))
    threshold = median + n_mads * mad
    return Flags(flagged=scores > threshold, rule="robust_cutoff", threshold=threshold,
                 value=float(n_mads))
