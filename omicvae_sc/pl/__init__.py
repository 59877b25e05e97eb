"""Plots."""

from omicvae_sc.pl._history import training_history

__all__ = ["training_history"]
