"""Per-cell anomaly and doublet scores of a fitted VAE, and the rules that turn scores into flags.

Pure torch and numpy on :class:`~omicvae_sc.data.CountTensors`; chunk sizes from the memory
policy's ``Pass.SCORES``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from omicvae_sc.data import CountTensors
from omicvae_sc.model._pca import streamed_pca
from omicvae_sc.module import VAE, Pass, chunk_rows

DOUBLETS_PER_THOUSAND_CELLS = 0.008
"""10x Genomics' rule of thumb: about 0.8% of cells are doublets per 1,000 cells loaded."""

MAX_DOUBLET_RATE = 0.25

ANOMALY_DRAWS = 10
"""Generated cells per cell for the anomaly score (their mean and spread calibrate it)."""

ANOMALY_SAMPLES = 10
"""Importance samples per log p estimate of the anomaly score."""


def _chunk_size(n_columns: int, device: torch.device) -> int:
    return chunk_rows(n_columns, device, Pass.SCORES)


# ---------------------------------------------------------------------------- anomaly
@torch.no_grad()
def anomaly_scores(
    module: VAE, data: CountTensors, *, n_draws: int, n_samples: int
) -> torch.Tensor:
    """Predictive z-score per cell, ``(n_cells,)``: how much less likely the cell is than cells
    the model generates at its library size, in standard deviations of their log-likelihood
    (see :meth:`VAE.predictive_check`)."""
    out = []
    width = (n_draws + 1) * n_samples * data.n_genes
    for x, codes in data.batches(_chunk_size(width, data.device), shuffle=False):
        check = module.predictive_check(x, codes, n_draws=n_draws, n_samples=n_samples)
        out.append(check.z_score)
    return torch.cat(out)


# ---------------------------------------------------------------------------- doublets
def _reference_codes(codes: torch.Tensor | None) -> torch.Tensor | None:
    """Every covariate set to its first category: decoding with these removes covariate effects."""
    return None if codes is None else torch.zeros_like(codes)


