"""Minibatches streamed from counts on disk: blocks of contiguous rows, read ahead on a
background thread, shuffled within a buffer of several blocks.

Reading single cells in random order from an ``.h5ad`` or zarr file is what makes naive loaders
slow (each cell is several small reads). Here an epoch visits the blocks in a random order, reads
``buffer_blocks`` of them at a time (each one read of every stored array), shuffles the cells of
the buffer together and serves minibatches from it, while the next buffer is read on a thread
(torch releases Python's lock while it computes, so the reading overlaps the step; whether
h5py reads in parallel with it is not assumed, and ``PREFETCH`` turns the thread off). Cells
left over at the end of a buffer join the next one, so every minibatch but the
epoch's last has ``batch_size`` cells, as in memory. With one block holding every cell the
order is exactly the in-memory loader's for the same generator.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import torch

from omicvae_sc.data._disk import RowReader
from omicvae_sc.data._loader import CountTensors, even_split, minibatch_bounds, shared_bounds

BLOCK_ROWS = 1024
"""Contiguous rows per read (see benchmarks/README.md, "Streaming from disk")."""

BUFFER_BLOCKS = 16
"""Blocks shuffled together: 16,384 cells at the default block size."""

PREFETCH = True
"""Read the next buffer on a thread while the current one is served."""


class _Done:
    """A finished result, with the interface of a future (reading without a thread)."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


def _run_now(fn, *args) -> _Done:
    return _Done(fn(*args))


