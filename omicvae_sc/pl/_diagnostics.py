"""Posterior collapse at a glance: per-dimension KL and posterior-mean variance."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from anndata import AnnData

from omicvae_sc.data import ResultsRecord
from omicvae_sc.model import LatentDiagnostics
from omicvae_sc.pl._utils import finish


def _diagnostics_of(source, key: str) -> LatentDiagnostics:
    if isinstance(source, LatentDiagnostics):
        return source
    if isinstance(source, AnnData):
        entry = source.uns.get(key)
        record = ResultsRecord.from_uns(entry) if isinstance(entry, dict) else None
        if record is None or record.latent_diagnostics is None:
            msg = (f"adata.uns[{key!r}] holds no 'latent_diagnostics'; run "
                   "ov.tl.omicvae(adata) (or model.write_results(adata)) first.")
            raise KeyError(msg)
        return LatentDiagnostics.from_dict(record.latent_diagnostics)
    if hasattr(source, "get_latent_diagnostics"):
        stored = getattr(source, "diagnostics", None)
        return stored if stored is not None else source.get_latent_diagnostics()
    msg = (f"Expected an OmicVAE, an AnnData written by tl.omicvae or a LatentDiagnostics, got "
           f"{type(source).__name__}.")
    raise TypeError(msg)


def latent_diagnostics(source, *, key: str = "omicvae", show: bool | None = None,
                       save: str | None = None) -> plt.Figure:
    """Bar plots of the KL per latent dimension and of the variance of its posterior mean.

    Inactive dimensions (variance of E_q[z_d] across cells at most 0.01, the dashed line) are
    grey: the decoder does not use them. The title gives the number of active units and the
    estimated mutual information I(x; z).

    Parameters
    ----------
    source
        A fitted ``OmicVAE`` (its ``diagnostics`` after training, else computed on its cells),
        an AnnData written by ``tl.omicvae`` or a ``LatentDiagnostics``.
    key
        ``adata.uns`` key of the results when ``source`` is an AnnData.
    show
        Call ``plt.show()`` (default: only when not saving).
    save
        File to save the figure to.

    Returns
    -------
    The matplotlib figure.
    """
    d = _diagnostics_of(source, key)
    dims = np.arange(d.n_latent)
    colors = np.where(d.active, "tab:blue", "lightgrey")
    fig, (ax_kl, ax_var) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax_kl.bar(dims, d.kl_per_dim, color=colors)
    ax_kl.set_ylabel("KL(q(z_d|x) || N(0, 1)), nats")
    ax_var.bar(dims, d.posterior_mean_variance, color=colors)
    ax_var.axhline(d.threshold, color="red", ls="--", label=f"active threshold {d.threshold:g}")
    ax_var.set_ylabel("Var over cells of E_q[z_d]")
    ax_var.set_yscale("symlog", linthresh=d.threshold)
    ax_var.legend(fontsize=8)
    for ax in (ax_kl, ax_var):
        ax.set_xlabel("latent dimension")
        ax.set_xticks(dims)
    fig.suptitle(f"{d.n_active} of {d.n_latent} dimensions active; "
                 f"I(x; z) ~= {d.mutual_information:.2f} nats")
    fig.tight_layout()
    return finish(fig, show=show, save=save)
