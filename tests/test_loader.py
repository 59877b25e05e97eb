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


def test_cpu_keeps_large_data_as_csr_without_copying(monkeypatch):
    """Host memory: above the CPU dense limit the counts stay CSR, and float32 counts with int32
    indices are shared with the scipy matrix, not copied."""
    from omicvae_sc.data import _loader

    counts = sp.random(300, 40, density=0.1, format="csr", dtype=np.float32, random_state=0)
    counts.data = np.ceil(counts.data * 5)
    monkeypatch.setattr(_loader, "CPU_DENSE_LIMIT_BYTES", 300 * 40 * 4 - 1)
    held = CountTensors(counts, None, "cpu")
    assert held.dense is None
    assert np.shares_memory(held._csr.values.numpy(), counts.data)
    assert np.shares_memory(held._csr.indices.numpy(), counts.indices)
    monkeypatch.setattr(_loader, "CPU_DENSE_LIMIT_BYTES", 300 * 40 * 4)
    assert CountTensors(counts, None, "cpu").dense is not None


@pytest.mark.parametrize("dense_limit_bytes", [0, 2**30])
def test_a_subset_of_cells_serves_those_rows(dense_limit_bytes):
    counts = sp.random(50, 8, density=0.3, format="csr", dtype=np.float32, random_state=1)
    codes = np.arange(50)[:, None] % 3
    cells = np.array([7, 3, 41, 20, 0])
    held = CountTensors(counts, codes, "cpu", dense_limit_bytes=dense_limit_bytes, cells=cells)
    (x, c), = held.batches(10, shuffle=False)
    np.testing.assert_array_equal(x.numpy(), counts[cells].toarray())
    np.testing.assert_array_equal(c.numpy(), codes[cells])
    assert held.n_cells == 5


def test_csr_rows_sized_on_the_host_match_rows_sized_on_the_device():
    dense, codes = _counts()
    cells = np.array([30, 2, 17, 5, 9])
    holder = CountTensors(sp.csr_matrix(dense), codes, dense_limit_bytes=0, cells=cells)
    pick = np.array([4, 0, 2])
    via_host = holder.rows(torch.as_tensor(pick), pick)
    via_device = holder.rows(torch.as_tensor(pick))
    np.testing.assert_array_equal(via_host.numpy(), dense[cells[pick]])
    np.testing.assert_array_equal(via_device.numpy(), via_host.numpy())


@pytest.mark.parametrize("dense_limit_bytes", [0, 2**30])
@pytest.mark.parametrize("with_cells", [False, True])
def test_minibatches_say_where_their_non_zero_counts_are(dense_limit_bytes, with_cells):
    """The positions the loader gives the likelihood are exactly the non-zero counts, also when
    the CSR matrix stores zeros and repeated entries, and the caller's matrix stays as it was."""
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.4, size=(40, 30)).astype(np.float32)
    dense[39, 3] = 2.0
    counts = sp.csr_matrix(dense)
    counts.data[::7] = 0.0  # stored zeros
    dense = counts.toarray()
    counts = sp.csr_matrix((np.r_[counts.data, 1.0], np.r_[counts.indices, 3],
                            np.r_[counts.indptr[:-1], counts.indptr[-1] + 1]), shape=(40, 30))
    dense[39, 3] += 1.0  # the last row repeats gene 3
    assert not counts.has_canonical_format and (counts.data == 0).any()
    before = counts.copy()
    cells = np.arange(3, 40, 2) if with_cells else None
    held = CountTensors(counts, None, "cpu", dense_limit_bytes=dense_limit_bytes, cells=cells)
    seen = []
    for x, codes, positions in held.batches(8, shuffle=True, nonzero=True,
                                             generator=torch.Generator().manual_seed(0)):
        assert codes is None
        rows, genes = positions
        flat = (rows * x.shape[1] + genes).numpy()
        np.testing.assert_array_equal(np.sort(flat), torch.nonzero(x.reshape(-1)).squeeze(1))
        seen.append(x)
    expected = dense if cells is None else dense[cells]
    np.testing.assert_array_equal(np.sort(torch.cat(seen).sum(0).numpy()),
                                  np.sort(expected.sum(0)))
    for a, b in ((counts.data, before.data), (counts.indices, before.indices),
                 (counts.indptr, before.indptr)):
        np.testing.assert_array_equal(a, b)


def test_stack_rows_fills_one_tensor_per_output_and_checks_the_row_count():
    from omicvae_sc.data import stack_rows

    chunks = [torch.arange(6.0).reshape(3, 2), torch.arange(6.0, 10.0).reshape(2, 2)]
    torch.testing.assert_close(stack_rows(5, iter(chunks)), torch.cat(chunks))
    means, variances = stack_rows(5, ((c, c * 2) for c in chunks))
    torch.testing.assert_close(means, torch.cat(chunks))
    torch.testing.assert_close(variances, torch.cat(chunks) * 2)
    with pytest.raises(ValueError, match="the chunks hold 5 rows, not 6"):
        stack_rows(6, iter(chunks))
    with pytest.raises(ValueError, match="the chunks hold 0 rows, not 1"):
        stack_rows(1, iter([]))
