"""Labels moved from a reference to a query through a shared latent, with an uncertainty that
means what it says.

Each query cell takes a distance-weighted vote of its ``n_neighbors`` nearest reference cells
(a Gaussian kernel whose width is the cell's median neighbour distance, so the vote adapts to
dense and sparse regions alike). ``1 - (share of the winning label)`` is a raw uncertainty; it
ranks cells well but is not a probability of being wrong. The reference calibrates it: every
labelled reference cell is voted on by its own neighbours (itself left out), and a monotone
(isotonic) fit of "the vote was wrong" against the raw uncertainty maps a raw value to the share
of such cells that were wrong. Above ``unknown_above`` a cell is labelled ``"Unknown"``.

How good the calibration is gets measured, not assumed: the reference is cut in two halves,
each half's fit is scored on the other half (expected calibration error over ten bins), and the
figure is written beside the labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.spatial import cKDTree

from omicvae_sc.data import check_anndata_object, check_key_added
from omicvae_sc.data._writeback import write_keys

UNKNOWN = "Unknown"
"""The label of query cells whose calibrated uncertainty is above ``unknown_above``."""


@dataclass(frozen=True)
class Calibration:
    """A non-decreasing map from raw vote uncertainty to the observed share of wrong votes."""

    raw: np.ndarray  # sorted knots
    error: np.ndarray  # fitted error rate at each knot

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        return np.interp(raw, self.raw, self.error)

    @classmethod
    def fit(cls, raw: np.ndarray, wrong: np.ndarray) -> Calibration:
        """Isotonic regression of ``wrong`` (0/1) on ``raw`` (pool adjacent violators)."""
        order = np.argsort(raw, kind="stable")
        x, y = raw[order], wrong[order].astype(np.float64)
        # blocks of equal x first (ties share one fitted value), then pooled while decreasing
        keys, first = np.unique(x, return_index=True)
        sums = np.add.reduceat(y, first)
        counts = np.diff(np.append(first, len(x))).astype(np.float64)
        means, weights, knots = [], [], []
        for key, s, c in zip(keys, sums, counts, strict=True):
            means.append(s / c)
            weights.append(c)
            knots.append([key])
            while len(means) > 1 and means[-2] > means[-1]:
                w = weights[-2] + weights[-1]
                means[-2] = (means[-2] * weights[-2] + means[-1] * weights[-1]) / w
                weights[-2] = w
                knots[-2] += knots[-1]
                del means[-1], weights[-1], knots[-1]
        raw_knots = np.concatenate([[k[0], k[-1]] for k in knots])
        error = np.repeat(means, 2)
        return cls(raw=raw_knots, error=np.clip(error, 0.0, 1.0))


def expected_calibration_error(uncertainty: np.ndarray, wrong: np.ndarray,
                               n_bins: int = 10) -> float:
    """Mean over equal-width bins of |mean uncertainty - share wrong|, weighted by cells."""
    bins = np.minimum((uncertainty * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.sum() * abs(uncertainty[inside].mean() - wrong[inside].mean())
    return float(total / len(uncertainty))


def neighbour_votes(reference: np.ndarray, codes: np.ndarray, n_labels: int,
                    cells: np.ndarray, n_neighbors: int, *, tree: cKDTree | None = None,
                    leave_self_out: bool = False) -> np.ndarray:
    """``(cells, n_labels)`` label shares of each cell's distance-weighted neighbour vote
    among ``reference`` (labels ``codes``); with ``leave_self_out``, ``cells`` are the
    reference itself and each is left out of its own vote."""
    tree = cKDTree(reference) if tree is None else tree
    k = n_neighbors + int(leave_self_out)
    dist, idx = tree.query(cells, k=k, workers=-1)
    dist, idx = dist.reshape(len(cells), k), idx.reshape(len(cells), k)
    if leave_self_out:  # drop the cell itself (its own column, wherever ties put it)
        own = idx == np.arange(len(cells))[:, None]
        own[~own.any(axis=1), -1] = True  # a duplicate point took its place: drop the last
        keep = ~own
        dist = dist[keep].reshape(len(cells), n_neighbors)
        idx = idx[keep].reshape(len(cells), n_neighbors)
    width = np.median(dist, axis=1, keepdims=True)
    width = np.where(width > 0, width, 1.0)
    weight = np.exp(-0.5 * (dist / width) ** 2)
    votes = np.zeros((len(cells), n_labels))
    rows = np.repeat(np.arange(len(cells)), n_neighbors)
    np.add.at(votes, (rows, codes[idx].ravel()), weight.ravel())
    return votes / votes.sum(axis=1, keepdims=True)


def _reference_calibration(z: np.ndarray, codes: np.ndarray, n_labels: int,
                           n_neighbors: int, tree: cKDTree, seed: int
                           ) -> tuple[Calibration, dict]:
    """The calibration fitted on every reference cell's left-out vote, and how well it holds:
    each half's fit scored on the other half."""
    votes = neighbour_votes(z, codes, n_labels, z, n_neighbors, tree=tree, leave_self_out=True)
    raw = 1.0 - votes.max(axis=1)
    wrong = votes.argmax(axis=1) != codes
    half = np.random.default_rng(seed).permutation(len(z)) % 2 == 0
    calibrated = np.empty(len(z))
    for side in (half, ~half):
        calibrated[~side] = Calibration.fit(raw[side], wrong[side])(raw[~side])
    report = {"reference_accuracy": float(1.0 - wrong.mean()),
              "expected_calibration_error": expected_calibration_error(calibrated, wrong),
              "mean_uncertainty": float(calibrated.mean()), "error_rate": float(wrong.mean())}
    return Calibration.fit(raw, wrong), report


