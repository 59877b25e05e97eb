"""A volcano plot of differential expression: each gene's fold change against the evidence for
a change, the calls coloured and the strongest named."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from anndata import AnnData

from omicvae_sc.model import clear_effect
from omicvae_sc.pl._utils import finish


def _table(adata: AnnData, group: str, key: str) -> tuple[pd.DataFrame, dict]:
    """One group's results from ``adata.uns[key]`` (scanpy's layout), checked."""
    if key not in adata.uns or "names" not in adata.uns[key]:
        msg = (f"adata.uns has no differential expression under {key!r}; run "
               f"ov.tl.differential_expression(adata, groupby=..., model=..., key_added={key!r}) "
               "first.")
        raise KeyError(msg)
    result = adata.uns[key]
    groups = list(result["names"].dtype.names)
    if str(group) not in groups:
        msg = f"group={group!r} has no results under uns[{key!r}]; its groups: {groups[:10]}."
        raise ValueError(msg)
    columns = {"names": "names", "logfoldchanges": "lfc", "pvals_adj": "qvalue",
               "proba_de": "proba", "lfc_low": "low", "lfc_high": "high"}
    missing = [c for c in columns if c not in result]
    if missing:
        msg = (f"uns[{key!r}] lacks {missing}: it is not omicvae_sc's differential expression "
               "(sc.pl.rank_genes_groups draws scanpy's own).")
        raise ValueError(msg)
    table = pd.DataFrame({new: np.asarray(result[old][str(group)])
                          for old, new in columns.items()})
    return table, result.get("params", {})


def differential_expression(
    adata: AnnData, *, group: str, key: str = "omicvae_de", n_labels: int = 10,
    show: bool | None = None, save: str | None = None,
) -> plt.Figure:
    """Plot one group's test as a volcano: log2 fold change against the evidence of a change.

    Each gene is a point at its posterior mean log2 fold change (x) and the evidence for a
    change (y): -log10 of the posterior probability of no change, at most 10 (the scale of a
    volcano's -log10 p-value; 2 is a 99% probability of a change); its credible interval is a
    grey bar. Genes called at the request's FDR are red (up) or blue (down), and the
    ``n_labels`` called genes with the largest clear change (the interval's end nearest 0) are
    named. The dashed lines mark ``delta``.

    Parameters
    ----------
    adata
        AnnData holding the results of :func:`omicvae_sc.tl.differential_expression` (or of
        ``model.differential_expression(..., key_added=...)``).
    group
        The tested group to plot.
    key
        ``adata.uns`` key of the results.
    n_labels
        Called genes to name.
    show
        Call ``plt.show()`` (default: only when not saving).
    save
        File to save the figure to.

    Returns
    -------
    The matplotlib figure.
    """
    table, params = _table(adata, group, key)
    fdr, delta = float(params.get("fdr", 0.05)), float(params.get("delta", 0.25))
    called = table["qvalue"].to_numpy() <= fdr
    up = called & (table["lfc"].to_numpy() > 0)
    evidence = -np.log10(np.clip(1.0 - table["proba"].to_numpy(), 1e-10, 1.0))
    fig, ax = plt.subplots(figsize=(6.0, 4.5))
    ax.hlines(evidence, table["low"], table["high"], color="0.85", lw=0.6, zorder=1)
    for mask, colour, label in ((~called, "0.6", "not called"), (up, "tab:red", "up"),
                                (called & ~up, "tab:blue", "down")):
        ax.scatter(table["lfc"][mask], evidence[mask], s=6, color=colour, zorder=2,
                   label=f"{label} ({int(mask.sum())})", rasterized=True)
    clear = np.abs(clear_effect(table["low"].to_numpy(), table["high"].to_numpy()))
    named = np.argsort(-np.where(called, clear, -np.inf))[:min(n_labels, int(called.sum()))]
    for rank, i in enumerate(named):  # staggered: the strongest genes share the top row
        ax.annotate(table["names"][i], (table["lfc"][i], evidence[i]), fontsize=7,
                    xytext=(4 + 36 * ((rank // 4) % 2), -30 + 10 * (rank % 4)),
                    textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.4})
    if params.get("mode", "change") == "change":
        for x in (-delta, delta):
            ax.axvline(x, color="0.4", ls="--", lw=0.7)
    reference = params.get("reference", "rest")
    ax.set_xlabel(f"log2 fold change, {group} against {reference} (posterior mean)")
    ax.set_ylabel("-log10 P(no change), at most 10")
    ax.set_title(f"{group}: {int(called.sum())} genes called at FDR {fdr:g}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return finish(fig, show=show, save=save)
