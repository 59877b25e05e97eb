"""Latent-space metrics against known labels (scikit-learn): k-means ARI / NMI and k-NN purity.

Cells whose label is ``unannotated`` (pbmc3k: 62 cells failing Seurat QC) or missing are
excluded before anything is computed, so they neither count as a cluster nor as neighbours.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import NearestNeighbors

UNANNOTATED = frozenset({"unannotated", "nan", ""})


def annotated_mask(labels: np.ndarray) -> np.ndarray:
    """True for cells carrying a real label (not missing, not ``unannotated``)."""
    as_str = np.char.lower(np.asarray(labels, dtype=object).astype(str))  # NaN -> "nan"
    return ~np.isin(as_str, list(UNANNOTATED))


def knn_purity(z: np.ndarray, labels: np.ndarray, *, k: int = 15) -> float:
    """Fraction of each cell's ``k`` nearest neighbours (self excluded) sharing its label, mean."""
    nn = NearestNeighbors(n_neighbors=k + 1).fit(z)
    idx = nn.kneighbors(z, return_distance=False)[:, 1:]  # (cells, k), column 0 is the cell
    return float((labels[idx] == labels[:, None]).mean())


def latent_metrics(
    z: np.ndarray, labels: np.ndarray, *, seed: int = 0, n_init: int = 20, k_nn: int = 15
) -> dict[str, float]:
    """k-means ARI and NMI (k = number of labels present) and k-NN purity, annotated cells only."""
    keep = annotated_mask(labels)
    z, labels = np.asarray(z, dtype=np.float64)[keep], np.asarray(labels, dtype=object)[keep]
    labels = labels.astype(str)
    n_types = len(np.unique(labels))
    clusters = KMeans(n_clusters=n_types, n_init=n_init, random_state=seed).fit_predict(z)
    return {
        "ari": float(adjusted_rand_score(labels, clusters)),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "knn_purity": knn_purity(z, labels, k=k_nn),
        "n_cells": int(keep.sum()),
        "k": n_types,
    }
