"""How novel a query cell is for a reference: two statistics, each turned into an empirical
(conformal) p-value against reference cells the model did not train on, combined by Fisher's
method, and the combination given its own empirical p-value.

The two statistics are larger for cells the reference does not explain:

- the predictive anomaly score (``OmicVAE.get_anomaly_score``): how much less likely the
  cell's counts are than counts the model generates at its depth;
- the mean latent distance to the ``k`` nearest reference cells the model trained on, over the
  same distance among those reference cells (:func:`neighbour_distance_ratio`, a local
  outlier factor).

For a calibration cell (a reference cell held out of training, so exchangeable with query
cells of reference types) the p-value of a statistic against the other calibration cells is
uniform, and so is the query cell's against all of them; a cell of a type the reference never
saw gets small p-values. Beyond the largest calibration value, where a conformal p-value stops
at ``1 / (n + 1)``, an exponential tail fitted to the calibration's top tenth carries it lower
(:func:`empirical_pvalues`), so that small references can flag cells at 1%.
Fisher's statistic ``-2 (log p1 + log p2)`` combines them; it is not
chi-squared here (the two are correlated), which is why it gets its own empirical p-value
from the calibration cells' statistics. Flagging p <= alpha flags about alpha of the query's
cells of reference types, when they resemble the calibration cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

NOVELTY_ALPHA = 0.01
"""Default flag rule: p-value at most 1%, so about 1% of cells of reference types are flagged."""

NOVELTY_NEIGHBORS = 15
"""Reference cells whose mean latent distance makes the distance statistic."""


TAIL_SHARE = 0.1
"""Share of the calibration values (at least :data:`TAIL_MIN` of them) whose excess over the
rest fits the exponential tail beyond the largest calibration value."""

TAIL_MIN = 5


def empirical_pvalues(calibration: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``(1 + #{calibration >= v}) / (1 + n)`` for each value ``v`` (the conformal p-value of
    a larger-is-more-novel statistic) and, beyond the largest calibration value, an
    exponential tail.

    The conformal p-value cannot fall below ``1 / (n + 1)``: with 50 calibration cells no cell
    could be flagged at 1%. Beyond the calibration's range the p-value keeps falling as an
    exponential fitted to the top ``TAIL_SHARE`` of the calibration values (peaks over a
    threshold ``u``: ``p = k / (n + 1) * exp(-(v - u) / mean excess)``), never above the
    conformal value. Within the range it is the conformal p-value itself."""
    ordered = np.sort(np.asarray(calibration, dtype=np.float64))
    values = np.asarray(values, dtype=np.float64)
    n = len(ordered)
    at_least = n - np.searchsorted(ordered, values, side="left")
    pvalues = (1.0 + at_least) / (1.0 + n)
    k = min(n - 1, max(TAIL_MIN, int(np.ceil(TAIL_SHARE * n))))
    beyond = values > ordered[-1]
    if k < 1 or not beyond.any():
        return pvalues
    threshold = ordered[n - k - 1]
    scale = float(np.mean(ordered[n - k:] - threshold))
    if scale <= 0:
        return pvalues
    tail = k / (n + 1.0) * np.exp(-(values[beyond] - threshold) / scale)
    pvalues[beyond] = np.minimum(pvalues[beyond], tail)
    return pvalues


def left_out_pvalues(calibration: np.ndarray) -> np.ndarray:
    """Each calibration value's p-value against the others (itself left out)."""
    ordered = np.sort(calibration)
    at_least = len(ordered) - np.searchsorted(ordered, calibration, side="left") - 1
    return (1.0 + at_least) / len(ordered)


def neighbour_distance_ratio(reference: np.ndarray, cells: np.ndarray, k: int,
                             tree: cKDTree | None = None) -> np.ndarray:
    """How far each of ``cells`` sits from the reference, against how far the reference's
    cells sit from each other there: its mean Euclidean distance to its ``k`` nearest
    ``reference`` cells, over the mean of the same for those ``k`` cells (each to its own
    ``k`` nearest others). A simplified local outlier factor: about 1 inside the reference,
    above it off it, whether the region is dense (a common type) or sparse (a rare one).
    Only the reference cells that are someone's neighbours are looked up."""
    tree = cKDTree(reference) if tree is None else tree
    dist, idx = tree.query(cells, k=k, workers=-1)
    dist, idx = dist.reshape(len(cells), k), idx.reshape(len(cells), k)
    used = np.unique(idx)
    own = tree.query(reference[used], k=k + 1, workers=-1)[0].reshape(len(used), k + 1)
    spacing = np.zeros(len(reference))
    spacing[used] = own[:, 1:].mean(axis=1)  # itself (distance 0) left out
    local = spacing[idx].mean(axis=1)
    return dist.mean(axis=1) / np.maximum(local, np.finfo(np.float64).tiny)


@dataclass(frozen=True)
class Novelty:
    """Per-cell novelty of a query, and how it was measured."""

    score: np.ndarray  # Fisher's statistic of the two p-values; larger is more novel
    pvalue: np.ndarray  # its empirical p-value against the calibration cells
    flagged: np.ndarray  # pvalue <= alpha
    alpha: float
    n_calibration: int
    calibration_flagged: float  # share of calibration cells flagged by the same rule

    def to_dict(self) -> dict:
        return {"rule": "empirical_pvalue", "alpha": self.alpha,
                "n_calibration": self.n_calibration, "n_flagged": int(self.flagged.sum()),
                "calibration_flagged": self.calibration_flagged,
                "statistics": ["anomaly_score", "latent_neighbour_distance_ratio"]}


def centred_on_calibration(calibration: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``query`` with each column lowered by how far its median lies above the calibration's
    median (never raised): the query's own batch, which its model can absorb only in part,
    moves every cell's statistics alike, and most of a query's cells are of reference types,
    so its median estimates where cells of reference types sit. Ranks within the query are
    unchanged; a query of mostly novel cells gets fewer flags, never more."""
    shift = np.median(query, axis=0) - np.median(calibration, axis=0)
    return query - np.maximum(shift, 0.0)


def combine_novelty(calibration: np.ndarray, query: np.ndarray, alpha: float) -> Novelty:
    """Novelty of query cells from statistics ``(cells, m)`` of the query and of the
    calibration cells (columns: larger is more novel)."""
    query = centred_on_calibration(calibration, query)
    n_cal = calibration.shape[0]
    log_q = np.zeros(query.shape[0])
    log_cal = np.zeros(n_cal)
    for j in range(calibration.shape[1]):
        log_q += np.log(empirical_pvalues(calibration[:, j], query[:, j]))
        log_cal += np.log(left_out_pvalues(calibration[:, j]))
    score_q, score_cal = -2.0 * log_q, -2.0 * log_cal
    pvalue = empirical_pvalues(score_cal, score_q)
    cal_p = left_out_pvalues(score_cal)
    return Novelty(score=score_q, pvalue=pvalue, flagged=pvalue <= alpha, alpha=float(alpha),
                   n_calibration=int(n_cal),
                   calibration_flagged=float((cal_p <= alpha).mean()))