class BlockStream:
    """The cells ``cells`` of an on-disk count matrix as minibatches, for training and for
    every chunked output pass (the same interface as :class:`CountTensors`).

    Parameters
    ----------
    reader
        Reads and checks blocks of rows of the matrix.
    codes
        ``(n_rows, n_covariates)`` covariate codes of every row of the matrix, or ``None``.
    device
        Where minibatches are put.
    cells
        Rows served (default: all), e.g. the training cells of a split: a boolean mask over the
        rows or their indices.
    block_rows, buffer_blocks
        Rows per read and blocks shuffled together.

    Which rows are served is held as one byte a row (a mask) and a few numbers a block, and
    the covariate codes are the caller's array, indexed per read: no array of the stream holds
    eight bytes a cell.
    """

    def __init__(self, reader: RowReader, codes: np.ndarray | None,
                 device: torch.device | str = "cpu", *, cells: np.ndarray | None = None,
                 block_rows: int = BLOCK_ROWS, buffer_blocks: int = BUFFER_BLOCKS):
        if block_rows < 1 or buffer_blocks < 1:
            msg = (f"block_rows and buffer_blocks must be at least 1, got {block_rows} and "
                   f"{buffer_blocks}.")
            raise ValueError(msg)
        self.reader = reader
        self.device = torch.device(device)
        self.n_genes = reader.n_genes
        self.block_rows, self.buffer_blocks = block_rows, buffer_blocks
        self.prefetch = PREFETCH
        n_rows = reader.n_cells
        n_file_blocks = -(-n_rows // block_rows)
        if cells is None:
            self._mask = None
            per_block = np.full(n_file_blocks, block_rows, dtype=np.int64)
            per_block[-1] = n_rows - (n_file_blocks - 1) * block_rows
        else:
            cells = np.asarray(cells)
            if cells.dtype == bool:
                self._mask = cells
            else:
                self._mask = np.zeros(n_rows, dtype=bool)
                self._mask[cells] = True
            per_block = np.add.reduceat(self._mask, np.arange(0, n_rows, block_rows),
                                        dtype=np.int64)
        self._blocks = np.flatnonzero(per_block)  # file blocks holding served rows
        # the position among the served cells of each such block's first served row
        self._first = np.concatenate([[0], np.cumsum(per_block[self._blocks])])
        self.n_cells = int(self._first[-1])
        self._codes_all = codes

    @property
    def codes(self) -> torch.Tensor | None:
        """Covariate codes of the served cells, in order (on the device)."""
        if self._codes_all is None:
            return None
        codes = self._codes_all if self._mask is None else self._codes_all[self._mask]
        return torch.as_tensor(codes, device=self.device)

    def part(self, lo: int, hi: int) -> BlockStream:
        """The served cells ``lo:hi`` (in order) as a stream of their own."""
        rows = np.arange(lo, hi) if self._mask is None else np.flatnonzero(self._mask)[lo:hi]
        return BlockStream(self.reader, self._codes_all, self.device, cells=rows,
                           block_rows=self.block_rows, buffer_blocks=self.buffer_blocks)

    def n_batches(self, batch_size: int) -> int:
        """Number of minibatches :meth:`batches` yields for ``batch_size``."""
        return len(minibatch_bounds(self.n_cells, batch_size)) - 1

    def _served_block(self, b: int) -> tuple[sp.csr_matrix, np.ndarray]:
        """The served rows of ``self._blocks[b]``, read, and their row numbers in the file."""
        lo, hi = self._span(int(self._blocks[b]))
        data = self.reader.read(lo, hi)
        if self._mask is None or self._mask[lo:hi].all():
            return data, np.arange(lo, hi)
        keep = np.flatnonzero(self._mask[lo:hi])
        return data[keep], lo + keep

    def _read(self, blocks: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray | None]:
        """The served rows of ``blocks`` (positions in ``self._blocks``), stacked in that
        order, with their covariate codes."""
        parts, rows = zip(*(self._served_block(b) for b in blocks), strict=True)
        codes = None if self._codes_all is None else self._codes_all[np.concatenate(rows)]
        return sp.vstack(parts, format="csr"), codes

    def rows(self, idx: torch.Tensor, idx_host: np.ndarray | None = None, *,
             nonzero: bool = False):
        """Dense counts of the served cells ``idx`` (positions among the served cells), as
        :meth:`CountTensors.rows` gives them. Each block holding one of them is read once per
        call, so callers ask for many cells at a time."""
        pos = np.asarray(idx.cpu() if idx_host is None else idx_host, dtype=np.int64)
        which = np.searchsorted(self._first, pos, side="right") - 1  # into self._blocks
        used = np.unique(which)
        parts = [self._served_block(b)[0] for b in used]
        starts = np.empty(len(self._blocks), dtype=np.int64)
        starts[used] = np.cumsum([0] + [p.shape[0] for p in parts[:-1]])
        stacked = sp.vstack(parts, format="csr")
        held = CountTensors(stacked[starts[which] + pos - self._first[which]], None, self.device)
        every = torch.arange(len(pos), device=self.device)
        return held.rows(every, np.arange(len(pos)), nonzero=nonzero)

    def _span(self, block: int) -> tuple[int, int]:
        """The rows ``lo:hi`` of the file's block number ``block``."""
        lo = block * self.block_rows
        return lo, min(lo + self.block_rows, self.reader.n_cells)

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
        nonzero: bool = False,
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield ``(counts, codes)`` minibatches covering every served cell once, or with
        ``nonzero`` ``(counts, codes, positions)``, as :meth:`CountTensors.batches` does.

        With ``shuffle``, blocks come in a random order and the cells of each buffer in a
        random order, both drawn from ``generator``; without, cells come in file order.
        """
        n_blocks = len(self._blocks)
        if shuffle and n_blocks > 1:
            order = torch.randperm(n_blocks, generator=generator).numpy()
        else:
            order = np.arange(n_blocks)
        sizes = np.diff(minibatch_bounds(self.n_cells, batch_size))
        yield from self._serve(order, sizes, shuffle, generator, nonzero)

    def part_batches(
        self, batch_size: int, *, rank: int, world: int, shuffle: bool,
        generator: torch.Generator | None = None, nonzero: bool = False,
    ) -> Iterator[tuple[tuple[int, int], torch.Tensor, ...]]:
        """Process ``rank`` of ``world``'s part of each step: ``((start, total), counts,
        codes[, positions])``, its rows ``start:start + len(counts)`` of the step's ``total``.

        Every process draws the same block order from ``generator`` (the same state in every
        process) and reads every ``world``-th block of it: disjoint blocks, together every
        served cell once. All take the same number of steps (that of one process at
        ``world * batch_size``); each splits its cells evenly over them, so parts differ by at
        most a block's cells over the epoch. The cells of a buffer are shuffled with a seed
        drawn once per epoch from ``generator``, offset by the rank.
        """
        n_blocks = len(self._blocks)
        if n_blocks < world:
            msg = (f"{world} processes need at least {world} blocks of cells to read, one each; "
                   f"these {self.n_cells} cells fill {n_blocks} of block_rows={self.block_rows}."
                   " Lower block_rows, or train with fewer processes.")
            raise ValueError(msg)
        if shuffle:
            order = torch.randperm(n_blocks, generator=generator).numpy()
            seed = int(torch.randint(2**62, (1,), generator=generator))
            local = torch.Generator().manual_seed(seed + rank)
        else:
            order, local = np.arange(n_blocks), None
        n_steps = len(shared_bounds(self.n_cells, batch_size, world)) - 1
        per_block = np.diff(self._first)
        cells = [int(per_block[order[r::world]].sum()) for r in range(world)]
        sizes = np.array([even_split(c, n_steps) for c in cells])  # (world, steps)
        starts = np.cumsum(sizes, axis=0) - sizes
        totals = sizes.sum(axis=0)
        for step, item in enumerate(self._serve(order[rank::world], sizes[rank], shuffle,
                                                local, nonzero)):
            yield (int(starts[rank, step]), int(totals[step])), *item

    def _serve(self, blocks: np.ndarray, sizes: np.ndarray, shuffle: bool,
               generator: torch.Generator | None, nonzero: bool
               ) -> Iterator[tuple[torch.Tensor, ...]]:
        """Minibatches of ``sizes`` cells from the served cells of ``blocks`` (positions in
        ``self._blocks``, read in that order, ``buffer_blocks`` at a time)."""
        groups = [blocks[i:i + self.buffer_blocks]
                  for i in range(0, len(blocks), self.buffer_blocks)]
        ends = np.cumsum(sizes)  # where each minibatch ends among the cells served
        served = next_batch = 0
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="omicvae-read") as pool:
            submit = pool.submit if self.prefetch else _run_now
            pending = submit(self._read, groups[0])
            carry: tuple[sp.csr_matrix, np.ndarray | None] | None = None
            for i in range(len(groups)):
                counts, codes = pending.result()
                if i + 1 < len(groups):  # read the next buffer while this one is served
                    pending = submit(self._read, groups[i + 1])
                if carry is not None:
                    counts = sp.vstack([carry[0], counts], format="csr")
                    codes = None if codes is None else np.concatenate([carry[1], codes])
                m = counts.shape[0]
                perm = torch.randperm(m, generator=generator) if shuffle else torch.arange(m)
                # the minibatches that end within this buffer; the rest waits for the next
                last_batch = int(np.searchsorted(ends, served + m, side="right"))
                bounds = [0, *(ends[next_batch:last_batch] - served).tolist()]
                rest = perm[bounds[-1]:].numpy()
                carry = (counts[rest], None if codes is None else codes[rest]) if len(rest) \
                    else None
                if last_batch == next_batch:
                    continue
                held = CountTensors(counts, codes, self.device)
                order_dev = perm.to(self.device)
                host = perm.numpy()
                for lo, hi in itertools.pairwise(bounds):
                    idx = order_dev[lo:hi]
                    batch_codes = None if held.codes is None else held.codes[idx]
                    if nonzero:
                        x, positions = held.rows(idx, host[lo:hi], nonzero=True)
                        yield x, batch_codes, positions
                    else:
                        yield held.rows(idx, host[lo:hi]), batch_codes
                served += bounds[-1]
                next_batch = last_batch
        if served != ends[-1] or carry is not None:  # pragma: no cover - a bug
            msg = f"BlockStream served {served} cells, not {int(ends[-1])}"
            raise RuntimeError(msg)


def count_source(counts, codes: np.ndarray | None, device: torch.device | str = "cpu", *,
                 cells: np.ndarray | None = None, block_rows: int = BLOCK_ROWS,
                 buffer_blocks: int = BUFFER_BLOCKS) -> CountTensors | BlockStream:
    """Minibatches of ``counts``: held on the device when they are in memory, streamed from
    disk when ``counts`` is a :class:`RowReader` (the block settings apply only there). The
    one place that decides."""
    if isinstance(counts, RowReader):
        return BlockStream(counts, codes, device, cells=cells, block_rows=block_rows,
                           buffer_blocks=buffer_blocks)
    return CountTensors(counts, codes, device, cells=cells)


def library_sizes(counts) -> np.ndarray:
    """Per-cell total counts (float64) of a matrix in memory or of a :class:`RowReader`."""
    if isinstance(counts, RowReader):
        return counts.scan(BLOCK_ROWS, progress_bar=False)[0]
    return np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
