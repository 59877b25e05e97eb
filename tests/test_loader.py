"""The loader: the CSR-on-device path gives the same minibatches as the dense one, every cell is
served once, and no minibatch holds a single cell (BatchNorm)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from omicvae_sc.data import CountTensors


def _counts(n_cells=37, n_genes=11, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.7, size=(n_cells, n_genes)).astype(np.float32)
    codes = rng.integers(0, 3, size=(n_cells, 1))
    return dense, codes


def test_csr_and_dense_holders_serve_identical_minibatches():
    dense, codes = _counts()
    as_dense = CountTensors(sp.csr_matrix(dense), codes)
    as_csr = CountTensors(sp.csr_matrix(dense), codes, dense_limit_bytes=0)
    assert as_dense.dense is not None and as_csr.dense is None
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    pairs = zip(as_dense.batches(8, shuffle=True, generator=gen_a),
                as_csr.batches(8, shuffle=True, generator=gen_b), strict=True)
    for (xa, ca), (xb, cb) in pairs:
        torch.testing.assert_close(xa, xb)
        torch.testing.assert_close(ca, cb)


@pytest.mark.parametrize(("n_cells", "batch_size"), [(37, 8), (33, 8), (129, 128), (1, 4), (2, 1)])
def test_every_cell_once_and_no_single_cell_batch(n_cells, batch_size):
    dense, _ = _counts(n_cells=n_cells)
    holder = CountTensors(dense, None, dense_limit_bytes=0)
    batches = [x for x, _ in holder.batches(batch_size, shuffle=False)]
    assert len(batches) == holder.n_batches(batch_size)
    np.testing.assert_array_equal(torch.cat(batches).numpy(), dense)
    if n_cells > 1:
        assert min(len(b) for b in batches) >= 2