def _check(adata_ref: AnnData, adata_query: AnnData, labels_key: str, use_rep: str,
           n_neighbors: int, unknown_above: float, key_added: str) -> None:
    for name, adata in (("adata_ref", adata_ref), ("adata_query", adata_query)):
        check_anndata_object(adata)
        if use_rep not in adata.obsm:
            msg = (f"{name}.obsm has no {use_rep!r}; compute the latent of both with the same "
                   "model (model.get_latent_representation(), or ov.tl.omicvae / "
                   "ov.tl.map_query) or name another with use_rep=.")
            raise KeyError(msg)
    dims = adata_ref.obsm[use_rep].shape[1], adata_query.obsm[use_rep].shape[1]
    if dims[0] != dims[1]:
        msg = (f"obsm[{use_rep!r}] has {dims[0]} columns in adata_ref and {dims[1]} in "
               "adata_query: the two latents must come from one model.")
        raise ValueError(msg)
    check_vote(adata_ref, labels_key, n_neighbors, unknown_above)
    check_key_added(key_added)
    for z, name in ((adata_ref.obsm[use_rep], "adata_ref"),
                    (adata_query.obsm[use_rep], "adata_query")):
        if not np.isfinite(np.asarray(z)).all():
            msg = f"{name}.obsm[{use_rep!r}] holds NaN or infinite values."
            raise ValueError(msg)


def check_vote(adata_ref: AnnData, labels_key: str, n_neighbors: int,
               unknown_above: float) -> None:
    """The reference's labels and the vote's settings."""
    if labels_key not in adata_ref.obs:
        msg = (f"adata_ref.obs has no column {labels_key!r} (columns: "
               f"{list(adata_ref.obs.columns)[:10]}).")
        raise KeyError(msg)
    n_labelled = int(adata_ref.obs[labels_key].notna().sum())
    if not isinstance(n_neighbors, int | np.integer) or not 1 <= n_neighbors < n_labelled - 1:
        msg = (f"n_neighbors must be an integer in [1, {max(1, n_labelled - 2)}] for "
               f"{n_labelled} labelled reference cells, got {n_neighbors!r}.")
        raise ValueError(msg)
    if not 0 < unknown_above <= 1:
        msg = f"unknown_above must be in (0, 1], got {unknown_above!r}."
        raise ValueError(msg)


