"""Anomaly and doublet flags: the embedding coloured by score, and the score histogram."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData

from omicvae_sc.data import ResultsRecord, obs_key
from omicvae_sc.pl._utils import finish

KINDS = ("anomaly", "doublet")


def _coordinates(adata: AnnData, basis: str, key: str) -> tuple[np.ndarray, str]:
    """2-D coordinates of ``obsm['X_<basis>']``; without it, the first two principal
    components of the latent ``obsm['X_<key>']``."""
    if f"X_{basis}" in adata.obsm:
        return np.asarray(adata.obsm[f"X_{basis}"])[:, :2], basis.upper()
    if f"X_{key}" not in adata.obsm:
        msg = (f"adata.obsm has neither 'X_{basis}' nor 'X_{key}'; run ov.tl.omicvae(adata) "
               "(and sc.tl.umap) first.")
        raise KeyError(msg)
    z = np.asarray(adata.obsm[f"X_{key}"], dtype=np.float64)
    z = z - z.mean(0)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    return z @ vt[:2].T, f"{key} latent PC"


def anomaly(
    adata: AnnData, *, kind: str = "anomaly", basis: str = "umap", key: str = "omicvae",
    show: bool | None = None, save: str | None = None,
) -> plt.Figure:
    """Plot an anomaly or doublet score with its flags, next to the score histogram.

    The embedding is coloured by the score written by ``tl.omicvae``, flagged cells are
    ringed in red, and the histogram marks the flagging threshold.

    Parameters
    ----------
    adata
        AnnData holding ``obs['<key>_<kind>_score']``, ``obs['<key>_is_<kind>']`` and the rule
        in ``uns['<key>']['<kind>']``.
    kind
        ``"anomaly"`` or ``"doublet"``.
    basis
        Embedding in ``obsm['X_<basis>']``; when absent, the first two principal components of
        the latent ``obsm['X_<key>']`` are shown.
    key
        The ``key_added`` of ``tl.omicvae``.
    show
        Call ``plt.show()`` (default: only when not saving).
    save
        File to save the figure to.

    Returns
    -------
    The matplotlib figure.
    """
    if kind not in KINDS:
        msg = f"kind={kind!r} is not one of {list(KINDS)}."
        raise ValueError(msg)
    score_key, flag_key = obs_key(key, f"{kind}_score"), obs_key(key, f"is_{kind}")
    rule = None
    if isinstance(adata.uns.get(key), dict) and "history" in adata.uns[key]:
        rule = ResultsRecord.read(adata, key).flag_rule(kind)
    if score_key not in adata.obs or flag_key not in adata.obs or rule is None:
        msg = (f"adata holds no {kind} results under key {key!r} (obs[{score_key!r}], "
               f"obs[{flag_key!r}], uns[{key!r}][{kind!r}]); run ov.tl.omicvae(adata, "
               f"{kind}{'s' if kind == 'doublet' else ''}=True) first.")
        raise KeyError(msg)
    score = adata.obs[score_key].to_numpy(dtype=np.float64)
    flagged = adata.obs[flag_key].to_numpy(dtype=bool)
    xy, axis_name = _coordinates(adata, basis, key)

    fig, (ax_map, ax_hist) = plt.subplots(1, 2, figsize=(11, 4.2),
                                          gridspec_kw={"width_ratios": [1.2, 1]})
    order = np.argsort(score)  # high scores drawn last, on top
    points = ax_map.scatter(xy[order, 0], xy[order, 1], c=score[order], s=6, cmap="viridis")
    ax_map.scatter(xy[flagged, 0], xy[flagged, 1], s=30, facecolors="none", edgecolors="red",
                   linewidths=0.8, label=f"flagged ({flagged.sum()})")
    fig.colorbar(points, ax=ax_map, label=f"{kind} score")
    ax_map.set_xlabel(f"{axis_name} 1")
    ax_map.set_ylabel(f"{axis_name} 2")
    ax_map.set_xticks([])
    ax_map.set_yticks([])
    ax_map.legend(loc="best", fontsize=8)

    ax_hist.hist(score, bins=60, color="grey")
    threshold = float(rule["threshold"])
    if np.isfinite(threshold):
        ax_hist.axvline(threshold, color="red", ls="--",
                        label=f"threshold {threshold:.3g} ({rule['rule']} {rule['value']:.3g})")
        ax_hist.legend(fontsize=8)
    ax_hist.set_xlabel(f"{kind} score")
    ax_hist.set_ylabel("cells")
    ax_hist.set_yscale("log")
    fig.tight_layout()
    return finish(fig, show=show, save=save)
