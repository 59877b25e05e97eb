"""Scanpy-style one-call tools."""

from omicvae_sc.tl._omicvae import omicvae
from omicvae_sc.tl._rate_distortion import rate_distortion

__all__ = ["omicvae", "rate_distortion"]
