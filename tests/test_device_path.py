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
from omicvae_sc.module import VAE, LossOutput
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
    from omicvae_sc.module._memory import ACCELERATOR_BUDGET, BUDGET, Pass, chunk_rows, tile_rows

    cpu, gpu = torch.device("cpu"), torch.device("meta")
    assert chunk_rows(2000, cpu) == BUDGET // 2000 == 262
    assert chunk_rows(2000, gpu) == ACCELERATOR_BUDGET // 2000 == 16777  # 60 for 1M
    assert chunk_rows(100 * 2000, gpu) == 167  # log p(x) with K=100: not 2 cells a chunk
    assert chunk_rows(100 * 2000, cpu) == 2  # never fewer than two (BatchNorm)
    assert chunk_rows(2000, gpu, Pass.SCORES) == 64 * BUDGET // 2000  # a larger share is kept
    assert chunk_rows(10 * 2000, cpu, Pass.PAIRWISE, least=1) == 2 * BUDGET // 20000
    # the likelihood's tiles: half a budget on the CPU, the whole minibatch elsewhere
    assert tile_rows(2000, 512, cpu) == BUDGET // 2 // 2000 == 131
    assert tile_rows(2000, 512, gpu) == 512


# ------------------------------------------------------------------ CUDA graph replay
# The capture itself needs a GPU. Here ``cuda_capture`` is replaced by a function that, like a
# capture, runs nothing when called and hands back a replay that runs the recorded step: so the
# buffers, the warm-up steps, the eager last batch and the guard around the graph are tested.

def _recording_capture(calls):
    def capture(body):
        calls.append("capture")

        def replay():
            calls.append("replay")
            body()
        return replay
    return capture


def _fit(monkeypatch, cuda_graphs, *, epochs=3, fault_at=None, calls=None, keep=None,
         capture=None):
    from omicvae_sc.train import _trainer

    monkeypatch.setattr(VAE, "uses_nonzero_positions", property(lambda self: False))
    if capture is None:
        capture = _recording_capture(calls if calls is not None else [])
    monkeypatch.setattr(_trainer, "cuda_capture", capture)
    counts, codes = _counts()
    data = CountTensors(counts, codes, "cpu")
    torch.manual_seed(0)
    module = VAE(counts.shape[1], n_categories=(3,), has_batch=True)
    if keep is not None:
        keep.append(module)
    if fault_at is not None:  # the loss of the fault_at-th forward pass becomes NaN
        original, seen = module.loss, []

        def loss(*args, **kwargs):
            out = original(*args, **kwargs)
            seen.append(1)
            if len(seen) == fault_at:
                return LossOutput(loss=out.loss * float("nan"), distortion=out.distortion,
                                  rate=out.rate)
            return out
        module.loss = loss
    config = TrainConfig(max_epochs=epochs, batch_size=16, progress_bar=False,
                         cuda_graphs=cuda_graphs)
    history = _trainer.fit(module, data, None, config, generator=torch.Generator().manual_seed(1))
    return module, history


def test_graph_replayed_training_equals_eager_training_bitwise(monkeypatch):
    eager, h_eager = _fit(monkeypatch, False)
    calls = []
    graphed, h_graphed = _fit(monkeypatch, True, calls=calls)
    # 70 cells in batches of 16: four full steps and a 6-cell one per epoch; 3 warm-up steps,
    # one capture, then every full step replayed and every last batch eager
    assert calls == ["capture"] + ["replay"] * (3 * 4 - 3)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert h_eager.train_elbo == h_graphed.train_elbo


def test_a_non_finite_loss_in_a_replayed_step_stops_training_as_eagerly(monkeypatch):
    from omicvae_sc.train import TrainingDiverged

    # forward pass 12: warm-up 3, then epoch 0's fourth full step (replayed), its eager last
    # batch, and epoch 1's replayed steps: the 12th is epoch 2, step 1
    modules = []
    for graphs in (False, True):
        with pytest.raises(TrainingDiverged, match=r"at epoch 2, step 1 of that epoch"):
            _fit(monkeypatch, graphs, fault_at=12, keep=modules)
    eager, graphed = (m.state_dict() for m in modules)  # both: the weights before the bad step
    for name, tensor in eager.items():
        assert torch.equal(tensor, graphed[name]), name
        assert torch.isfinite(tensor.float()).all(), name


def test_cuda_graphs_on_the_cpu_path_is_refused():
    from omicvae_sc.train._trainer import fit

    counts, _ = _counts()
    module = VAE(counts.shape[1])  # on the CPU: the likelihood gathers non-zero counts
    config = TrainConfig(max_epochs=1, batch_size=16, cuda_graphs=True, progress_bar=False)
    with pytest.raises(ValueError, match=r"cuda_graphs needs the dense likelihood path"):
        fit(module, CountTensors(counts, None), None, config, generator=torch.Generator())


def test_train_with_cuda_graphs_needs_a_cuda_device(synthetic, adata_fingerprint):
    import omicvae_sc as ov
    from omicvae_sc import OmicVAE

    match = r"cuda_graphs=True needs a CUDA device; this model is on 'cpu'"
    OmicVAE.setup_anndata(synthetic, layer="counts")
    model = OmicVAE(synthetic, device="cpu")
    with pytest.raises(ValueError, match=match):
        model.train(max_epochs=1, cuda_graphs=True, progress_bar=False)
    assert not model.is_trained
    before = adata_fingerprint(synthetic)
    with pytest.raises(ValueError, match=match):
        ov.tl.omicvae(synthetic, layer="counts", max_epochs=1, device="cpu", progress_bar=False,
                      train_kwargs={"cuda_graphs": True})
    assert adata_fingerprint(synthetic) == before


def test_a_failed_capture_warns_and_training_goes_on_eagerly(monkeypatch):
    def refuse(body):
        raise RuntimeError("operation not permitted when stream is capturing")

    eager, _ = _fit(monkeypatch, False)
    with pytest.warns(RuntimeWarning, match=r"could not be captured as a CUDA graph \(operation "
                                            r"not permitted .*\); training goes on without"):
        graphed, _ = _fit(monkeypatch, True, capture=refuse)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
