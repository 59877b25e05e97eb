"""The rate-distortion frontier of a beta sweep (``tl.rate_distortion``)."""

from __future__ import annotations

import matplotlib.pyplot as plt
from anndata import AnnData

from omicvae_sc.pl._utils import finish
from omicvae_sc.tl._rate_distortion import RateDistortionFrontier


def rate_distortion(source: RateDistortionFrontier | AnnData, *,
                    key: str = "omicvae_rate_distortion", show: bool | None = None,
                    save: str | None = None) -> plt.Figure:
    """Plot distortion against rate, one point per beta, and rate against beta.

    Both panels show the training and the held-out cells.

    Parameters
    ----------
    source
        The frontier returned by ``tl.rate_distortion``, or the AnnData it wrote to.
    key
        ``adata.uns`` key of the frontier.
    show
        Call ``plt.show()`` (default: only when not saving).
    save
        File to save the figure to.

    Returns
    -------
    The matplotlib figure.
    """
    if isinstance(source, AnnData):
        if key not in source.uns:
            msg = (f"adata.uns has no {key!r}; run ov.tl.rate_distortion(adata) first, or pass "
                   "key= naming where it wrote.")
            raise KeyError(msg)
        source = RateDistortionFrontier.from_dict(source.uns[key])
    if not isinstance(source, RateDistortionFrontier):
        msg = (f"Expected a RateDistortionFrontier or an AnnData, got "
               f"{type(source).__name__}.")
        raise TypeError(msg)
    fig, (front, sweep) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    curves = (("training", source.n_train, source.rate, source.distortion, "o-"),
              ("held out", source.n_held_out, source.held_out_rate, source.held_out_distortion,
               "s--"))
    for (label, n, rate, distortion, style), color in zip(curves, ("C0", "C1"), strict=True):
        front.plot(rate, distortion, style, color=color, label=f"{label} ({n} cells)")
        sweep.plot(source.beta, rate, style, color=color, label=f"rate, {label}")
    for beta, r, d in zip(source.beta, source.rate, source.distortion, strict=True):
        front.annotate(f"β={beta:g}", (r, d), textcoords="offset points", xytext=(4, 4),
                       fontsize=8)
    front.set_xlabel("rate: KL(q(z|x) || p(z)) (nats / cell)")
    front.set_ylabel("distortion: -log p(x|z) (nats / cell)")
    front.set_title("rate-distortion frontier")
    front.legend(fontsize=8)
    sweep.set_xscale("log")
    sweep.set_xlabel("β (KL weight)")
    sweep.set_ylabel("rate (nats / cell)")
    sweep.legend(fontsize=8)
    fig.tight_layout()
    return finish(fig, show=show, save=save)
