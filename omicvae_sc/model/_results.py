"""``OmicVAE`` methods for anomaly and doublet scores, and ``write_results``, the one call that
writes a fitted model's outputs into an AnnData. Bound to the class in ``_omicvae.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from anndata import AnnData

from omicvae_sc import data as _data
from omicvae_sc.data import CountTensors, Results
from omicvae_sc.model import _diagnostics, _scores
from omicvae_sc.model._checks import (
    check_count,
    gene_columns,
)
from omicvae_sc.model._runtime import seeded, stage

if TYPE_CHECKING:
    from omicvae_sc.model._omicvae import OmicVAE

LOG_LIKELIHOOD_SAMPLES = 25
"""Importance samples per cell for the written log-likelihood, rate and distortion."""

N_MADS = 3.0
"""Width of the default robust anomaly cutoff, in robust standard deviations."""


def get_anomaly_score(
    self: OmicVAE, adata: AnnData | None = None, *, n_draws: int = _scores.ANOMALY_DRAWS,
    n_samples: int = _scores.ANOMALY_SAMPLES, seed: int = 0,
) -> np.ndarray:
    """Per-cell anomaly score: how unexpected the cell is for a cell of its depth.

    A raw log p(x) mostly follows sequencing depth: a deep cell has more counts to explain.
    Here each cell's importance-weighted log p(x) is compared with log p(x~) of ``n_draws``
    cells x~ the model generates itself (z ~ N(0, I)) at the same library size and
    covariates: score = (mean log p(x~) - log p(x)) / sd(log p(x~)). Depth moves both sides
    alike, so the score is in standard deviations of what the model expects at that depth;
    it is high for cells the model cannot explain (types absent from training, damaged
    cells, doublets) whether the misfit is in the counts or in an unusual latent state.

    Parameters
    ----------
    adata
        AnnData with the model's genes and covariates (default: the one the model was built on).
    n_draws
        Generated cells per cell, at least 2 (they give the mean and spread).
    n_samples
        Importance samples per log p estimate (vectorized, cells in chunks).
    seed
        Seeds the draws.

    Returns
    -------
    ``(n_cells,)`` float64 array; higher is more anomalous.
    """
    return self._anomaly(self._tensors(adata), n_draws, n_samples, seed)


def _anomaly(self: OmicVAE, data: CountTensors, n_draws: int, n_samples: int, seed: int
             ) -> np.ndarray:
    check_count("n_draws", n_draws, minimum=2)
    check_count("n_samples", n_samples)
    with seeded(seed, self.device):
        scores = _scores.anomaly_scores(self.module, data, n_draws=n_draws,
                                        n_samples=n_samples)
    return scores.double().cpu().numpy()


def get_doublet_score(
    self: OmicVAE, adata: AnnData | None = None, *, expected_rate: float | None = None,
    sim_ratio: float = 2.0, n_neighbors: int | None = None, library_weight: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Per-cell doublet probability from doublets simulated out of the cells themselves.

    Random pairs of cells of the same batch are combined into doublets by the model: the
    equal mixture of the two cells' decoded expression at the summed observed library,
    counts drawn from the fitted likelihood. Real and simulated cells pass through the same
    encoder and decoder; in a PCA of the decoded log expression (covariate effects removed)
    with the log library size as one more axis, a cell whose neighbourhood is rich in
    simulated doublets is doublet-like. The share of
    simulated doublets among the ``n_neighbors`` nearest neighbours becomes a posterior
    probability with the prior ``expected_rate``.

    Parameters
    ----------
    adata
        The cells to score, as loaded together (doublets form within one loading);
        default: the AnnData the model was built on.
    expected_rate
        Prior doublet rate; ``None``: 0.8% per 1,000 cells (10x Genomics), at most 25%.
    sim_ratio
        Simulated doublets per real cell.
    n_neighbors
        Neighbours per cell; ``None``: the square root of real plus simulated cells.
    library_weight
        Weight of the depth axis, in units of the mean spread of a principal component.
        Simulated doublets carry the summed library of their two cells, so depth helps where
        doublets are deeper than singlets (droplet data); 0 compares expression only.
    seed
        Seeds the pairing and the simulated counts.

    Returns
    -------
    ``(n_cells,)`` float64 array of probabilities; higher is more doublet-like.
    """
    return self._doublets(self._tensors(adata), expected_rate, seed, sim_ratio=sim_ratio,
                          n_neighbors=n_neighbors, library_weight=library_weight)


def _doublets(self: OmicVAE, data: CountTensors, expected_rate: float | None, seed: int, *,
              sim_ratio: float = 2.0, n_neighbors: int | None = None,
              library_weight: float = 1.0) -> np.ndarray:
    _scores.check_rate("expected_rate", expected_rate)
    if not sim_ratio > 0 or (n_neighbors is not None and n_neighbors < 1) \
            or not library_weight >= 0:
        msg = (f"sim_ratio must be positive, n_neighbors a positive integer or None and "
               f"library_weight non-negative; got sim_ratio={sim_ratio!r}, "
               f"n_neighbors={n_neighbors!r}, library_weight={library_weight!r}.")
        raise ValueError(msg)
    rate = _scores.default_doublet_rate(data.n_cells) if expected_rate is None \
        else expected_rate
    with seeded(seed, self.device):
        return _scores.doublet_scores(self.module, data, sim_ratio=sim_ratio,
                                      n_neighbors=n_neighbors, expected_rate=rate,
                                      library_weight=library_weight)


