"""Anomaly and doublet scores of a fitted VAE with their checks, and :func:`compute_results`,
everything ``write_results`` / ``tl.omicvae`` write, as functions of the module and the data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omicvae_sc.data import (
    CountTensors,
    Results,
    ResultsRecord,
    check_new_output,
    holds_disk_arrays,
)
from omicvae_sc.model import _diagnostics, _doublets, _outputs, _scores
from omicvae_sc.model._checks import check_count
from omicvae_sc.model._runtime import cell_progress, seeded, stage
from omicvae_sc.module import VAE
from omicvae_sc.train._distributed import Team

LOG_LIKELIHOOD_SAMPLES = 25
"""Importance samples per cell for the written log-likelihood, rate and distortion."""

N_MADS = 3.0
"""Width of the default robust anomaly cutoff, in robust standard deviations."""


def anomaly(module: VAE, data: CountTensors, n_draws: int, n_samples: int, seed: int, *,
            team: Team | None = None) -> np.ndarray:
    """Predictive z-score per cell (see ``OmicVAE.get_anomaly_score``), float64 (``team``:
    as in :func:`._outputs.per_cell`)."""
    check_count("n_draws", n_draws, minimum=2)
    check_count("n_samples", n_samples)

    def compute(part):
        with seeded(seed, data.device):
            return _scores.anomaly_scores(module, part, n_draws=n_draws, n_samples=n_samples)

    return _outputs.per_cell(data, team, compute).double().cpu().numpy()


def doublet_rates(data: CountTensors, expected_rate: float | None, by_batch: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's prior doublet rate and its loading (the batch code when ``by_batch``, else
    0): ``expected_rate`` for every cell, or by default 0.8% per 1,000 cells of its loading."""
    _scores.check_rate("expected_rate", expected_rate)
    loading = data.codes[:, 0].cpu().numpy() if by_batch \
        else np.zeros(data.n_cells, dtype=np.int64)
    rates = _scores.default_doublet_rates(loading) if expected_rate is None \
        else np.full(data.n_cells, float(expected_rate))
    return rates, loading


def doublets(module: VAE, data: CountTensors, expected_rate: float | None, seed: int, *,
             by_batch: bool, sim_ratio: float = 1.0, n_repeats: int = 3) -> np.ndarray:
    """Doublet probability per cell (see ``OmicVAE.get_doublet_score``), float64."""
    rates, _ = doublet_rates(data, expected_rate, by_batch)
    return doublets_at(module, data, rates, seed, by_batch=by_batch, sim_ratio=sim_ratio,
                       n_repeats=n_repeats)


def doublets_at(module: VAE, data: CountTensors, rates: np.ndarray, seed: int, *,
                by_batch: bool, sim_ratio: float = 1.0, n_repeats: int = 3,
                progress_bar: bool = False) -> np.ndarray:
    """:func:`doublets` at the prior rates ``rates`` of each cell (:func:`doublet_rates`)."""
    if not sim_ratio > 0:
        msg = (f"sim_ratio must be positive (artificial doublets per cell), got "
               f"sim_ratio={sim_ratio!r}.")
        raise ValueError(msg)
    check_count("n_repeats", n_repeats)
    settings = _doublets.DoubletSettings(
        rates=torch.as_tensor(rates, dtype=torch.float64, device=data.device),
        sim_ratio=sim_ratio, n_repeats=n_repeats, progress_bar=progress_bar)
    with seeded(seed, data.device):
        return _doublets.doublet_probability(module, data, settings, by_batch=by_batch)


@dataclass(frozen=True)
class ResultOptions:
    """What :func:`compute_results` computes (the arguments of ``write_results``)."""

    layers: bool = False
    n_samples: int = LOG_LIKELIHOOD_SAMPLES
    anomaly: bool = True
    contamination: float | None = None
    n_mads: float = N_MADS
    doublets: bool = True
    doublet_rate: float | None = None
    seed: int = 0
    denoised_path: str | Path | None = None  # write the denoised layer there, not in memory
    progress_bar: bool = False  # bars over the cells of each stage, on many cells

    def check(self) -> None:
        """Raise on unusable options, before any work is done."""
        if self.denoised_path is not None:
            if not self.layers:
                msg = ("denoised_path is where the denoised layer is written; it needs "
                       "layers=True.")
                raise ValueError(msg)
            check_new_output(self.denoised_path, "denoised_path")
        _scores.check_rate("contamination", self.contamination)
        _scores.check_rate("doublet_rate", self.doublet_rate)
        _scores.check_n_mads(self.n_mads)
        check_count("n_samples", self.n_samples)


