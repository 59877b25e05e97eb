"""Training curves: ELBO, rate and distortion per epoch."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData

from omicvae_sc.data import ResultsRecord
from omicvae_sc.pl._utils import finish
from omicvae_sc.train import History


def _history_of(source) -> History:
    if isinstance(source, History):
        return source
    if isinstance(source, AnnData):
        for key in ("omicvae", *source.uns.keys()):
            entry = source.uns.get(key)
            if isinstance(entry, dict) and "history" in entry:
                return History.from_dict(ResultsRecord.from_uns(entry).history)
        msg = "adata.uns holds no omicvae history; run ov.tl.omicvae(adata) first."
        raise KeyError(msg)
    if hasattr(source, "history"):
        return source.history
    msg = f"Expected an OmicVAE, an AnnData or a History, got {type(source).__name__}."
    raise TypeError(msg)


def training_history(source, *, key: str | None = None, show: bool | None = None,
                     save: str | None = None) -> plt.Figure:
    """Plot per-epoch ELBO, rate (KL) and distortion, train and validation, and the KL weight.

    Parameters
    ----------
    source
        A trained ``OmicVAE``, an AnnData written by ``tl.omicvae`` or a ``History``.
    key
        ``adata.uns`` key of the results when it is not ``"omicvae"``.
    show
        Call ``plt.show()`` (default: only when not saving).
    save
        File to save the figure to.

    Returns
    -------
    The matplotlib figure.
    """
    if key is not None and isinstance(source, AnnData):
        source = History.from_dict(ResultsRecord.read(source, key).history)
    h = _history_of(source)
    if len(h) == 0:
        msg = "The history is empty: train the model first."
        raise ValueError(msg)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    epoch = np.asarray(h.epoch)
    for ax, name, label in zip(axes, ("elbo", "rate", "distortion"),
                               ("ELBO (nats / cell)", "rate: KL (nats / cell)",
                                "distortion: -log p(x|z)"), strict=True):
        ax.plot(epoch, getattr(h, f"train_{name}"), label="train")
        val = np.asarray(getattr(h, f"validation_{name}"))
        if np.isfinite(val).any():
            ax.plot(epoch, val, label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(label)
    twin = axes[1].twinx()
    twin.plot(epoch, h.kl_weight, color="grey", ls=":", label="KL weight")
    twin.set_ylabel("KL weight")
    axes[0].legend()
    fig.tight_layout()
    return finish(fig, show=show, save=save)