def transfer_labels(
    adata_ref: AnnData, adata_query: AnnData, labels_key: str, *, use_rep: str = "X_omicvae",
    n_neighbors: int = 15, unknown_above: float = 0.5, key_added: str = "omicvae",
    seed: int = 0, copy: bool = False,
) -> AnnData | None:
    """Label query cells by their nearest labelled reference cells, with an uncertainty.

    The reference and the query must share a latent (the same model's).

    Writes ``adata_query.obs['<key_added>_label']`` (categorical: the reference's labels and
    ``"Unknown"``), ``obs['<key_added>_label_uncertainty']`` (about that share of cells with
    this value are labelled wrongly, as measured on the reference) and
    ``uns['<key_added>_label_transfer']`` (the settings, the reference's left-out accuracy and
    the calibration's expected error on held-out reference cells). On bad input nothing is
    written.

    Parameters
    ----------
    adata_ref
        Reference cells with the latent ``obsm[use_rep]`` and labels ``obs[labels_key]``
        (cells without a label take no part).
    adata_query
        Query cells with the latent ``obsm[use_rep]`` from the same model.
    labels_key
        ``adata_ref.obs`` column of the labels.
    use_rep
        The latent, in both AnnData.
    n_neighbors
        Reference neighbours voting on each cell.
    unknown_above
        Calibrated uncertainty above which a cell is labelled ``"Unknown"``.
    key_added
        Prefix of the keys written.
    seed
        Seeds the halves of the reference that measure the calibration.
    copy
        Write into a copy of ``adata_query`` and return it.

    Returns
    -------
    With ``copy=True`` the labelled copy of ``adata_query``, else ``None`` (it is written in
    place).
    """
    _check(adata_ref, adata_query, labels_key, use_rep, n_neighbors, unknown_above, key_added)
    target = adata_query.copy() if copy else adata_query
    write_labels(target, np.asarray(adata_ref.obsm[use_rep]), adata_ref.obs[labels_key],
                 np.asarray(adata_query.obsm[use_rep]), labels_key=labels_key, use_rep=use_rep,
                 n_neighbors=n_neighbors, unknown_above=unknown_above, key_added=key_added,
                 seed=seed)
    return target if copy else None


def write_labels(target: AnnData, z_ref: np.ndarray, ref_labels: pd.Series,
                 z_query: np.ndarray, *, labels_key: str, use_rep: str, n_neighbors: int,
                 unknown_above: float, key_added: str, seed: int) -> None:
    """The vote and its calibration from latents and labels (checked by the caller), written
    into ``target``, the query: what :func:`transfer_labels` writes."""
    labelled = ref_labels.notna().to_numpy()
    codes, labels = pd.factorize(ref_labels[labelled], sort=True)
    z_ref = np.asarray(z_ref, dtype=np.float64)[labelled]
    tree = cKDTree(z_ref)
    calibration, report = _reference_calibration(z_ref, codes, len(labels), n_neighbors, tree,
                                                 seed)
    votes = neighbour_votes(z_ref, codes, len(labels), np.asarray(z_query, dtype=np.float64),
                            n_neighbors, tree=tree)
    uncertainty = calibration(1.0 - votes.max(axis=1))
    names = np.asarray(labels, dtype=object)[votes.argmax(axis=1)]
    names[uncertainty > unknown_above] = UNKNOWN
    record = {"labels_key": labels_key, "use_rep": use_rep, "n_neighbors": int(n_neighbors),
              "unknown_above": float(unknown_above), "n_reference": int(labelled.sum()),
              "n_unknown": int((names == UNKNOWN).sum()), **report}
    label_key = f"{key_added}_label"
    write_keys(target, obs={label_key: names.astype(str),
                            f"{label_key}_uncertainty": uncertainty},
               uns={f"{key_added}_label_transfer": record})
    target.obs[label_key] = pd.Categorical(target.obs[label_key],
                                           categories=[*map(str, labels), UNKNOWN])
