"""Scanpy-style one-call tools."""

from omicvae_sc.tl._omicvae import omicvae

__all__ = ["omicvae"]
