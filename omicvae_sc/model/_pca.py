"""Principal components of a matrix that is never held whole: randomized subspace iteration
over row blocks (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.1).

The doublet score places cells in a PCA of decoded log expression. A genes x genes covariance
and its eigendecomposition cost O(genes²) memory and O(genes³) time (3.2 GB per copy and
minutes at 28k genes); here memory is O(genes x components) besides one block of rows, and
time is linear in cells and genes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

OVERSAMPLES = 10
"""Extra random directions beyond the components kept: they make the top subspace accurate."""

POWER_ITERATIONS = 3
"""Passes of subspace iteration; each sharpens the separation of leading from trailing
components (2 passes over the data each)."""


@dataclass(frozen=True)
class PCA:
    """Centred principal axes of a set of rows and the rows' coordinates on them."""

    mean: torch.Tensor  # (features,)
    components: torch.Tensor  # (features, k), orthonormal columns, leading first
    scores: torch.Tensor  # (rows, k): the fitted rows, centred and projected

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """Coordinates of further rows, ``(n, k)``."""
        return (rows - self.mean) @ self.components


def _orthonormal(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(a.double()).Q


def streamed_pca(blocks: Callable[[], Iterable[torch.Tensor]], n_components: int, *,
                 oversamples: int = OVERSAMPLES, power_iterations: int = POWER_ITERATIONS
                 ) -> PCA:
    """Leading ``n_components`` principal axes of the rows that ``blocks()`` yields.

    ``blocks`` is called once per pass (``2 * power_iterations + 3`` passes) and must yield the
    same row blocks, ``(rows, features)`` each, in the same order every time: the matrix is
    recomputed or re-read block by block, never stored. Centring is folded into the products
    (``(X - 1 mean') W = X W - 1 (mean' W)``), so no centred copy is made either. The random
    directions come from torch's global generator: seed it around the call.
    """
    # pass 1: the mean and a random range sample X @ omega
    sums, sketch, n_rows, omega = None, [], 0, None
    for block in blocks():
        if omega is None:
            width = min(n_components + oversamples, block.shape[1])
            omega = torch.randn(block.shape[1], width, device=block.device, dtype=block.dtype)
            sums = torch.zeros(block.shape[1], dtype=torch.float64, device=block.device)
        sums += block.sum(0, dtype=torch.float64)
        sketch.append(block @ omega)
        n_rows += len(block)
    mean = sums / n_rows
    y = torch.cat(sketch).double() - mean @ omega.double()  # (rows, width), centred
    for _ in range(power_iterations):
        y = _times(blocks, _orthonormal(_transposed_times(blocks, _orthonormal(y), mean)), mean)
    q = _orthonormal(y)  # (rows, width): an orthonormal basis of the centred range
    bt = _transposed_times(blocks, q, mean)  # (features, width) = X_c' Q
    _, s, vt = torch.linalg.svd(bt.T, full_matrices=False)  # Q' X_c = U S V'
    k = min(n_components, len(s))
    components = vt[:k].T  # (features, k)
    dtype = omega.dtype
    mean, components = mean.to(dtype), components.to(dtype)
    # one more pass, rather than Q U S, so that the fitted rows are projected exactly as
    # further rows are (what lies outside span(Q) would otherwise be dropped for them only)
    scores = torch.cat([(block - mean) @ components for block in blocks()])
    return PCA(mean=mean, components=components, scores=scores)


def _times(blocks, w: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``X_c @ w``, ``(rows, width)``, a block at a time."""
    out, cast = [], None
    for block in blocks():
        cast = w.to(block.dtype) if cast is None else cast
        out.append(block @ cast)
    return torch.cat(out).double() - mean @ w


def _transposed_times(blocks, q: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``X_c' @ q``, ``(features, width)``, accumulated a block at a time."""
    acc, lo = None, 0
    for block in blocks():
        part = block.T @ q[lo:lo + len(block)].to(block.dtype)
        acc = part.double() if acc is None else acc + part
        lo += len(block)
    return acc - torch.outer(mean, q.sum(0))
