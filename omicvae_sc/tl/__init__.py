"""Scanpy-style one-call tools."""

from omicvae_sc.tl._de import differential_expression
from omicvae_sc.tl._map import map_query
from omicvae_sc.tl._mixing import batch_mixing
from omicvae_sc.tl._omicvae import omicvae
from omicvae_sc.tl._rate_distortion import rate_distortion
from omicvae_sc.tl._stability import latent_stability
from omicvae_sc.tl._transfer import transfer_labels

__all__ = [
    "batch_mixing",
    "differential_expression",
    "latent_stability",
    "map_query",
    "omicvae",
    "rate_distortion",
    "transfer_labels",
]
