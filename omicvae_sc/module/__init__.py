"""Pure torch: the mathematics, once. No anndata, pandas or scipy.sparse here.

- :mod:`._likelihood`: the count likelihood (NB, ZINB, Poisson), per entry and per cell
  (:mod:`._fused_nb` is its fused NB / ZINB sweep with the one hand-written backward);
- :mod:`._objective`: the posterior, the ELBO and the importance-weighted bound;
- :mod:`._nn`, :mod:`._vae`: the networks and the VAE (``inference``, ``generative``, ``loss``);
- :mod:`._distributions`: the likelihoods as ``torch.distributions`` for draws;
- :mod:`._refine`: per-cell refinement of the posterior;
- :mod:`._memory`: the one memory policy for chunked passes;
- :mod:`._parallel`: what a step shared by several processes changes (noise, BatchNorm);
- :mod:`._surgery`: a reference's weights grafted into a query's model, and what stays frozen.
"""

from omicvae_sc.module._distributions import (
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    make_count_distribution,
)
from omicvae_sc.module._likelihood import count_log_likelihood, log_prob
from omicvae_sc.module._memory import Pass, chunk_rows
from omicvae_sc.module._objective import (
    ElboTerms,
    Posterior,
    elbo_terms,
    importance_weighted_log_likelihood,
)
from omicvae_sc.module._parallel import BatchNorm, shared_step
from omicvae_sc.module._surgery import (
    UNFREEZE,
    freeze,
    graft,
    new_entries,
    parameter_groups,
)
from omicvae_sc.module._vae import (
    DISPERSIONS,
    LIKELIHOODS,
    VAE,
    CellEvaluation,
    CountParams,
    LossOutput,
    PredictiveCheck,
)

__all__ = [
    "DISPERSIONS",
    "LIKELIHOODS",
    "UNFREEZE",
    "VAE",
    "BatchNorm",
    "CellEvaluation",
    "CountParams",
    "ElboTerms",
    "LossOutput",
    "NegativeBinomial",
    "Pass",
    "Poisson",
    "Posterior",
    "PredictiveCheck",
    "ZeroInflatedNegativeBinomial",
    "chunk_rows",
    "count_log_likelihood",
    "elbo_terms",
    "freeze",
    "graft",
    "importance_weighted_log_likelihood",
    "log_prob",
    "make_count_distribution",
    "new_entries",
    "parameter_groups",
    "shared_step",
]
