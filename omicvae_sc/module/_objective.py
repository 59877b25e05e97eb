"""The objective, written once: the posterior, the ELBO and the importance-weighted bound.

Pure torch. The prior is N(0, I) and the posterior q(z|x) = N(mean, diag(var)). With K draws
``z_k = mean + sqrt(var) * eps_k`` and ``log p(x | z_k)`` (``(K, batch)``):

- ELBO = mean_k log p(x | z_k) - KL(q || N(0, I)), the KL analytic. Training minimizes
  distortion + beta * rate with one draw; ``get_elbo``, refinement and the history report it.
- log p(x) ~= logsumexp_k [log p(x | z_k) + log p(z_k) - log q(z_k | x)] - log K, the
  importance-weighted bound (Burda et al. 2016), for ``get_marginal_ll`` and the scores.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

LOG_2PI = math.log(2 * math.pi)


class Posterior(NamedTuple):
    """q(z | x) = N(mean, diag(var)) of each cell; ``mean`` and ``var`` are
    ``(batch, n_latent)``. Unpacks as ``mean, var = posterior``."""

    mean: torch.Tensor
    var: torch.Tensor

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        """The reparameterized draws ``mean + sqrt(var) * eps``; ``eps`` is standard normal
        noise of shape ``(..., batch, n_latent)`` (leading sample dimensions allowed)."""
        return self.mean + self.var.sqrt() * eps

    def kl_per_dimension(self) -> torch.Tensor:
        """KL(q(z_d | x) || N(0, 1)) of each latent dimension, ``(batch, n_latent)``."""
        return 0.5 * (self.var + self.mean.pow(2) - 1.0 - torch.log(self.var))

    def kl_to_prior(self) -> torch.Tensor:
        """KL(q(z | x) || N(0, I)), the rate, ``(batch,)``."""
        return self.kl_per_dimension().sum(-1)


class ElboTerms(NamedTuple):
    """The two per-cell terms of the negative ELBO, ``(batch,)`` each (nats)."""

    distortion: torch.Tensor  # mean over draws of -log p(x | z_k)
    rate: torch.Tensor  # KL(q(z | x) || N(0, I)), analytic

    def loss(self, kl_weight: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Mean over cells of distortion + ``kl_weight`` x rate (what training minimizes)."""
        return (self.distortion + kl_weight * self.rate).mean()

    @property
    def elbo(self) -> torch.Tensor:
        """The per-cell ELBO, -(distortion + rate)."""
        return -(self.distortion + self.rate)


def elbo_terms(log_px_z: torch.Tensor, posterior: Posterior) -> ElboTerms:
    """Distortion and rate from ``log p(x | z_k)`` of K draws from ``posterior``, ``(K, batch)``."""
    return ElboTerms(distortion=-log_px_z.mean(0), rate=posterior.kl_to_prior())


def importance_weighted_log_likelihood(
    log_px_z: torch.Tensor, posterior: Posterior, eps: torch.Tensor
) -> torch.Tensor:
    """Importance-weighted estimate of log p(x), ``(batch,)``, from ``log p(x | z_k)``
    ``(K, batch)`` at the draws ``z_k = posterior.sample(eps_k)``, ``eps`` ``(K, batch,
    n_latent)``."""
    std = posterior.var.sqrt()
    z = posterior.mean + std * eps
    log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
    log_qz = -0.5 * (eps.pow(2) + LOG_2PI).sum(-1) - torch.log(std).sum(-1)
    log_w = log_px_z + log_pz - log_qz
    return torch.logsumexp(log_w, dim=0) - math.log(eps.shape[0])