def _partners(batch: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """For each cell index in ``first``, a random cell of the same batch (``batch``: codes)."""
    order = torch.argsort(batch, stable=True)  # cells grouped by batch
    counts = torch.bincount(batch)
    starts = torch.cumsum(counts, 0) - counts
    b = batch[first]
    offset = (torch.rand(len(first), device=batch.device) * counts[b]).long()
    return order[starts[b] + offset.clamp_max(counts[b] - 1)]


def _log_reference_fractions(module: VAE, z: torch.Tensor, codes: torch.Tensor | None):
    return torch.log1p(1e4 * module.expression_fractions(z, _reference_codes(codes)))


def _knn_fraction(real: torch.Tensor, sim: torch.Tensor, k: int) -> torch.Tensor:
    """Share of simulated points among the ``k`` nearest neighbours of each real point (itself
    excluded), ``(n_real,)``."""
    ref = torch.cat([real, sim])
    out = []
    step = _chunk_size(len(ref), ref.device)
    for lo in range(0, len(real), step):
        d = torch.cdist(real[lo:lo + step], ref)  # (chunk, n_real + n_sim)
        rows = torch.arange(len(d), device=d.device)
        d[rows, rows + lo] = math.inf  # a cell is not its own neighbour
        idx = d.topk(k, largest=False).indices
        out.append((idx >= len(real)).float().mean(1))
    return torch.cat(out)


@torch.no_grad()
def doublet_scores(
    module: VAE, data: CountTensors, *, sim_ratio: float, n_neighbors: int | None,
    expected_rate: float, library_weight: float = 1.0, n_components: int = 30,
) -> np.ndarray:
    """Score real cells against doublets simulated from pairs of them.

    1. Each real cell is encoded (posterior mean z) and decoded with every covariate at its
       first category, so the comparison space carries no batch effect.
    2. ``sim_ratio * n_cells`` doublets are simulated from random pairs of cells of the same
       batch (:meth:`VAE.sample_doublets`, library = the sum of the two observed libraries)
       and pass through the same encoder and decoder as real cells.
    3. Cells are placed in a PCA of the real cells' log expression (randomized, a block of
       cells at a time, so linear in cells and genes: :func:`.streamed_pca`), plus one axis for
       the log library size (standardized over real cells, then scaled to ``library_weight``
       times the mean standard deviation of the principal components; 0 leaves depth out).
    4. Each real cell's score is the share of simulated doublets among its ``n_neighbors``
       nearest neighbours, turned into a posterior probability with the prior
       ``expected_rate``, returned ``(n_cells,)``.
    """
    step = _chunk_size(data.n_genes, data.device)
    codes = data.codes  # (cells, n_covariates) or None, in cell order
    z, lib = [], []
    for x, c in data.batches(step, shuffle=False):
        z.append(module.inference(x, c)[0])
        lib.append(x.sum(-1, keepdim=True))
    z, lib = torch.cat(z), torch.cat(lib)

    def real_log():  # decoded again on each pass of the PCA: never cells x genes at once
        for lo in range(0, len(z), step):
            yield _log_reference_fractions(module, z[lo:lo + step], _rows(codes, lo, step))

    project = streamed_pca(real_log, min(n_components, data.n_genes, data.n_cells))
    real = project.scores

    n_sim = max(1, round(sim_ratio * data.n_cells))
    first = torch.randint(data.n_cells, (n_sim,), device=z.device)
    batch = torch.zeros(data.n_cells, dtype=torch.long, device=z.device) if codes is None \
        else codes[:, 0]
    second = _partners(batch, first)
    sim, sim_lib = [], []
    for lo in range(0, n_sim, step):
        a, b = first[lo:lo + step], second[lo:lo + step]
        ca, cb = _take(codes, a), _take(codes, b)
        counts = module.sample_doublets(z[a], z[b], lib[a] + lib[b], ca, cb)
        z_sim = module.inference(counts, ca)[0]
        sim.append(project(_log_reference_fractions(module, z_sim, ca)))
        sim_lib.append(counts.sum(-1, keepdim=True))
    sim = torch.cat(sim)
    if library_weight > 0:
        real, sim = _with_depth_axis(real, sim, lib, torch.cat(sim_lib), library_weight)

    k = n_neighbors or max(5, round(math.sqrt(len(real) + len(sim))))
    k = min(k, len(real) + len(sim) - 1)
    q = _knn_fraction(real, sim, k).double().cpu().numpy()
    # Bayes: neighbour counts estimate the density ratio of doublets to singlets
    doublet = expected_rate * q * data.n_cells
    singlet = (1.0 - expected_rate) * (1.0 - q) * n_sim
    return doublet / (doublet + singlet)


def _with_depth_axis(real: torch.Tensor, sim: torch.Tensor, real_lib: torch.Tensor,
                     sim_lib: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the log library size as one more axis, standardized over real cells and scaled
    to ``weight`` x the mean spread of the principal components."""
    log_real, log_sim = real_lib.clamp_min(1).log(), sim_lib.clamp_min(1).log()
    centre, spread = log_real.mean(), log_real.std().clamp_min(1e-6)
    scale = weight * real.std(0).mean() / spread
    return (torch.cat([real, (log_real - centre) * scale], 1),
            torch.cat([sim, (log_sim - centre) * scale], 1))


def _rows(codes: torch.Tensor | None, lo: int, step: int) -> torch.Tensor | None:
    return None if codes is None else codes[lo:lo + step]


def _take(codes: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if codes is None else codes[idx]


# ---------------------------------------------------------------------------- flags
@dataclass(frozen=True)
class Flags:
    """Which cells a rule flags, and the rule: written to ``uns`` as :meth:`to_dict`."""

    flagged: np.ndarray  # (cells,) bool
    rule: str  # "robust_cutoff" or "expected_rate"
    threshold: float  # cells scoring above it are flagged
    value: float  # n_mads for "robust_cutoff", the rate for "expected_rate"

    def to_dict(self) -> dict:
        return {"rule": self.rule, "threshold": self.threshold, "value": self.value,
                "n_flagged": int(self.flagged.sum())}


def default_doublet_rate(n_cells: int) -> float:
    """0.8% per 1,000 cells loaded (10x Genomics' table), at most 25%."""
    return min(MAX_DOUBLET_RATE, DOUBLETS_PER_THOUSAND_CELLS * n_cells / 1000)


def check_rate(name: str, value: float | None) -> None:
    if value is not None and not 0.0 < value < 0.5:
        msg = (f"{name} must be a fraction of cells in (0, 0.5), got {value!r}; e.g. 0.05 flags "
               "the 5% highest-scoring cells.")
        raise ValueError(msg)


def check_n_mads(n_mads: float) -> None:
    if not n_mads > 0:
        msg = f"n_mads must be positive, got {n_mads!r}; the default is 3."
        raise ValueError(msg)


def flag_top_fraction(scores: np.ndarray, rate: float) -> Flags:
    """Flag exactly the ``ceil(rate * n)`` highest scores; ties at the threshold go to the cells
    that come first."""
    n_flag = math.ceil(rate * len(scores))
    top = np.argsort(-scores, kind="stable")[:n_flag]
    flagged = np.zeros(len(scores), dtype=bool)
    flagged[top] = True
    threshold = float(scores[top[-1]]) if n_flag else math.inf
    return Flags(flagged=flagged, rule="expected_rate", threshold=threshold, value=float(rate))


def flag_robust(scores: np.ndarray, n_mads: float) -> Flags:
    """Flag scores above median + ``n_mads`` x the scaled median absolute deviation (1.4826 MAD,
    which is the standard deviation for normal scores)."""
    median = float(np.median(scores))
    mad = 1.4826 * float(np.median(np.abs(scores - median)))
    threshold = median + n_mads * mad
    return Flags(flagged=scores > threshold, rule="robust_cutoff", threshold=threshold,
                 value=float(n_mads))
