"""What a user checks after integrating batches: the embedding by batch and by label side by
side, and how well batches mix within each label."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData

from omicvae_sc.pl._anomaly import _coordinates
from omicvae_sc.pl._utils import finish
from omicvae_sc.tl._mixing import mixing_scores


def _scatter_by(ax, xy: np.ndarray, values: np.ndarray, title: str) -> None:
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(np.unique(values)):
        cells = values == name
        ax.scatter(xy[cells, 0], xy[cells, 1], s=3, color=cmap(i % 20), label=name,
                   rasterized=True)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=3)


def integration(
    adata: AnnData, *, batch_key: str, labels_key: str, basis: str = "umap",
    key: str = "omicvae", n_neighbors: int = 30, show: bool | None = None,
    save: str | None = None,
) -> plt.Figure:
    """Plot an integration: the embedding by batch and by label, and batch mixing per label.

    Left and middle: the embedding coloured by batch and by label. Right: for each label, the
    distribution of its cells' batch-mixing scores (:func:`omicvae_sc.tl.batch_mixing`: the
    batch entropy of a cell's neighbours in the latent over the data's, 1 for a neighbourhood
    as mixed as the data); the label's share of each batch is printed beside its box, since a
    label found in one batch cannot mix.

    Parameters
    ----------
    adata
        Cells with the latent ``obsm['X_<key>']`` and both ``obs`` columns.
    batch_key
        ``obs`` column of the batch.
    labels_key
        ``obs`` column of the labels (cell types).
    basis
        Embedding in ``obsm['X_<basis>']``; when absent, the first two principal components
        of the latent.
    key
        The ``key_added`` of the fit; ``obs['<key>_batch_mixing']`` is used when present,
        else the score is computed (and not written) with ``n_neighbors``.
    n_neighbors
        Neighbours for the mixing score when it is computed here.
    show
        Call ``plt.show()`` (default: only when not saving).
    save
        File to save the figure to.

    Returns
    -------
    The matplotlib figure.
    """
    for column, role in ((batch_key, "batch_key"), (labels_key, "labels_key")):
        if column not in adata.obs:
            msg = (f"adata.obs has no column {column!r} (passed as {role}); columns: "
                   f"{list(adata.obs.columns)[:10]}.")
            raise KeyError(msg)
    batches = adata.obs[batch_key].astype(str).to_numpy()
    labels = adata.obs[labels_key].astype(str).to_numpy()
    xy, axis_name = _coordinates(adata, basis, key)
    score_key = f"{key}_batch_mixing"
    if score_key in adata.obs:
        scores = adata.obs[score_key].to_numpy(dtype=np.float64)
    else:
        scores = mixing_scores(np.asarray(adata.obsm[f"X_{key}"]), batches, n_neighbors)

    fig, (by_batch, by_label, mixing) = plt.subplots(
        1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    _scatter_by(by_batch, xy, batches, f"{axis_name}, by {batch_key}")
    _scatter_by(by_label, xy, labels, f"{axis_name}, by {labels_key}")
    names = list(np.unique(labels))
    mixing.boxplot([scores[labels == n] for n in names], vert=False, showfliers=False)
    mixing.set_yticks(range(1, len(names) + 1), names, fontsize=7)
    n_batches = len(np.unique(batches))
    for i, name in enumerate(names, start=1):
        present = len(np.unique(batches[labels == name]))
        mixing.annotate(f"in {present}/{n_batches} batches", (1.02, i), fontsize=6,
                        va="center", annotation_clip=False)
    mixing.set_xlim(0, 1.0)
    mixing.set_xlabel("batch mixing (neighbours' batch entropy / the data's)")
    mixing.set_title(f"mixing per {labels_key} (mean {scores.mean():.2f})")
    fig.tight_layout()
    return finish(fig, show=show, save=save)
