"""Tensor operations and host reads per training step: omicvae_sc against scvi-tools 1.4.2.

On a GPU a step of a model this small costs what Python spends queuing its kernels, and every
read of a value back to the host (``.item()``, ``bool(tensor)``, a data-dependent shape) makes
the host wait for the device. Both are counted here without a GPU, with a
``TorchDispatchMode`` that sees every ATen operation the process dispatches:

- ``scvi-tools``: one epoch of ``SCVI.train`` on pbmc3k (batch 128, Lightning as users run
  it, logging included), in its own venv; the counts divided by the epoch's steps.
- ``omicvae_sc``: one epoch of ``OmicVAE.train`` on the same cells and batch, CPU path.
- ``omicvae_sc, GPU path``: one training step of the loop on PyTorch's ``meta`` device, which
  takes the accelerator's code path (dense likelihood, no gathered non-zeros) and on which any
  host read raises; fused Adam, one kernel with no meta implementation, is left out.

``ops`` counts every ATen call; ``kernels`` leaves out those that only make views or empty
tensors (no kernel on a GPU); ``host_reads`` counts ``_local_scalar_dense`` (``.item()``,
``bool()``, ``float()``) and the data-dependent-shape ops (``nonzero``, ``unique``,
``masked_select``).

    python benchmarks/op_count.py --scvi-python /work/venvs/scvi/bin/python
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
NO_KERNEL = frozenset({
    "aten.t", "aten.detach", "aten.view", "aten._unsafe_view", "aten.slice", "aten.select",
    "aten.expand", "aten.as_strided", "aten.alias", "aten.unsqueeze", "aten.squeeze",
    "aten.reshape", "aten.permute", "aten.transpose", "aten.split", "aten.unbind",
    "aten.split_with_sizes", "aten.empty", "aten.empty_strided", "aten.empty_like",
    "aten.new_empty", "aten.new_empty_strided", "aten.lift_fresh", "aten.set_",
    "aten.resize_",
})
HOST_READS = frozenset({"aten._local_scalar_dense", "aten.nonzero", "aten.unique",
                        "aten._unique2", "aten.masked_select", "aten.item"})


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def summary(self, steps: int) -> dict:
        total = sum(self.counts.values())
        views = sum(n for op, n in self.counts.items() if op in NO_KERNEL)
        reads = sum(n for op, n in self.counts.items() if op in HOST_READS)
        return {"steps": steps, "ops": total / steps, "kernels": (total - views) / steps,
                "host_reads": reads / steps,
                "top": dict(self.counts.most_common(8))}


def count_scvi(train_path: Path, batch_size: int) -> dict:
    import anndata as ad
    import scvi

    train = ad.read_h5ad(train_path)
    scvi.model.SCVI.setup_anndata(train, layer="counts")
    model = scvi.model.SCVI(train, n_latent=10, n_hidden=128, n_layers=1, dropout_rate=0.1)
    model.train(max_epochs=1, train_size=1.0, batch_size=batch_size, accelerator="cpu",
                enable_progress_bar=False)  # warm: imports, first-call set-up
    steps = -(-train.n_obs // batch_size)
    counter = OpCounter()
    with counter:
        model.train(max_epochs=1, train_size=1.0, batch_size=batch_size, accelerator="cpu",
                    enable_progress_bar=False)
    return counter.summary(steps)


def count_omicvae(train_path: Path, batch_size: int) -> dict:
    import anndata as ad

    from omicvae_sc import OmicVAE

    train = ad.read_h5ad(train_path)
    OmicVAE.setup_anndata(train, layer="counts")
    model = OmicVAE(train, device="cpu")
    kwargs = {"max_epochs": 1, "batch_size": batch_size, "validation_fraction": 0.0,
              "progress_bar": False}
    model.train(**kwargs)
    counter = OpCounter()
    with counter:
        model.train(**kwargs)
    return counter.summary(-(-train.n_obs // batch_size))


def count_omicvae_gpu_path(n_genes: int, batch_size: int) -> dict:
    import numpy as np
    import scipy.sparse as sp

    from omicvae_sc.data import CountTensors
    from omicvae_sc.module import VAE
    from omicvae_sc.train._graph import batch_sums
    from omicvae_sc.train._trainer import TrainConfig, _FiniteGuard, train_step

    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(0.3, size=(2 * batch_size, n_genes)).astype(np.float32))
    data = CountTensors(x, None, "meta")
    module = VAE(n_genes).to("meta").train()

    class NoUpdate:  # fused Adam: one kernel, no meta implementation
        found_inf = None

        def zero_grad(self, set_to_none=True):
            for p in module.parameters():
                p.grad = None

        def step(self):
            pass

    optimizer = NoUpdate()
    guard = _FiniteGuard(module, optimizer)
    guard.start_epoch(2)
    batches = data.batches(batch_size, shuffle=True, generator=torch.Generator())
    dtype = TrainConfig(max_epochs=1, precision="bfloat16").matmul_dtype
    counter = OpCounter()
    with module.matmul_dtype(dtype):
        x, codes = next(batches)
        train_step(module, optimizer, guard, x, codes, 0.5)  # warm
        with counter:
            x, codes = next(batches)
            out = train_step(module, optimizer, guard, x, codes, 0.5)
            batch_sums(out)  # the loop's per-batch sums
    return counter.summary(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--scvi-python", default=None, help="python of the scvi-tools venv")
    parser.add_argument("--tool", choices=["scvi"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.tool == "scvi":  # the subprocess in the scvi-tools venv
        print(json.dumps(count_scvi(args.train, args.batch_size)))
        return
    from _prep import data_path, prepare

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        train, _ = prepare(data_path("pbmc3k.h5ad"))
        path = Path(tmp) / "train.h5ad"
        train.write_h5ad(path)
        if args.scvi_python:
            out = subprocess.run([args.scvi_python, __file__, "--tool", "scvi", "--train",
                                  str(path), "--batch-size", str(args.batch_size)],
                                 check=True, capture_output=True, text=True).stdout
            rows["scvi-tools (CPU, Lightning)"] = json.loads(out.strip().splitlines()[-1])
        rows["omicvae_sc (CPU path)"] = count_omicvae(path, args.batch_size)
        rows["omicvae_sc (GPU path, meta)"] = count_omicvae_gpu_path(train.n_vars,
                                                                    args.batch_size)
    print(f"per training step, pbmc3k, batch {args.batch_size}:")
    print(f"{'':32s} {'ops':>7s} {'kernels':>8s} {'host reads':>11s}")
    for name, r in rows.items():
        print(f"{name:32s} {r['ops']:7.0f} {r['kernels']:8.0f} {r['host_reads']:11.1f}")
    for name, r in rows.items():
        print(f"  {name}, most frequent: {r['top']}", file=sys.stderr)


if __name__ == "__main__":
    main()
