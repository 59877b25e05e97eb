"""The user-facing model class and what the tools around it (tl/, pl/, cli) use of model/.

Everything a module outside model/ needs is exported here; the files in model/ are private.
"""

from omicvae_sc.model._checks import validation_split
from omicvae_sc.model._de import clear_effect
from omicvae_sc.model._diagnostics import LatentDiagnostics
from omicvae_sc.model._novelty import (
    NOVELTY_ALPHA,
    NOVELTY_NEIGHBORS,
    Novelty,
    combine_novelty,
    neighbour_distance_ratio,
)
from omicvae_sc.model._omicvae import OmicVAE
from omicvae_sc.model._query import aligned_anndata
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
    "NOVELTY_ALPHA",
    "NOVELTY_NEIGHBORS",
    "N_MADS",
    "LatentDiagnostics",
    "Novelty",
    "OmicVAE",
    "RefinedLatent",
    "ResultOptions",
    "aligned_anndata",
    "check_denoised_target",
    "clear_effect",
    "combine_novelty",
    "neighbour_distance_ratio",
    "stage",
    "validation_split",
]
