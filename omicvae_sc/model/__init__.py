"""The user-facing model class: the only place where data/, module/ and train/ meet."""

from omicvae_sc.model._omicvae import OmicVAE

__all__ = ["OmicVAE"]
