"""The count likelihood, written once: NB, ZINB and Poisson log-probabilities.

Per entry (``x`` count, ``mu`` mean, θ inverse dispersion, ``z`` zero-inflation logit,
``π = sigmoid(z)``)::

    log NB(x)   = θ (log θ - log(θ + mu)) + x (log mu - log(θ + mu))
                  + lgamma(x + θ) - lgamma(θ) - lgamma(x + 1)
    log ZINB(x) = log NB(x) - softplus(z)                       for x > 0
                = softplus(log NB(0) - z) - softplus(-z)        for x = 0  [log(π + (1-π) NB(0))]
    log Pois(x) = x log mu - mu - lgamma(x + 1)

with ``EPS`` inside every log. :func:`log_prob` gives these per entry with torch's autograd
(the distributions' ``log_prob``, posterior predictive work, tests). The model's objectives
need them summed over genes per cell, from the decoder's logits: :func:`count_log_likelihood`
is that sum, and for NB / ZINB it runs the same formulas as one fused sweep with the package's
only hand-written backward (:mod:`omicvae_sc.module._fused_nb`, tested against
:func:`log_prob` and ``scipy.stats``). Training, ``get_elbo``, ``get_marginal_ll``, refinement
and the scores all call :func:`count_log_likelihood`, through :meth:`.VAE.generative`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omicvae_sc.module._fused_nb import EPS, fused_nb_log_likelihood, log_factorial

__all__ = ["EPS", "count_log_likelihood", "log_factorial", "log_prob"]


def log_prob(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor | None = None,
             zi_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Per-entry log-probability of the counts ``x``: Poisson when ``theta`` is ``None``, NB,
    or ZINB when ``zi_logits`` is given; every argument broadcasts against the others."""
    if theta is None:
        with torch.no_grad():  # log x!: a table on the CPU, no wait for an accelerator
            log_fact = log_factorial(x)
        return x * torch.log(mu + EPS) - mu - log_fact
    log_total = torch.log(mu + (theta + EPS))  # log(θ + mu + eps)
    log_nb_zero = theta * (torch.log(theta + EPS) - log_total)
    with torch.no_grad():
        log_fact = log_factorial(x)
    log_nb = (log_nb_zero + x * (torch.log(mu + EPS) - log_total) + torch.lgamma(x + theta)
              - torch.lgamma(theta) - log_fact)
    if zi_logits is None:
        return log_nb
    zero = F.softplus(log_nb_zero - zi_logits) - F.softplus(-zi_logits)
    return torch.where(x > 0, log_nb - F.softplus(zi_logits), zero)


def count_log_likelihood(
    x: torch.Tensor, logits: torch.Tensor, library: torch.Tensor,
    theta: torch.Tensor | None = None, zi_logits: torch.Tensor | None = None, *,
    nonzero: tuple[torch.Tensor, torch.Tensor] | None = None, repeats: int = 1,
    sparse: bool | None = None, tile_rows: int | None = None,
) -> torch.Tensor:
    """``log p(x | z)`` summed over genes, one value per row of ``logits``.

    The mean is ``softmax(logits) * library``. With ``repeats`` = K, ``logits``, ``library``,
    ``zi_logits`` (and a per-cell ``theta``) hold K blocks of ``x``'s rows (K posterior samples
    of each cell, block after block), each scored against ``x``, which is not copied K times.

    Parameters
    ----------
    x
        ``(batch, genes)`` counts.
    logits
        ``(repeats * batch, genes)`` decoder logits (bfloat16 ones are read in float32).
    library
        ``(repeats * batch, 1)`` library sizes (the exposure).
    theta
        ``(1, genes)`` or per-row ``(repeats * batch, genes)`` inverse dispersion; ``None`` for
        the Poisson likelihood.
    zi_logits
        ``(repeats * batch, genes)`` zero-inflation logits (ZINB), or ``None``.
    nonzero
        ``(rows, genes)`` of the non-zero counts of ``x``, when the caller knows them (the
        minibatch loader does); NB / ZINB on the CPU search for them otherwise.
    repeats
        K, the number of blocks of rows scored against ``x``.
    sparse
        NB / ZINB: count-dependent terms at the non-zero counts only (default: on the CPU;
        elsewhere finding them would wait for the device).
    tile_rows
        NB / ZINB: rows per tile of the sweep (default: the memory policy's,
        :func:`omicvae_sc.module._memory.tile_rows`).

    Returns
    -------
    ``(repeats * batch,)`` log-likelihoods, nats.
    """
    if theta is None:
        x = x.repeat(repeats, 1) if repeats > 1 else x
        rate = torch.softmax(logits.to(library.dtype), dim=-1) * library
        return log_prob(x, rate).sum(-1)
    return fused_nb_log_likelihood(x, logits, library, theta, zi_logits, nonzero=nonzero,
                                   repeats=repeats, sparse=sparse, tile_rows=tile_rows)
