"""Posterior-collapse diagnostics of a fitted VAE: per-dimension KL, active units and I(x; z).

Pure torch and numpy on :class:`~omicvae_sc.data.CountTensors`; ``OmicVAE.get_latent_diagnostics``
is a thin wrapper around :func:`latent_diagnostics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from omicvae_sc.data import CountTensors, stack_rows
from omicvae_sc.module import VAE, Pass, Posterior, chunk_rows

ACTIVE_THRESHOLD = 0.01
"""A latent dimension is active when the variance across cells of its posterior mean exceeds
this (Burda et al. 2016, "Importance Weighted Autoencoders", section 5.2)."""

MI_CELLS = 2000
"""Cells in the Monte Carlo estimate of the aggregate posterior q(z) (default ``n_cells``)."""



@dataclass(frozen=True)
class LatentDiagnostics:
    """How much of the latent space a fitted model uses.

    Attributes
    ----------
    kl_per_dim
        ``(n_latent,)`` mean over cells of KL(q(z_d|x) || N(0, 1)), nats; sums to the mean rate.
    posterior_mean_variance
        ``(n_latent,)`` variance across cells of the posterior mean E_q[z_d].
    active
        ``(n_latent,)`` bool, ``posterior_mean_variance > threshold``.
    n_active
        Number of active dimensions.
    mutual_information
        Estimate of I(x; z) under the aggregate posterior, nats (at most log ``n_cells_mi``).
    threshold
        The activity threshold.
    n_cells_mi
        Cells in the Monte Carlo estimate of the mutual information.
    """

    kl_per_dim: np.ndarray
    posterior_mean_variance: np.ndarray
    active: np.ndarray
    n_active: int
    mutual_information: float
    threshold: float = ACTIVE_THRESHOLD
    n_cells_mi: int = 0

    @property
    def n_latent(self) -> int:
        """Number of latent dimensions."""
        return len(self.kl_per_dim)

    def to_dict(self) -> dict:
        """Plain arrays and numbers, writable to h5ad."""
        return {
            "kl_per_dim": np.asarray(self.kl_per_dim, dtype=np.float64),
            "posterior_mean_variance": np.asarray(self.posterior_mean_variance, dtype=np.float64),
            "active": np.asarray(self.active, dtype=bool),
            "n_active": int(self.n_active),
            "mutual_information": float(self.mutual_information),
            "threshold": float(self.threshold),
            "n_cells_mi": int(self.n_cells_mi),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LatentDiagnostics:
        """Inverse of :meth:`to_dict` (also for a dict read back from h5ad)."""
        return cls(
            kl_per_dim=np.asarray(d["kl_per_dim"], dtype=np.float64),
            posterior_mean_variance=np.asarray(d["posterior_mean_variance"], dtype=np.float64),
            active=np.asarray(d["active"], dtype=bool), n_active=int(d["n_active"]),
            mutual_information=float(d["mutual_information"]),
            threshold=float(d["threshold"]), n_cells_mi=int(d["n_cells_mi"]),
        )


def log_aggregate_posterior(
    z: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> torch.Tensor:
    """log q(z_i) = logsumexp_j log q(z_i | x_j) - log M for each row of ``z`` ``(n, latent)``,
    the mixture over the M cells whose posteriors are ``mean``, ``var`` ``(M, latent)``.

    Rows are processed in chunks (the memory policy's ``Pass.PAIRWISE``: the diagnostics run
    inside ``train()``, whose peak memory counts) so that ``(chunk, M, latent)`` stays small.
    """
    n_mix, n_latent = mean.shape
    log_norm = -0.5 * (torch.log(var) + math.log(2 * math.pi)).sum(-1)  # (M,)
    step = chunk_rows(n_mix * n_latent, z.device, Pass.PAIRWISE, least=1)

    def chunks():
        for lo in range(0, len(z), step):
            diff = z[lo:lo + step, None, :] - mean[None]  # (chunk, M, latent)
            log_q = log_norm - 0.5 * (diff.pow(2) / var).sum(-1)  # (chunk, M)
            yield torch.logsumexp(log_q, dim=1) - math.log(n_mix)

    return stack_rows(len(z), chunks())


def mutual_information(
    mean: torch.Tensor, var: torch.Tensor, generator: torch.Generator
) -> float:
    """Monte Carlo estimate of I(x; z) under the aggregate posterior q(z) = 1/M sum_j q(z|x_j).

    I(x; z) = E_x[KL(q(z|x) || p(z))] - KL(q(z) || p(z)). The log p(z) terms of both KLs are
    expectations under the same q(z) and cancel, leaving I = E_i E_{z ~ q(z|x_i)}[log q(z|x_i)
    - log q(z)]. One draw z_i ~ q(z|x_i) per cell gives log q(z_i|x_i) exactly and log q(z_i)
    from :func:`log_aggregate_posterior` over the same M cells (Hoffman & Johnson 2016; He et
    al. 2019, "Lagging inference networks"). Both terms are taken at the same draw, so their
    noise cancels: identical posteriors (collapse) give exactly 0 and M/2 cells in each of two
    far-apart posteriors exactly log 2. The estimate is at most log M.
    """
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + var.sqrt() * eps  # (M, latent), one draw per cell
    log_q_own = -0.5 * (eps.pow(2) + torch.log(var) + math.log(2 * math.pi)).sum(-1)  # (M,)
    log_qz = log_aggregate_posterior(z, mean, var)  # (M,)
    return float((log_q_own - log_qz).double().mean())


@torch.inference_mode()
def latent_diagnostics(
    module: VAE, data: CountTensors, *, n_cells: int = MI_CELLS, seed: int = 0,
    batch_size: int = 1024,
) -> LatentDiagnostics:
    """Per-dimension KL and active units over all cells of ``data``, and I(x; z) over a random
    subsample of at most ``n_cells`` of them (drawn with ``seed``).

    One pass in chunks: the KL and the variance of the posterior means are running float64
    sums (Chan et al.'s pairwise update), and only the posteriors of the chosen cells are kept,
    so memory does not grow with the number of cells (the diagnostics run at the end of
    ``train()``, also on atlases streamed from disk).
    """
    n = data.n_cells
    n_mi = min(n_cells, n)
    # O(n_mi) memory where n_mi is a small share of n (numpy picks by rejection, not a shuffle)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=n_mi, replace=False))
    moments = _RunningMoments()
    chosen_mean = chosen_var = None
    lo = 0
    for x, codes in data.batches(batch_size, shuffle=False):
        mean, var = module.inference(x, codes)
        moments.add(mean.double(), Posterior(mean, var).kl_per_dimension().double())
        hi = lo + len(mean)
        a, b = np.searchsorted(pick, [lo, hi])
        if chosen_mean is None:
            chosen_mean = mean.new_empty((n_mi, mean.shape[1]))
            chosen_var = var.new_empty((n_mi, var.shape[1]))
        rows = torch.as_tensor(pick[a:b] - lo, device=mean.device)
        chosen_mean[a:b], chosen_var[a:b] = mean[rows], var[rows]
        lo = hi
    mean_var = moments.variance()
    active = (mean_var > ACTIVE_THRESHOLD).cpu().numpy()
    generator = torch.Generator(device=chosen_mean.device).manual_seed(seed)
    mi = mutual_information(chosen_mean, chosen_var, generator)
    return LatentDiagnostics(
        kl_per_dim=(moments.kl_sum / n).cpu().numpy(),
        posterior_mean_variance=mean_var.cpu().numpy(), active=active,
        n_active=int(active.sum()), mutual_information=mi, n_cells_mi=n_mi,
    )


class _RunningMoments:
    """Count, mean and sum of squared deviations of the posterior means, and the sum of the
    per-dimension KL, over chunks of cells (float64)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = self.m2 = self.kl_sum = None

    def add(self, mean: torch.Tensor, kl: torch.Tensor) -> None:
        k = len(mean)
        chunk_mean = mean.mean(0)
        chunk_m2 = (mean - chunk_mean).pow(2).sum(0)
        if self.count == 0:
            self.mean, self.m2, self.kl_sum = chunk_mean, chunk_m2, kl.sum(0)
        else:
            total = self.count + k
            delta = chunk_mean - self.mean
            self.mean = self.mean + delta * (k / total)
            self.m2 = self.m2 + chunk_m2 + delta.pow(2) * (self.count * k / total)
            self.kl_sum = self.kl_sum + kl.sum(0)
        self.count += k

    def variance(self) -> torch.Tensor:
        """The unbiased variance across cells (0 for a single cell)."""
        if self.count < 2:
            return torch.zeros_like(self.mean)
        return self.m2 / (self.count - 1)


def collapse_message(diagnostics: LatentDiagnostics) -> str | None:
    """A warning text when more than half of the latent dimensions are inactive, else None."""
    n, n_active = diagnostics.n_latent, diagnostics.n_active
    if n - n_active <= n / 2:
        return None
    return (f"Posterior collapse: only {n_active} of {n} latent dimensions are active "
            f"(variance of the posterior mean across cells > {diagnostics.threshold}); "
            f"I(x; z) ~= {diagnostics.mutual_information:.3g} nats. Lower beta or lengthen the KL "
            "warm-up (train(beta=..., warmup_fraction=...)), or use fewer latent dimensions; "
            "see model.diagnostics and ov.pl.latent_diagnostics(model).")
