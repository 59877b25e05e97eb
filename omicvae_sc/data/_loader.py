"""Counts -> minibatches of torch tensors on the model's device.

Small data is held densely on the device (one gather per minibatch, no host work in the step);
larger data stays CSR on the device and each minibatch is densified there. On the CPU the
dense copy is kept only for small data, so host memory stays near the size of the CSR matrix.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

DENSE_LIMIT_BYTES = 2 * 1024**3
"""Hold the counts densely on an accelerator when the dense float32 matrix is at most this large."""

CPU_DENSE_LIMIT_BYTES = 64 * 1024**2
"""On the CPU (host memory), the dense limit: above it the CSR matrix is kept as it is."""


class CountTensors:
    """Counts of a set of cells and their covariate codes, held on one device.

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts, dense or scipy sparse.
    codes
        ``(n_cells, n_covariates)`` integer covariate codes, or ``None``.
    device
        Where the tensors live.
    dense_limit_bytes
        Above this dense size the counts are kept as CSR and densified per minibatch;
        default: ``DENSE_LIMIT_BYTES`` on an accelerator, ``CPU_DENSE_LIMIT_BYTES`` on the CPU.
    cells
        Rows of ``counts`` and ``codes`` to serve (default: all). A dense holder copies them; a
        CSR holder indexes the full matrix per minibatch, so a train / validation split of a
        large matrix copies no counts.
    """

    def __init__(
        self, counts: np.ndarray | sp.spmatrix, codes: np.ndarray | None,
        device: torch.device | str = "cpu", *, dense_limit_bytes: int | None = None,
        cells: np.ndarray | None = None,
    ):
        self.device = torch.device(device)
        if dense_limit_bytes is None:
            dense_limit_bytes = (CPU_DENSE_LIMIT_BYTES if self.device.type == "cpu"
                                 else DENSE_LIMIT_BYTES)
        self.n_cells, self.n_genes = counts.shape if cells is None else (len(cells),
                                                                          counts.shape[1])
        if codes is not None:
            codes = codes if cells is None else codes[cells]
            self.codes = torch.as_tensor(codes, device=self.device)
        else:
            self.codes = None
        self.dense: torch.Tensor | None = None
        self._csr: _CSRIndex | None = None  # where the non-zero counts are
        self._cells: torch.Tensor | None = None  # CSR rows served, when not all
        if self.n_cells * self.n_genes * 4 <= dense_limit_bytes:
            part = counts if cells is None else counts[cells]
            arr = part.toarray() if sp.issparse(part) else np.asarray(part)
            self.dense = torch.as_tensor(arr, dtype=torch.float32, device=self.device)
        else:
            self._csr = _CSRIndex(counts, self.device)
            if cells is not None:
                self._cells_host = np.asarray(cells, dtype=np.int64)
                self._cells = torch.as_tensor(self._cells_host, device=self.device)

    def part(self, lo: int, hi: int) -> CountTensors:
        """The served cells ``lo:hi`` (in order) as a holder of their own, sharing memory."""
        new = copy.copy(self)
        new.n_cells = hi - lo
        new.codes = None if self.codes is None else self.codes[lo:hi]
        if self.dense is not None:
            new.dense, new._csr = self.dense[lo:hi], None  # positions rebuilt when asked
        else:
            cells = self._cells_host if self._cells is not None else np.arange(self.n_cells)
            new._cells_host = cells[lo:hi]
            new._cells = torch.as_tensor(new._cells_host, device=self.device)
        return new

    def rows(self, idx: torch.Tensor, idx_host: np.ndarray | None = None, *,
             nonzero: bool = False
             ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Dense counts of the cells ``idx`` (a device tensor), ``(len(idx), n_genes)``.

        ``idx_host``, the same indices in host memory, lets the non-zero count of the minibatch
        be summed on the host, so an accelerator is not waited for. With ``nonzero``, also where
        the non-zero counts are in the returned matrix: ``(rows, genes)``, two int64 vectors,
        which the likelihood would otherwise have to search for.
        """
        if self.dense is not None:
            x = self.dense.index_select(0, idx)  # parallel, unlike dense[idx]
            if not nonzero:
                return x
            if self._csr is None:  # built on first use: only training asks for positions
                self._csr = _CSRIndex(self.dense.cpu().numpy(), self.device, positions_only=True)
            row, cols, _ = self._csr.entries(idx, idx_host)
            return x, (row, cols)
        if self._cells is not None:
            idx = self._cells[idx]
            if idx_host is not None:
                idx_host = self._cells_host[idx_host]
        row, cols, values = self._csr.entries(idx, idx_host)
        out = torch.zeros(len(idx), self.n_genes, device=self.device)
        out[row, cols] = values
        return (out, (row, cols)) if nonzero else out

    def n_batches(self, batch_size: int) -> int:
        """Number of minibatches :meth:`batches` yields for ``batch_size``."""
        return len(minibatch_bounds(self.n_cells, batch_size)) - 1

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
        nonzero: bool = False,
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield ``(counts, codes)`` minibatches covering every cell once, or with ``nonzero``
        ``(counts, codes, positions)``, the positions as in :meth:`rows`.

        A trailing batch of a single cell is folded into the one before it, because BatchNorm
        cannot normalize one sample in training mode.
        """
        order, host = self._order(shuffle, generator)
        for lo, hi in itertools.pairwise(minibatch_bounds(self.n_cells, batch_size)):
            yield self._minibatch(order[lo:hi], host[lo:hi], nonzero)

    def _order(self, shuffle: bool, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, np.ndarray]:
        """The order an epoch serves the cells in, on the device and on the host."""
        if shuffle:
            host = torch.randperm(self.n_cells, generator=generator)
        else:
            host = torch.arange(self.n_cells)
        return host.to(self.device), host.numpy()

    def _minibatch(self, idx: torch.Tensor, idx_host: np.ndarray, nonzero: bool
                   ) -> tuple[torch.Tensor, ...]:
        """``(counts, codes)`` of the cells ``idx``, with ``nonzero`` also their positions."""
        codes = None if self.codes is None else self.codes[idx]
        if nonzero:
            x, positions = self.rows(idx, idx_host, nonzero=True)
            return x, codes, positions
        return self.rows(idx, idx_host), codes

    def part_batches(
        self, batch_size: int, *, rank: int, world: int, shuffle: bool,
        generator: torch.Generator | None = None, nonzero: bool = False,
    ) -> Iterator[tuple[tuple[int, int], torch.Tensor, ...]]:
        """Process ``rank`` of ``world``'s part of each step: ``((start, total), counts,
        codes[, positions])``, its rows ``start:start + len(counts)`` of the step's ``total``.

        Every process draws the same order from ``generator`` (the same state in every
        process) and cuts it into the minibatches of one process at ``world * batch_size``
        (:func:`shared_bounds`); process ``rank`` takes its ``rank``-th share of each. With
        ``world=1`` this is :meth:`batches`, so ``world`` processes at ``batch_size`` see the
        minibatches of one at ``world * batch_size``.
        """
        order, host = self._order(shuffle, generator)
        for lo, hi in itertools.pairwise(shared_bounds(self.n_cells, batch_size, world)):
            m = hi - lo
            a, b = lo + m * rank // world, lo + m * (rank + 1) // world
            yield (a - lo, m), *self._minibatch(order[a:b], host[a:b], nonzero)


class RankPart:
    """One process's minibatches of ``source`` (:class:`CountTensors` or a ``BlockStream``)
    when ``world`` processes train together: the interface of ``source`` for the training
    loop, with ``n_cells`` and ``n_batches`` those of all processes together. After each
    minibatch, ``share`` is ``(start, total)``: where its rows lie in the step's whole
    minibatch, and that minibatch's size."""

    def __init__(self, source: CountTensors, rank: int, world: int):
        shared_bounds(source.n_cells, 1, world)  # enough cells for every process
        self.source, self.rank, self.world = source, rank, world
        self.n_cells = source.n_cells
        self.n_genes = source.n_genes
        self.share = (0, 0)

    def n_batches(self, batch_size: int) -> int:
        """Steps of an epoch: the same in every process."""
        return len(shared_bounds(self.n_cells, batch_size, self.world)) - 1

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
        nonzero: bool = False,
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """This process's part of each step, as ``source.batches`` yields minibatches."""
        for share, *item in self.source.part_batches(
                batch_size, rank=self.rank, world=self.world, shuffle=shuffle,
                generator=generator, nonzero=nonzero):
            self.share = share
            yield tuple(item)


