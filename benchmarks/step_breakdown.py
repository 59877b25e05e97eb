"""Where a training step's time goes: omicvae_sc's own step on pbmc3k, timed by section.

The step is the trainer's (``fit``'s loss, backward and fused Adam step on minibatches from its
loader, bfloat16 matrix products where ``precision="auto"`` picks them). Its parts are timed
by wrapping the real functions with clocks, nothing re-implemented:

- ``minibatch``: the loader (gather of the cells, positions of their non-zero counts);
- ``encoder``: ``VAE.inference`` (log1p, the encoder and its matrix product);
- ``decoder``: ``CountDecoder.logits`` (both gene-sized heads);
- ``likelihood``: the fused ``count_log_likelihood`` forward (it also writes the gradient
  factors);
- ``loss rest``: the rest of ``VAE.loss`` (reparameterization, KL, the mean);
- ``backward``: ``loss.backward()`` (matrix-product gradients and the likelihood's scaling);
- ``adam``: ``zero_grad`` and the fused Adam step.

Printed per batch size and thread count: the median of each part over ``--steps`` steps (ms),
its share of the step, and the throughput of the step's gene-sized matrix products measured
alone, for the floor they set. Run from the project root::

    python benchmarks/step_breakdown.py --batch-sizes 128 512 --threads 1 2
"""

from __future__ import annotations

import argparse
import functools
import math
import time
from collections import defaultdict

import pandas as pd
from _prep import data_path, prepare
from speed import scaled_lr


def timed(clock: dict, name: str, fn, *, opens: bool = False):
    """``fn`` with a clock: its time and calls are added to ``clock[name]`` and
    ``clock[name, "calls"]`` while a training epoch runs (the wrapper with ``opens``), so the
    diagnostics ``train()`` runs after its epochs are not counted."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (opens or clock["running"]):
            return fn(*args, **kwargs)
        t0 = time.perf_counter()
        if opens:
            clock["running"] = True
        try:
            return fn(*args, **kwargs)
        finally:
            clock[name] += time.perf_counter() - t0
            clock[name, "calls"] += 1
            if opens:
                clock["running"] = False
    return wrapper


def gemm_gflops(batch: int, n_genes: int, n_hidden: int, dtype, reps: int = 30) -> float:
    """GFLOP/s of the step's three gene-sized product shapes (forward and both gradients)."""
    import torch

    a = torch.randn(batch, n_hidden, dtype=dtype)
    w = torch.randn(n_genes, n_hidden, dtype=dtype)
    g = torch.randn(batch, n_genes, dtype=dtype)
    ops = (lambda: a @ w.T, lambda: g @ w, lambda: g.T @ a)
    for op in ops:
        op()
    t0 = time.perf_counter()
    for _ in range(reps):
        for op in ops:
            op()
    seconds = (time.perf_counter() - t0) / (reps * len(ops))
    return 2 * batch * n_genes * n_hidden / seconds / 1e9


def breakdown(train, batch_size: int, steps: int, threads: int) -> dict[str, float]:
    import torch

    from omicvae_sc import OmicVAE
    from omicvae_sc.data import _loader
    from omicvae_sc.module import _nn, _vae
    from omicvae_sc.train import _trainer

    torch.set_num_threads(threads)
    OmicVAE.setup_anndata(train, layer="counts")
    model = OmicVAE(train, n_latent=10, n_hidden=128, n_layers=1, dropout_rate=0.1,
                    likelihood="zinb", seed=0)
    kwargs = dict(validation_fraction=0.0, seed=0, progress_bar=False, batch_size=batch_size,
                  lr=scaled_lr(batch_size), precision="auto")
    model.train(max_epochs=2, **kwargs)  # warm-up: allocator, caches, the loader's index
    clock: dict = defaultdict(float)
    clock["running"] = False
    parts = {  # what to time, and under which name
        (_vae.VAE, "inference"): "encoder",
        (_nn.CountDecoder, "logits"): "decoder",
        (_vae, "count_log_likelihood"): "likelihood",
        (_vae.VAE, "loss"): "loss",
        (torch.Tensor, "backward"): "backward",
        (torch.optim.Adam, "step"): "adam",
        (torch.optim.Adam, "zero_grad"): "adam",
        (_loader.CountTensors, "rows"): "minibatch",
        (_trainer, "_epoch_sums"): "epoch",  # the training passes
    }
    originals = {key: getattr(*key) for key in parts}
    epochs = max(1, round(steps / math.ceil(train.n_obs / batch_size)))
    try:
        for key, name in parts.items():
            setattr(*key, timed(clock, name, originals[key], opens=name == "epoch"))
        model.train(max_epochs=epochs, **kwargs)
    finally:
        for key, fn in originals.items():
            setattr(*key, fn)
    done = clock["loss", "calls"]  # training steps
    ms = {k: v / done * 1e3 for k, v in clock.items()
          if isinstance(k, str) and k != "running"}
    ms["loss rest"] = ms.pop("loss") - ms["encoder"] - ms["decoder"] - ms["likelihood"]
    ms["step (wall)"] = ms.pop("epoch")
    ms["other"] = ms["step (wall)"] - sum(v for k, v in ms.items() if k != "step (wall)")
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--steps", type=int, default=400, help="timed steps per setting")
    args = parser.parse_args()
    import torch

    train, _ = prepare(data_path("pbmc3k.h5ad"))
    order = ["minibatch", "encoder", "decoder", "likelihood", "loss rest", "backward", "adam",
             "other", "step (wall)"]
    for threads in args.threads:
        for bs in args.batch_sizes:
            ms = breakdown(train.copy(), bs, args.steps, threads)
            torch.set_num_threads(threads)
            flops = {str(dt).removeprefix("torch."): gemm_gflops(bs, train.n_vars, 128, dt)
                     for dt in (torch.float32, torch.bfloat16)}
            table = pd.DataFrame({"ms": [ms[k] for k in order]}, index=order)
            table["share"] = table["ms"] / ms["step (wall)"]
            print(f"\nbatch {bs}, {threads} thread(s), {train.n_obs} pbmc3k cells x "
                  f"{train.n_vars} genes; gene-sized products alone: " +
                  ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in flops.items()))
            print(table.to_string(float_format=lambda v: f"{v:.3f}"))
            print(f"steps per second {1e3 / ms['step (wall)']:.1f}, cells per second "
                  f"{bs * 1e3 / ms['step (wall)']:.0f}", flush=True)


if __name__ == "__main__":
    main()