def check_denoised_target(options: ResultOptions, adata, n_genes: int | None = None) -> None:
    """With counts on disk the denoised layer (cells x ``n_genes``, default all of ``adata``'s)
    goes to a file: refuse ``layers=True`` without ``denoised_path``, before anything is
    trained or computed."""
    if options.layers and options.denoised_path is None and holds_disk_arrays(adata):
        n_genes = adata.n_vars if n_genes is None else n_genes
        gib = adata.n_obs * n_genes * 4 / 1024**3
        msg = (f"The counts are on disk, and the denoised layer is {adata.n_obs} cells x "
               f"{n_genes} genes ({gib:.2g} GiB of float32): pass "
               "denoised_path='denoised.zarr' to write it there chunk by chunk.")
        raise ValueError(msg)


def compute_results(module: VAE, data: CountTensors, options: ResultOptions, *,
                    params: dict, setup: dict, history: dict,
                    team: Team | None = None) -> Results:
    """What ``write_results`` writes, computed from the validated ``data`` with ``options``
    checked by the caller (before the data are read); ``params``, ``setup`` and ``history``
    describe the model. Each stage logs its seconds (logger ``omicvae_sc``, level INFO).
    With ``team``, the per-cell passes are shared out (:func:`._outputs.per_cell`); the
    doublet score and the diagnostics are computed whole by every process."""
    seed = options.seed
    bars = options.progress_bar and (team is None or team.leader)
    with stage("log-likelihood, rate and distortion"), \
            cell_progress(data, "log p(x)", enabled=bars) as counted:
        ev = _outputs.evaluate(module, counted, options.n_samples, seed, team=team,
                               dtype=torch.float32)
    obs = {"log_likelihood": ev.log_likelihood.numpy(), "rate": ev.rate.numpy(),
           "distortion": ev.distortion.numpy()}
    params = {**params, "n_samples": options.n_samples, "device": str(data.device)}
    flag_rules = {}
    if options.anomaly:
        with stage("anomaly scores"), \
                cell_progress(data, "anomaly scores", enabled=bars) as counted:
            score = anomaly(module, counted, _scores.ANOMALY_DRAWS, _scores.ANOMALY_SAMPLES,
                            seed, team=team)
        flags = (_scores.flag_robust(score, options.n_mads) if options.contamination is None
                 else _scores.flag_top_fraction(score, options.contamination))
        obs |= {"anomaly_score": score, "is_anomaly": flags.flagged}
        flag_rules["anomaly"] = flags.to_dict()
    if options.doublets:
        by_batch = "batch_key" in setup
        rates, loading = doublet_rates(data, options.doublet_rate, by_batch)
        with stage("doublet scores"):
            score = doublets_at(module, data, rates, seed, by_batch=by_batch,
                                progress_bar=bars)
        flags = _scores.flag_top_fraction(score, rates, loading)
        obs |= {"doublet_score": score, "is_doublet": flags.flagged}
        flag_rules["doublet"] = flags.to_dict()
    with stage("latent diagnostics and latents"), \
            cell_progress(data, "latents", enabled=bars, passes=2) as counted:
        diagnostics = _diagnostics.latent_diagnostics(module, counted, seed=seed).to_dict()
        latent = _outputs.latent(module, counted, team=team)
    denoised = None
    if options.layers:
        with stage("denoised expression"):
            every = np.arange(data.n_genes)
            if options.denoised_path is None:
                denoised = _outputs.expression(module, data, "observed", every, None)
            else:  # chunk by chunk into a new file, never whole in memory
                denoised = _outputs.dense_file(
                    team, options.denoised_path, (data.n_cells, data.n_genes),
                    _outputs.expression_chunks(module, data, "observed", every, None),
                    what="denoised_path")
    record = ResultsRecord(params=params, setup=setup, history=history,
                           latent_diagnostics=diagnostics, **flag_rules)
    return Results(latent=latent, obs=obs, record=record, denoised=denoised)