def shared_bounds(n_cells: int, batch_size: int, world: int) -> list[int]:
    """Boundaries of each step's whole minibatch when ``world`` processes take ``batch_size``
    cells each: those of one process at ``world * batch_size`` (:func:`minibatch_bounds`),
    except that a last minibatch with fewer than two cells a process joins the one before."""
    if n_cells < 2 * world:
        msg = (f"{world} processes need at least {2 * world} cells to train on (two a process"
               f" in each step, for BatchNorm); got {n_cells}.")
        raise ValueError(msg)
    bounds = [*range(0, n_cells, batch_size * world), n_cells]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2 * world:
        del bounds[-2]
    return bounds


def even_split(n: int, parts: int) -> list[int]:
    """``n`` as ``parts`` sizes that differ by at most one, the larger first."""
    base, extra = divmod(n, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def minibatch_bounds(n_cells: int, batch_size: int) -> list[int]:
    """Minibatch boundaries over ``n_cells``; a trailing one-cell batch is folded into the one
    before it, because BatchNorm cannot normalize one sample in training mode."""
    bounds = [*range(0, n_cells, batch_size), n_cells]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return bounds


def stack_rows(n_rows: int, parts: Iterable) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Concatenate per-chunk results (tensors, or tuples of them) along their first axis into
    tensors of ``n_rows`` rows allocated with the first chunk.

    Unlike collecting the chunks and ``torch.cat``, no chunk result outlives its chunk: small
    results kept alive between a chunk's large temporaries pin those pieces of the heap, and
    the process's memory grows with the number of chunks.
    """
    out, lo = None, 0
    for part in parts:
        single = isinstance(part, torch.Tensor)
        part = (part,) if single else tuple(part)
        if out is None:
            out = tuple(t.new_empty((n_rows, *t.shape[1:])) for t in part)
        for full, t in zip(out, part, strict=True):
            full[lo:lo + len(t)] = t
        lo += len(part[0])
    if out is None or lo != n_rows:
        msg = f"stack_rows: the chunks hold {lo} rows, not {n_rows}"
        raise ValueError(msg)
    return out[0] if single else out


class _CSRIndex:
    """The non-zero counts of a matrix in CSR form, on a device, gathered row by row."""

    def __init__(self, counts: np.ndarray | sp.spmatrix, device: torch.device, *,
                 positions_only: bool = False):
        csr = sp.csr_matrix(counts)
        if not csr.has_canonical_format or np.count_nonzero(csr.data) < csr.data.size:
            # stored zeros or repeated entries: a cleaned copy, the caller's matrix untouched
            csr = csr.copy()
            csr.sum_duplicates()
            csr.eliminate_zeros()
        # no copy where the dtypes already match (int32 gene indices, float32 counts)
        self._indptr_host = csr.indptr.astype(np.int64)  # minibatch sizes without a sync
        self.indptr = torch.as_tensor(self._indptr_host, device=device)
        # positions only (the counts are held densely): int64 genes, ready for use, no counts
        self.indices = torch.as_tensor(
            csr.indices.astype(np.int64 if positions_only else np.int32, copy=False),
            device=device)
        self.values = None if positions_only else torch.as_tensor(
            csr.data.astype(np.float32, copy=False), device=device)

    def entries(self, idx: torch.Tensor, idx_host: np.ndarray | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row in the minibatch, gene, count) of every non-zero count of the rows ``idx``;
        the counts are ``None`` when only positions are held."""
        device = self.indptr.device
        start, stop = self.indptr[idx], self.indptr[idx + 1]
        lengths = stop - start  # (batch,) non-zeros per cell
        if idx_host is None:
            total = int(lengths.sum())  # waits for the device
        else:
            total = int((self._indptr_host[idx_host + 1] - self._indptr_host[idx_host]).sum())
        row = torch.repeat_interleave(torch.arange(len(idx), device=device), lengths,
                                      output_size=total)
        first = torch.cumsum(lengths, 0) - lengths  # where each cell's run starts in the output
        # position in the CSR arrays: output position + (row's CSR start - row's output start)
        shift = torch.repeat_interleave(start - first, lengths, output_size=total)
        pos = torch.arange(total, device=device).add_(shift)
        values = None if self.values is None else self.values.index_select(0, pos)
        return row, self.indices.index_select(0, pos).long(), values
