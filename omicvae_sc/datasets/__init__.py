"""Bundled and synthetic count data for examples, tests and benchmarks."""

from __future__ import annotations

from omicvae_sc.datasets._pbmc import pbmc68k_reduced
from omicvae_sc.datasets._synthetic import synthetic_counts

__all__ = ["pbmc68k_reduced", "synthetic_counts"]
