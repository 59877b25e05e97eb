"""Posterior predictive check: observed against generated per-gene statistics."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from omicvae_sc.pl._utils import finish

STATS = (("mean", "mean count", True), ("variance", "variance", True),
         ("zero_fraction", "zero fraction", False))


def posterior_predictive(source, *, n_cells: int | None = None, seed: int = 0,
                         show: bool | None = None, save: str | None = None) -> plt.Figure:
    """Scatter observed against generated per-gene mean, variance and zero fraction.

    One point per gene; the dashed line is where they agree. Means and variances are on log
    axes. Each panel's title gives the mean absolute error over genes (of log1p values for
    the log panels).

    Parameters
    ----------
    source
        The DataFrame of ``OmicVAE.posterior_predictive_check``, or a fitted ``OmicVAE`` (the
        check is then run on its cells).
    n_cells
        Cells in the check when ``source`` is a model (``None``: all).
    seed
        Seeds the check when ``source`` is a model.
    show
        Call ``plt.show()`` (default: only when not saving).
    save
        File to save the figure to.

    Returns
    -------
    The matplotlib figure.
    """
    if hasattr(source, "posterior_predictive_check"):
        source = source.posterior_predictive_check(n_cells=n_cells, seed=seed)
    if not isinstance(source, pd.DataFrame) or not all(
            f"{kind}_{stat}" in source for stat, _, _ in STATS
            for kind in ("observed", "generated")):
        msg = (f"Expected an OmicVAE or the DataFrame of model.posterior_predictive_check(), got "
               f"{type(source).__name__}.")
        raise TypeError(msg)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (stat, label, log) in zip(axes, STATS, strict=True):
        obs = source[f"observed_{stat}"].to_numpy(dtype=np.float64)
        gen = source[f"generated_{stat}"].to_numpy(dtype=np.float64)
        ax.scatter(obs, gen, s=8, alpha=0.6)
        both = np.concatenate([obs, gen])
        if log:
            positive = both[both > 0]
            lo, hi = (positive.min(), positive.max()) if positive.size else (1e-3, 1.0)
            ax.set_xscale("log")
            ax.set_yscale("log")
            err = np.mean(np.abs(np.log1p(obs) - np.log1p(gen)))
            title = f"{label}: MAE of log1p {err:.3g}"
        else:
            lo, hi = 0.0, max(1e-3, both.max())
            title = f"{label}: MAE {np.mean(np.abs(obs - gen)):.3g}"
        ax.plot([lo, hi], [lo, hi], color="grey", ls="--", lw=1)
        ax.set_xlabel(f"observed {label}")
        ax.set_ylabel(f"generated {label}")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return finish(fig, show=show, save=save)
