"""The user-facing model class and what the tools around it (tl/, pl/, cli) use of model/.

Everything a module outside model/ needs is exported here; the files in model/ are private.
"""

from omicvae_sc.model._checks import validation_split
from omicvae_sc.model._diagnostics import LatentDiagnostics
from omicvae_sc.model._omicvae import OmicVAE
from omicvae_sc.model._refine import RefinedLatent
from omicvae_sc.model._results import (
    LOG_LIKELIHOOD_SAMPLES,
    N_MADS,
    ResultOptions,
    check_denoised_target,
)
from omicvae_sc.model._runtime import stage

__all__ = [
    "LOG_LIKELIHOOD_SAMPLES",
    "N_MADS",
    "LatentDiagnostics",
    "OmicVAE",
    "RefinedLatent",
    "ResultOptions",
    "check_denoised_target",
    "stage",
    "validation_split",
]
