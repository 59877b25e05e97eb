"""Scanpy-style one-call tools."""

from omicvae_sc.tl._omicvae import omicvae
from omicvae_sc.tl._rate_distortion import rate_distortion
from omicvae_sc.tl._stability import latent_stability

__all__ = ["latent_stability", "omicvae", "rate_distortion"]