def write_results(
    self: OmicVAE, adata: AnnData | None = None, *, key_added: str = "omicvae",
    layers: bool = False, n_samples: int = LOG_LIKELIHOOD_SAMPLES, anomaly: bool = True,
    contamination: float | None = None, n_mads: float = N_MADS, doublets: bool = True,
    doublet_rate: float | None = None, seed: int = 0,
) -> None:
    """Write latents, per-cell scores, flags and parameters into ``adata`` (README table).

    Adds ``obsm['X_<key>']``, ``obs['<key>_log_likelihood' | '_rate' | '_distortion']``,
    with ``anomaly`` ``obs['<key>_anomaly_score' | '_is_anomaly']``, with ``doublets``
    ``obs['<key>_doublet_score' | '_is_doublet']``, ``uns['<key>']`` (the posterior-collapse
    diagnostics in ``uns['<key>']['latent_diagnostics']``) and, with
    ``layers=True``, ``layers['<key>_denoised']``.

    Parameters
    ----------
    adata
        AnnData with the model's genes and covariates (default: the one the model was built on).
    key_added
        Prefix of every key written.
    layers
        Also write the denoised expression (expected counts at each cell's own depth).
    n_samples
        Posterior draws per cell for the log-likelihood, rate and distortion (the anomaly
        score uses the defaults of :meth:`get_anomaly_score`).
    anomaly
        Score (:meth:`get_anomaly_score`) and flag anomalous cells.
    contamination
        Anomaly rule: ``None`` flags scores above median + ``n_mads`` x 1.4826 MAD (a robust
        cutoff); a fraction flags that share of cells with the highest scores.
    n_mads
        Width of the robust cutoff, in robust standard deviations.
    doublets
        Score (:meth:`get_doublet_score`) and flag doublets.
    doublet_rate
        Doublet rule: flag this share of cells with the highest doublet scores (also the
        prior of the score); ``None``: 0.8% per 1,000 cells loaded, at most 25%.
    seed
        Seeds the draws.
    """
    _data.check_key_added(key_added)
    adata = self.adata if adata is None else adata
    results = self._compute_results(
        adata, layers=layers, n_samples=n_samples, anomaly=anomaly, contamination=contamination,
        n_mads=n_mads, doublets=doublets, doublet_rate=doublet_rate, seed=seed)
    _data.write_results(adata, results, key_added=key_added)


def compute_results(
    self: OmicVAE, adata: AnnData, *, layers: bool, n_samples: int, anomaly: bool,
    contamination: float | None, n_mads: float, doublets: bool, doublet_rate: float | None,
    seed: int,
) -> Results:
    """What :meth:`write_results` writes, computed from ``adata`` (arguments as there). Each
    stage logs its seconds (logger ``omicvae_sc``, level INFO)."""
    _scores.check_rate("contamination", contamination)
    _scores.check_rate("doublet_rate", doublet_rate)
    _scores.check_n_mads(n_mads)
    check_count("n_samples", n_samples)
    data = self._tensors(adata)  # validated, on the device once for all
    with stage("log-likelihood, rate and distortion"):
        ev = self._evaluate(data, n_samples, seed)
    obs = {"log_likelihood": ev.log_likelihood.numpy(), "rate": ev.rate.numpy(),
           "distortion": ev.distortion.numpy()}
    uns = {"params": {**self.hparams, "n_samples": n_samples, "device": str(self.device)},
           "setup": self.setup.to_dict(), "history": self.history.to_dict()}
    if anomaly:
        with stage("anomaly scores"):
            score = self._anomaly(data, _scores.ANOMALY_DRAWS, _scores.ANOMALY_SAMPLES, seed)
        flags = (_scores.flag_robust(score, n_mads) if contamination is None
                 else _scores.flag_top_fraction(score, contamination))
        obs |= {"anomaly_score": score, "is_anomaly": flags.flagged}
        uns["anomaly"] = flags.to_dict()
    if doublets:
        rate = doublet_rate or _scores.default_doublet_rate(data.n_cells)
        with stage("doublet scores"):
            score = self._doublets(data, rate, seed)
        flags = _scores.flag_top_fraction(score, rate)
        obs |= {"doublet_score": score, "is_doublet": flags.flagged}
        uns["doublet"] = flags.to_dict()
    with stage("latent diagnostics and latents"):
        uns["latent_diagnostics"] = _diagnostics.latent_diagnostics(
            self.module, data, seed=seed).to_dict()
        latent = self._latent(data)
    denoised = None
    if layers:
        with stage("denoised expression"):
            denoised = self._expression(data, "observed", gene_columns(self.var_names, None),
                                        None)
    return Results(latent=latent, obs=obs, uns=uns, denoised=denoised)

