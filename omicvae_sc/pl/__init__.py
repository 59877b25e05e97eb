"""Plots."""

from omicvae_sc.pl._anomaly import anomaly
from omicvae_sc.pl._de import differential_expression
from omicvae_sc.pl._diagnostics import latent_diagnostics
from omicvae_sc.pl._history import training_history
from omicvae_sc.pl._integration import integration
from omicvae_sc.pl._mapping import mapping
from omicvae_sc.pl._predictive import posterior_predictive
from omicvae_sc.pl._rate_distortion import rate_distortion

__all__ = [
    "anomaly",
    "differential_expression",
    "integration",
    "latent_diagnostics",
    "mapping",
    "posterior_predictive",
    "rate_distortion",
    "training_history",
]
