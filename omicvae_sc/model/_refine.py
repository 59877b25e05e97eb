"""The amortization gap, measured: refine every cell's posterior in chunks (module/_refine.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from omicvae_sc.data import CountTensors
from omicvae_sc.module import VAE, Pass, chunk_rows
from omicvae_sc.module._refine import refine_posterior

EVAL_SAMPLES = 100
"""Draws that score each posterior before and after refinement (the same draws for both)."""



@dataclass(frozen=True)
class RefinedLatent:
    """Per-cell posteriors after semi-amortized refinement, scored against the encoder's.

    Every per-cell score is in nats (higher is better) and was computed with the same
    ``EVAL_SAMPLES`` draws of noise before and after, so the differences are not sampling noise.
    """

    mean: np.ndarray  # (cells, n_latent) refined posterior mean
    var: np.ndarray  # (cells, n_latent) refined posterior variance
    elbo_before: np.ndarray  # (cells,) ELBO of the encoder's q(z|x)
    elbo_after: np.ndarray  # (cells,) ELBO of the refined q
    log_likelihood_before: np.ndarray  # (cells,) log p(x), importance sampling with q(z|x)
    log_likelihood_after: np.ndarray  # (cells,) log p(x), importance sampling with refined q
    steps: int
    lr: float
    n_samples: int

    @property
    def gain(self) -> np.ndarray:
        """Per-cell ELBO gain of the refinement, nats: the amortization gap closed."""
        return self.elbo_after - self.elbo_before

    @property
    def mean_gain(self) -> float:
        """Mean ELBO gain over cells, nats."""
        return float(self.gain.mean())


def check_refine_args(steps: int, lr: float, n_samples: int) -> None:
    """Refinement settings must be usable (checked before any work is done)."""
    if not isinstance(steps, int | np.integer) or isinstance(steps, bool) or steps < 1:
        msg = f"steps must be an integer >= 1 (Adam steps per cell), got {steps!r}."
        raise ValueError(msg)
    if not isinstance(lr, int | float) or not np.isfinite(lr) or lr <= 0:
        msg = f"lr must be a positive, finite learning rate (e.g. 0.05), got {lr!r}."
        raise ValueError(msg)
    if not isinstance(n_samples, int | np.integer) or n_samples < 1:
        msg = f"n_samples must be an integer >= 1 (draws per ELBO step), got {n_samples!r}."
        raise ValueError(msg)


def refine_cells(
    module: VAE, data: CountTensors, *, steps: int, lr: float, n_samples: int, seed: int,
) -> RefinedLatent:
    """Refine every cell of ``data`` in chunks of cells, all cells of a chunk at once."""
    chunk_size = chunk_rows(n_samples * data.n_genes, data.device, Pass.REFINEMENT)
    # separate streams: the scoring draws of every chunk do not depend on the number of steps
    generator = torch.Generator(device=data.device).manual_seed(seed)
    eval_generator = torch.Generator(device=data.device).manual_seed(seed + 1)
    parts = [refine_posterior(module, x, codes, steps=steps, lr=lr, n_samples=n_samples,
                              n_eval=EVAL_SAMPLES, generator=generator,
                              eval_generator=eval_generator)
             for x, codes in data.batches(chunk_size, shuffle=False)]

    def cat(get) -> np.ndarray:
        return torch.cat([get(p) for p in parts]).double().cpu().numpy()

    return RefinedLatent(
        mean=cat(lambda p: p.mean).astype(np.float32), var=cat(lambda p: p.var).astype(np.float32),
        elbo_before=cat(lambda p: p.before.elbo), elbo_after=cat(lambda p: p.after.elbo),
        log_likelihood_before=cat(lambda p: p.before.log_likelihood),
        log_likelihood_after=cat(lambda p: p.after.log_likelihood),
        steps=int(steps), lr=float(lr), n_samples=int(n_samples),
    )
