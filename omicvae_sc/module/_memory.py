"""One memory policy: how many rows every chunked pass takes, from one budget.

Every pass over cells that would otherwise hold a ``cells x genes`` (or ``cells x cells``)
tensor works on chunks of rows, and every chunk size in the package comes from
:func:`chunk_rows` here. A pass states how wide one of its rows is (genes x samples, say) and
how many budgets it may use (:class:`Pass`); the budget is the same for all.

``BUDGET`` numbers of float32 (2 MiB) is a size the CPU's caches hold, which is what the
output passes were measured at; on an accelerator, where cache-sized chunks would mean
thousands of small kernel launches, every pass takes at least ``ACCELERATOR_BUDGET``.
"""

from __future__ import annotations

from enum import Enum

import torch

BUDGET = 2**19
"""Numbers per chunk of a pass with share 1 on the CPU (2 MiB of float32). Outputs (latents,
expression, log p(x)) at this size were 2.5x faster than at 2**25 on the project's 2-core CPU
(log p(x) with K=100 on pbmc3k, see benchmarks/README.md)."""

ACCELERATOR_BUDGET = 2**25
"""The least chunk of any pass on an accelerator (128 MiB of float32): cache-sized chunks there
give thousands of launches and host copies (latents of 1M cells in 3,800 chunks)."""


class Pass(float, Enum):
    """How many budgets one chunk of each pass may hold (its share of :data:`BUDGET`)."""

    LIKELIHOOD_TILE = 0.5
    """The fused likelihood's tiles of a minibatch (module/_fused_nb.py): 1 MiB, split between
    the threads, so a tile's temporaries stay near the per-core L2 cache. Against a quarter
    budget, in paired training steps: 0.98x at batch 512, 0.985x at 128, equal at 256; one
    budget was slower at 512 and 1/16 budget 1.11x slower at 128. On an accelerator a tile is
    the whole minibatch."""
    OUTPUTS = 1.0
    """Latents, expression, log p(x), ELBO, predictive draws and generated cells."""
    VALIDATION = 2.0
    """The checks of the counts on the host (finite, non-negative, integer): their boolean
    temporaries stay a few MiB, not the matrix's size."""
    PAIRWISE = 2.0
    """log q(z_i | x_j) over pairs of cells in the latent diagnostics, which run inside
    ``train()``, whose peak memory counts."""
    REFINEMENT = 4.0
    """Cells refined together: each step keeps a graph of samples x genes per cell."""
    SCORES = 64.0
    """Anomaly and doublet scores (128 MiB): their chunks call the likelihood, which tiles
    them again, so a large chunk costs little memory and saves Python overhead per cell."""


def chunk_rows(per_row: int, device: torch.device, work: Pass = Pass.OUTPUTS, *,
               least: int = 2) -> int:
    """Rows per chunk for a pass whose rows hold ``per_row`` numbers each: ``work`` budgets
    (at least :data:`ACCELERATOR_BUDGET` off the CPU), and never fewer than ``least`` rows
    (2 by default: BatchNorm cannot normalize one cell)."""
    elements = int(BUDGET * work.value)
    if device.type != "cpu":
        elements = max(elements, ACCELERATOR_BUDGET)
    return max(least, elements // max(1, per_row))


def tile_rows(per_row: int, n_rows: int, device: torch.device) -> int:
    """Rows per tile of the fused likelihood: :attr:`Pass.LIKELIHOOD_TILE` on the CPU, the
    whole minibatch (``n_rows``) on an accelerator."""
    if device.type != "cpu":
        return max(1, n_rows)
    return max(1, int(BUDGET * Pass.LIKELIHOOD_TILE.value) // max(1, per_row))
