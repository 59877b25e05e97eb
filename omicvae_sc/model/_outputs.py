"""Per-cell outputs of a fitted VAE as functions of the module and the data: latents, denoised
expression, the importance-weighted evaluation (log p(x), ELBO terms) and posterior predictive
draws. ``OmicVAE``'s ``get_*`` methods validate their input and call these."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

from omicvae_sc.data import CountTensors, open_dense, stack_rows, write_dense
from omicvae_sc.model._runtime import seeded
from omicvae_sc.module import VAE, CellEvaluation, chunk_rows
from omicvae_sc.train import steady_heap
from omicvae_sc.train._distributed import Team, part_of


def per_cell(data: CountTensors, team: Team | None, compute):
    """``compute(data)``: a tensor, or a tuple of tensors, with a row per cell of ``data`` in
    order. With ``team`` (a model trained on several processes) each process computes its
    part of the cells and every process gets every row, gathered in cell order; every
    process must ask (each waits for the others' parts)."""
    if team is None or data.n_cells < 2 * team.world:
        return compute(data)
    lo, hi = part_of(data.n_cells, team.rank, team.world)
    out = compute(data.part(lo, hi))
    single = isinstance(out, torch.Tensor)
    gathered = tuple(team.gather_rows(t.to(team.device), data.n_cells).to(t.device)
                     for t in ((out,) if single else out))
    return gathered[0] if single else gathered


def dense_file(team: Team | None, path, shape: tuple[int, int],
               chunks: Iterator[np.ndarray], *, what: str = "out"):
    """:func:`~omicvae_sc.data.write_dense` written once: here when alone, by rank 0 of
    ``team`` while the others wait (their ``chunks`` never run). Every process gets the array
    on disk, opened read-only."""
    if team is None:
        return write_dense(path, shape, chunks, what=what)
    written = team.leader_writes(lambda: write_dense(path, shape, chunks, what=what), str(path))
    return open_dense(path) if written is None else written


def cell_chunks(data: CountTensors, n_samples: int = 1
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The cells of ``data`` in order, in chunks sized by the memory policy for ``n_samples``
    draws per cell; each chunk reuses the memory the last one freed."""
    with steady_heap():
        yield from data.batches(chunk_rows(n_samples * data.n_genes, data.device),
                                shuffle=False)


def latent_chunks(module: VAE, data: CountTensors, *, give_mean: bool = True, seed: int = 0
                  ) -> Iterator[torch.Tensor]:
    """Posterior means (or one draw per cell, seeded by ``seed``) of the cells of ``data``,
    chunk by chunk in order."""
    with torch.inference_mode(), seeded(seed, data.device):
        for x, codes in cell_chunks(data):
            posterior = module.inference(x, codes)
            yield posterior.mean if give_mean \
                else posterior.sample(torch.randn_like(posterior.mean))


def latent(module: VAE, data: CountTensors, *, give_mean: bool = True, seed: int = 0,
           team: Team | None = None, out: str | os.PathLike | None = None):
    """Posterior means (or one draw per cell), ``(n_cells, n_latent)`` float32 (``team``: as
    in :func:`per_cell`); with ``out`` (a new ``.zarr`` store) written there chunk by chunk,
    the same numbers, and returned opened read-only."""
    if out is not None:
        chunks = (z.cpu().numpy() for z in latent_chunks(module, data, give_mean=give_mean,
                                                           seed=seed))
        return dense_file(team, out, (data.n_cells, module.n_latent), chunks)

    def compute(part):
        return stack_rows(part.n_cells, latent_chunks(module, part, give_mean=give_mean,
                                                      seed=seed))

    return per_cell(data, team, compute).cpu().numpy()


def expression_chunks(module: VAE, data: CountTensors, library_size: float | str,
                      cols: np.ndarray, batch_code: int | None) -> Iterator[np.ndarray]:
    """Decoded expression of the columns ``cols`` at the posterior mean, chunk by chunk of
    cells in order, scaled to ``library_size`` (or ``"observed"``), decoded in batch
    ``batch_code`` when given."""
    with torch.inference_mode():
        for x, codes in cell_chunks(data):
            mean = module.inference(x, codes).mean
            dec_codes = codes
            if batch_code is not None:
                dec_codes = codes.clone()
                dec_codes[:, 0] = batch_code
            frac = module.expression_fractions(mean, dec_codes)[:, cols]
            scale = x.sum(-1, keepdim=True) if library_size == "observed" \
                else float(library_size)
            yield (frac * scale).cpu().numpy()


def expression(module: VAE, data: CountTensors, library_size: float | str, cols: np.ndarray,
               batch_code: int | None) -> np.ndarray:
    """:func:`expression_chunks` gathered into one ``(n_cells, len(cols))`` array."""
    return np.concatenate(list(expression_chunks(module, data, library_size, cols,
                                                 batch_code)))


@torch.inference_mode()
def evaluate(module: VAE, data: CountTensors, n_samples: int, seed: int, *,
             team: Team | None = None, dtype: torch.dtype = torch.float64) -> CellEvaluation:
    """:meth:`VAE.evaluate` over every cell: log p(x), distortion and rate on the host
    (``team``: as in :func:`per_cell`), in ``dtype``: float64 for the methods that return
    them, float32 for the columns written into ``obs`` (half the memory on an atlas, and far
    below the Monte Carlo error of the estimates)."""
    def chunks(part):
        for x, codes in cell_chunks(part, n_samples):
            ev = module.evaluate(x, codes, n_samples=n_samples)
            yield ev.log_likelihood, ev.distortion, ev.rate

    # stack_rows, not a list of chunk results: those small results pin the chunks' freed
    # temporaries in the heap (6.9 GB at 100k cells of 2,000 genes streamed from disk with a
    # second thread running: benchmarks/output_memory.py --idle-thread)
    def compute(part):
        with seeded(seed, data.device):
            return stack_rows(part.n_cells, chunks(part))

    return CellEvaluation(*(t.to(dtype).cpu() for t in per_cell(data, team, compute)))


@torch.inference_mode()
def predictive_draw(module: VAE, data: CountTensors, cols: torch.Tensor, seed: int
                    ) -> sp.csr_matrix:
    """One draw of counts per cell from p(x | z), z ~ q(z | x), at the cell's own library."""
    parts = []
    with seeded(seed, data.device):
        for x, codes in cell_chunks(data):
            posterior = module.inference(x, codes)
            z = posterior.sample(torch.randn_like(posterior.mean))
            params = module.generative(z, x.sum(-1, keepdim=True), codes)
            parts.append(sp.csr_matrix(params.distribution().sample()[:, cols].cpu().numpy()))
    return sp.vstack(parts, format="csr")
