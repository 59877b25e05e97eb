"""Semi-amortized inference: refine each cell's Gaussian posterior against its own ELBO.

Pure torch. The encoder's q(z|x) = N(mean, var) is the starting point; the module's weights
stay frozen (only the per-cell ``mean`` and ``log var`` receive gradients) and the module runs
in eval mode (BatchNorm uses its running statistics, dropout is off), so refining one cell
never moves another and the weights are bitwise unchanged afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omicvae_sc.module._objective import (
    Posterior,
    elbo_terms,
    importance_weighted_log_likelihood,
)
from omicvae_sc.module._vae import VAE


@dataclass(frozen=True)
class PosteriorScore:
    """ELBO and importance-weighted log p(x) of one Gaussian posterior, per cell, ``(batch,)``."""

    elbo: torch.Tensor  # mean_k log p(x|z_k) - KL(q || N(0, I))
    log_likelihood: torch.Tensor  # logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k)] - log K


@dataclass(frozen=True)
class PosteriorRefinement:
    """Refined posteriors of a chunk of cells and their scores before and after."""

    mean: torch.Tensor  # (batch, latent)
    var: torch.Tensor  # (batch, latent)
    before: PosteriorScore
    after: PosteriorScore


def score_posterior(
    module: VAE, x: torch.Tensor, codes: torch.Tensor | None, mean: torch.Tensor,
    var: torch.Tensor, eps: torch.Tensor, *, block: int = 25,
) -> PosteriorScore:
    """Score the posterior N(mean, var) with the draws z_k = mean + sqrt(var) * eps_k.

    ``eps`` is ``(K, batch, latent)`` standard normal noise; passing the same ``eps`` for two
    posteriors compares them with common random numbers. The K draws go through the decoder
    ``block`` at a time, so memory stays at ``block x batch x genes``.
    """
    posterior = Posterior(mean, var)
    with torch.no_grad():
        log_px_z = torch.cat([module.log_px_z(x, posterior.sample(eps[lo:lo + block]), codes)
                              for lo in range(0, eps.shape[0], block)])  # (K, batch)
    return PosteriorScore(
        elbo=elbo_terms(log_px_z, posterior).elbo,
        log_likelihood=importance_weighted_log_likelihood(log_px_z, posterior, eps),
    )


def refine_posterior(
    module: VAE, x: torch.Tensor, codes: torch.Tensor | None = None, *, steps: int = 100,
    lr: float = 0.05, n_samples: int = 8, n_eval: int = 100,
    generator: torch.Generator | None = None, eval_generator: torch.Generator | None = None,
) -> PosteriorRefinement:
    """Optimize each cell's posterior mean and log variance with Adam against its own ELBO.

    The objective is the sum over cells of -ELBO: ``n_samples`` reparameterized draws for the
    reconstruction term, the KL to N(0, I) analytic. Cells do not interact (eval mode), so a
    chunk is refined all at once. Before and after are scored by :func:`score_posterior` with
    the same ``n_eval`` draws of noise, so the gain is not sampling noise. ``generator`` draws
    the optimization noise, ``eval_generator`` (default: ``generator``) the scoring noise.
    """
    was_training = module.training
    module.eval()
    try:
        # the scoring noise is drawn first: every step count scores "before" with the same draws
        eps_eval = torch.randn((n_eval, *x.shape[:-1], module.n_latent), device=x.device,
                               generator=generator if eval_generator is None else eval_generator)
        with torch.no_grad():
            mean0, var0 = module.inference(x, codes)
        loc = mean0.detach().clone().requires_grad_(True)
        log_var = torch.log(var0).detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([loc, log_var], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                std = torch.exp(0.5 * log_var)
                eps = torch.randn((n_samples, *loc.shape), generator=generator,
                                  device=loc.device, dtype=loc.dtype)
                z = loc + std * eps  # (n_samples, batch, latent)
                terms = elbo_terms(module.log_px_z(x, z, codes), Posterior(loc, std.pow(2)))
                neg_elbo = terms.distortion + terms.rate  # (batch,)
                optimizer.zero_grad(set_to_none=True)
                neg_elbo.sum().backward(inputs=[loc, log_var])  # module weights get no grad
                optimizer.step()
        mean1, var1 = loc.detach(), torch.exp(log_var.detach())
        return PosteriorRefinement(
            mean=mean1, var=var1,
            before=score_posterior(module, x, codes, mean0, var0, eps_eval),
            after=score_posterior(module, x, codes, mean1, var1, eps_eval),
        )
    finally:
        module.train(was_training)
