"""A query mapped onto a reference: both on one embedding, novel query cells marked."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData

from omicvae_sc.pl._anomaly import _coordinates
from omicvae_sc.pl._utils import finish


def mapping(
    adata: AnnData, *, dataset_key: str = "dataset", reference: str = "reference",
    basis: str = "umap", key: str = "omicvae", show: bool | None = None,
    save: str | None = None,
) -> plt.Figure:
    """Plot reference and query cells on one embedding, the query's novel cells ringed.

    Left: the reference in grey, the query in colour, cells flagged by
    ``ov.tl.map_query`` (``obs['<key>_is_novel']``) ringed in red. Right: the query coloured
    by its transferred label (``obs['<key>_label']``) over the grey reference, or by its
    novelty score when no labels were transferred.

    Parameters
    ----------
    adata
        Reference and query together, e.g. ``anndata.concat([adata_ref, adata_query],
        label="dataset", keys=["reference", "query"])`` after ``map_query``, with
        ``sc.pp.neighbors(adata, use_rep="X_omicvae")`` and ``sc.tl.umap(adata)``.
    dataset_key
        ``obs`` column saying which cells are the reference's.
    reference
        The value of ``obs[dataset_key]`` of reference cells; every other value is query.
    basis
        Embedding in ``obsm['X_<basis>']``; when absent, the first two principal components
        of the latent ``obsm['X_<key>']``.
    key
        The ``key_added`` of ``map_query``.
    show
        Call ``plt.show()`` (default: only when not saving).
    save
        File to save the figure to.

    Returns
    -------
    The matplotlib figure.
    """
    if dataset_key not in adata.obs:
        msg = (f"adata.obs has no column {dataset_key!r}; concatenate reference and query with "
               f"anndata.concat([adata_ref, adata_query], label={dataset_key!r}, "
               f"keys=[{reference!r}, 'query']).")
        raise KeyError(msg)
    is_ref = adata.obs[dataset_key].astype(str).to_numpy() == reference
    if is_ref.all() or not is_ref.any():
        msg = (f"obs[{dataset_key!r}] must mark both reference cells ({reference!r}) and query "
               f"cells; found {'only reference' if is_ref.all() else 'no reference'} cells.")
        raise ValueError(msg)
    xy, axis_name = _coordinates(adata, basis, key)
    # written by tl.map_query and tl.transfer_labels (not by a fit: not in its schema)
    novel_key, label_key = f"{key}_is_novel", f"{key}_label"
    score_key = f"{key}_novelty_score"
    query = ~is_ref
    novel = np.zeros(adata.n_obs, dtype=bool)
    if novel_key in adata.obs:
        novel = query & adata.obs[novel_key].fillna(False).to_numpy(dtype=bool)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax in (left, right):
        ax.scatter(xy[is_ref, 0], xy[is_ref, 1], s=3, color="lightgrey",
                   label=f"reference ({is_ref.sum()})", rasterized=True)
        ax.set_xlabel(f"{axis_name} 1")
        ax.set_ylabel(f"{axis_name} 2")
        ax.set_xticks([])
        ax.set_yticks([])
    left.scatter(xy[query, 0], xy[query, 1], s=4, color="tab:blue",
                 label=f"query ({query.sum()})", rasterized=True)
    if novel.any() or novel_key in adata.obs:
        left.scatter(xy[novel, 0], xy[novel, 1], s=30, facecolors="none", edgecolors="red",
                     linewidths=0.8, label=f"novel ({novel.sum()})")
    left.set_title("query on the reference")
    left.legend(loc="best", fontsize=8, markerscale=2)
    if label_key in adata.obs:
        labels = adata.obs[label_key].astype(str).to_numpy()
        names = [n for n in np.unique(labels[query])]
        cmap = plt.get_cmap("tab20")
        for i, name in enumerate(names):
            cells = query & (labels == name)
            right.scatter(xy[cells, 0], xy[cells, 1], s=4, color=cmap(i % 20), label=name,
                          rasterized=True)
        right.set_title("query, transferred labels")
        right.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2)
    elif score_key in adata.obs:
        score = adata.obs[score_key].to_numpy(dtype=np.float64)
        order = np.flatnonzero(query)[np.argsort(score[query])]
        points = right.scatter(xy[order, 0], xy[order, 1], c=score[order], s=4, cmap="viridis",
                               rasterized=True)
        fig.colorbar(points, ax=right, label="novelty score")
        right.set_title("query, novelty score")
    else:
        right.set_visible(False)
    fig.tight_layout()
    return finish(fig, show=show, save=save)
