"""Plots."""

from omicvae_sc.pl._anomaly import anomaly
from omicvae_sc.pl._history import training_history

__all__ = ["anomaly", "training_history"]
