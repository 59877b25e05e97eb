"""Pure torch: likelihoods, network blocks and the VAE. No anndata, pandas or scipy.sparse here."""

from omicvae_sc.module._distributions import (
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    make_count_distribution,
)
from omicvae_sc.module._vae import (
    DISPERSIONS,
    LIKELIHOODS,
    VAE,
    CellEvaluation,
    LossOutput,
    PredictiveCheck,
)

__all__ = [
    "DISPERSIONS",
    "LIKELIHOODS",
    "VAE",
    "CellEvaluation",
    "LossOutput",
    "NegativeBinomial",
    "Poisson",
    "PredictiveCheck",
    "ZeroInflatedNegativeBinomial",
    "make_count_distribution",
]
