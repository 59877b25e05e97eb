"""Train omicvae_sc OmicVAE on prepared train cells; save test/train latents and held-out log p(x).

Same command line and output as ``_run_scvi.py``; runs in the dev venv.  Called by
``vs_scvi.py``; runnable alone on the files written by ``_prep.py``::

    /work/venvs/dev/bin/python benchmarks/_prep.py --out-dir /tmp/pbmc3k_prep
    /work/venvs/dev/bin/python benchmarks/_run_omicvae.py --train /tmp/pbmc3k_prep/train.h5ad \
        --test /tmp/pbmc3k_prep/test.h5ad --epochs 200 --seed 0 --out /tmp/omicvae.npz

Saved arrays (.npz): ``z_train``, ``z_test`` (posterior means, cells x 10), ``ll_test``
(per-cell importance-weighted log p(x), 100 samples, nats), ``obs_train``, ``obs_test``,
``train_seconds`` (wall time of ``train()`` only), ``epochs``, ``tool``, ``version``,
``n_train``, ``peak_rss_mb`` (VmHWM after training, reset just before it),
``rss_before_train_mb`` (VmRSS with the
data loaded), ``rss_base_mb`` (VmHWM after imports), ``csr_mb`` and ``model_mb``, and with
``--time-inference`` ``latent_seconds``, ``latent_cells``, ``marginal_ll_seconds``,
``marginal_ll_cells``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
from _prep import reset_peak_rss, rss_mb


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, type=Path, help="prepared train .h5ad")
    parser.add_argument("--test", required=True, type=Path, help="prepared held-out .h5ad")
    parser.add_argument("--out", required=True, type=Path, help="output .npz")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--likelihood", choices=["zinb", "nb", "poisson"], default="zinb")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--n-mc-samples", type=int, default=100, help="importance samples K")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the package's")
    parser.add_argument("--lr", type=float, default=None, help="default: the package's")
    parser.add_argument("--precision", default=None, help="train(precision=); default: the "
                        "package's")
    parser.add_argument("--defaults", action="store_true",
                        help="train() with every default: epochs, validation split, early "
                             "stopping (--epochs, --batch-size and --lr are ignored)")
    parser.add_argument("--device", default="cpu", help="the model's device: cpu, cuda, auto")
    parser.add_argument("--cuda-graphs", action="store_true", help="train(cuda_graphs=True)")
    parser.add_argument("--time-inference", action="store_true",
                        help="also time latents for every train cell and log p(x) (K=100) "
                             "for the first 10,000")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import torch
    import torch._dynamo
    from _device import GPUClock

    import omicvae_sc
    from omicvae_sc import OmicVAE

    # ``torch._dynamo`` (about 70 MiB of code) is imported by the first torch.optim optimizer
    # of any program; scvi-tools' own import already loads it, so loading it here too keeps
    # it out of both tools' rise during train()
    torch.set_num_threads(args.threads)
    rss_base = rss_mb()  # imports only
    train, test = ad.read_h5ad(args.train), ad.read_h5ad(args.test)
    x = train.layers["counts"]
    csr_mb = sum(a.nbytes for a in (x.data, x.indices, x.indptr)) / 2**20

    OmicVAE.setup_anndata(train, layer="counts")
    model = OmicVAE(
        train,
        n_latent=10,
        n_hidden=128,
        n_layers=1,
        dropout_rate=0.1,
        likelihood=args.likelihood,
        seed=args.seed,
        device=args.device,
    )
    gpu = GPUClock(model.device)
    rss_before_train = reset_peak_rss()  # data loaded and set up; the peak starts afresh
    gpu.start()
    start = time.perf_counter()
    if args.defaults:
        history = model.train(seed=args.seed, progress_bar=False)
    else:
        opts = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr),
                                  ("precision", args.precision)) if v is not None}
        if args.cuda_graphs:
            opts["cuda_graphs"] = True
        history = model.train(max_epochs=args.epochs, validation_fraction=0.0, seed=args.seed,
                              progress_bar=False, **opts)
    gpu.stop()
    train_seconds = time.perf_counter() - start
    peak_mb = rss_mb()
    epochs = len(history)  # History holds one entry per epoch run
    inference = {}
    if args.time_inference:
        t0 = time.perf_counter()
        model.get_latent_representation(train)
        gpu.stop()
        t1 = time.perf_counter()
        model.get_marginal_ll(train[: min(10_000, train.n_obs)].copy(), n_samples=100)
        gpu.stop()
        inference = {"latent_seconds": t1 - t0, "latent_cells": train.n_obs,
                     "marginal_ll_seconds": time.perf_counter() - t1,
                     "marginal_ll_cells": min(10_000, train.n_obs)}

    z_train = np.asarray(model.get_latent_representation(train))
    z_test = np.asarray(model.get_latent_representation(test))
    ll_test = np.asarray(model.get_marginal_ll(test, n_samples=args.n_mc_samples))
    if ll_test.shape != (test.n_obs,):
        msg = f"get_marginal_ll returned shape {ll_test.shape}; expected ({test.n_obs},)"
        raise ValueError(msg)

    np.savez(
        args.out,
        z_train=z_train.astype(np.float32),
        z_test=z_test.astype(np.float32),
        ll_test=ll_test.astype(np.float64),
        obs_train=np.asarray(train.obs_names, dtype=str),
        obs_test=np.asarray(test.obs_names, dtype=str),
        train_seconds=train_seconds,
        peak_rss_mb=peak_mb,
        rss_before_train_mb=rss_before_train,
        rss_base_mb=rss_base,
        csr_mb=csr_mb,
        model_mb=sum(p.numel() * p.element_size() for p in model.module.parameters()) / 2**20,
        n_train=train.n_obs,
        **inference,
        **gpu.figures(),
        epochs=epochs,
        tool="omicvae_sc",
        version=omicvae_sc.__version__,
    )
    print(
        f"omicvae_sc {omicvae_sc.__version__}: {epochs} epochs in {train_seconds:.1f} s, "
        f"held-out log p(x) {ll_test.mean():.2f} nats/cell -> {args.out}"
    )


if __name__ == "__main__":
    main()
