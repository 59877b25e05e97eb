"""How novel a query cell is for a reference: two statistics, each turned into an empirical
(conformal) p-value against reference cells the model did not train on, combined by Fisher's
method, and the combination given its own empirical p-value.

The two statistics are larger for cells the reference does not explain:

- the predictive anomaly score (``OmicVAE.get_anomaly_score``): how much less likely the
  cell's counts are than counts the model generates at its depth;
- the mean latent distance to the ``k`` nearest reference cells the model trained on.

For a calibration cell (a reference cell held out of training, so exchangeable with query
cells of reference types) the p-value of a statistic against the other calibration cells is
uniform, and so is the query cell's against all of them; a cell of a type the reference never
saw gets small p-values. Fisher's statistic ``-2 (log p1 + log p2)`` combines them; it is not
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
"""Reference cells whose mean latent distance is the distance statistic."""


def empirical_pvalues(calibration: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``(1 + #{calibration >= v}) / (1 + n)`` for each value ``v``: the conformal p-value of
    a larger-is-more-novel statistic."""
    ordered = np.sort(calibration)
    at_least = len(ordered) - np.searchsorted(ordered, values, side="left")
    return (1.0 + at_least) / (1.0 + len(ordered))


def left_out_pvalues(calibration: np.ndarray) -> np.ndarray:
    """Each calibration value's p-value against the others (itself left out)."""
    ordered = np.sort(calibration)
    at_least = len(ordered) - np.searchsorted(ordered, calibration, side="left") - 1
    return (1.0 + at_least) / len(ordered)


def mean_neighbour_distance(reference: np.ndarray, cells: np.ndarray, k: int,
                            tree: cKDTree | None = None) -> np.ndarray:
    """Mean Euclidean distance of each of ``cells`` to its ``k`` nearest ``reference`` cells."""
    tree = cKDTree(reference) if tree is None else tree
    dist = tree.query(cells, k=k, workers=-1)[0]
    return np.asarray(dist, dtype=np.float64).reshape(len(cells), k).mean(axis=1)


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
                "statistics": ["anomaly_score", "latent_neighbour_distance"]}


def combine_novelty(calibration: np.ndarray, query: np.ndarray, alpha: float) -> Novelty:
    """Novelty of query cells from statistics ``(cells, m)`` of the query and of the
    calibration cells (columns: larger is more novel)."""
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
