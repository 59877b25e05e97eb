"""omicvae_sc: a count VAE (NB / ZINB / Poisson) for single-cell RNA-seq, written back into
AnnData."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from omicvae_sc import datasets, pl, tl
from omicvae_sc.data import ResultsRecord, read_lazy
from omicvae_sc.model import OmicVAE

try:
    __version__ = version("omicvae-sc")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["OmicVAE", "ResultsRecord", "__version__", "datasets", "pl", "read_lazy", "tl"]
