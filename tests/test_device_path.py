"""The training step off the CPU reads nothing back from the device.

A GPU step is fast only if Python can queue its kernels without waiting for results: one
``.item()``, ``bool(tensor)`` or data-dependent shape per step makes the host wait for the
device every step. Tensors on PyTorch's ``meta`` device have shapes but no values, so any such
read raises; an epoch of minibatches, forward, backward and the non-finite guard run on
``meta`` therefore prove the device path free of host synchronisation. (The fused Adam kernel,
which has no meta implementation, is the one piece replaced: it is a single kernel launch that
reads ``found_inf`` on the device.)
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from omicvae_sc.data import CountTensors
from omicvae_sc.module import VAE
from omicvae_sc.train._trainer import TrainConfig, _epoch_sums, _FiniteGuard


class _NoUpdate:
    """The optimizer's part of a step without its arithmetic (fused Adam has no meta kernel)."""

    def __init__(self, params):
        self.params = list(params)
        self.steps = 0

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        assert all(p.grad is None or p.grad.device.type == "meta" for p in self.params)
        self.steps += 1


def _counts(n_cells=70, n_genes=30, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(0.5, size=(n_cells, n_genes)).astype(np.float32)
    return sp.csr_matrix(x), rng.integers(0, 3, size=(n_cells, 1))


@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
@pytest.mark.parametrize("dense_limit_bytes", [None, 0], ids=["dense", "csr"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_training_epoch_off_the_cpu_never_waits_for_the_device(likelihood, dense_limit_bytes,
                                                                  precision):
    counts, codes = _counts()
    data = CountTensors(counts, codes, "meta", dense_limit_bytes=dense_limit_bytes)
    assert (data.dense is None) == (dense_limit_bytes == 0)
    module = VAE(counts.shape[1], likelihood=likelihood, n_categories=(3,), has_batch=True,
                 dispersion="gene-batch" if likelihood != "poisson" else "gene").to("meta")
    assert not module.uses_nonzero_positions  # the CPU's gathered path would search for them
    optimizer = _NoUpdate(module.parameters())
    guard = _FiniteGuard(module, optimizer)
    config = TrainConfig(max_epochs=1, batch_size=16, precision=precision)
    guard.start_epoch(data.n_batches(config.batch_size))
    sums, step, _ = _epoch_sums(module, data, config, train=True, optimizer=optimizer, step=0,
                                total_steps=data.n_batches(16), generator=torch.Generator(),
                                guard=guard)
    assert step == optimizer.steps == data.n_batches(16) == 5
    assert sums.device.type == "meta" and sums.shape == (2,)
    unused = {"log_theta"} if likelihood == "poisson" else set()  # Poisson has no dispersion
    assert all(p.grad is not None for name, p in module.named_parameters() if name not in unused)


def test_a_host_read_on_meta_does_raise():
    """The premise of the test above: reading a meta tensor's value fails."""
    with pytest.raises((RuntimeError, NotImplementedError), match=r"meta"):
        bool(torch.zeros((), device="meta") > 0)


def test_output_chunks_are_cache_sized_on_the_cpu_and_large_on_an_accelerator():
    from omicvae_sc.model._runtime import ACCELERATOR_CHUNK_ELEMENTS, CHUNK_ELEMENTS, chunk_rows

    cpu, gpu = torch.device("cpu"), torch.device("meta")
    assert chunk_rows(cpu, 2000) == CHUNK_ELEMENTS // 2000 == 262
    assert chunk_rows(gpu, 2000) == ACCELERATOR_CHUNK_ELEMENTS // 2000 == 16777  # 60 for 1M
    assert chunk_rows(gpu, 100 * 2000) == 167  # log p(x) with K=100: not 2 cells a chunk
    assert chunk_rows(cpu, 100 * 2000) == 2  # never fewer than two (BatchNorm)
    assert chunk_rows(gpu, 2000, elements=2**27) == 2**27 // 2000  # a larger own size is kept
