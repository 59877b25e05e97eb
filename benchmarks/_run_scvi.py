"""Train scvi-tools SCVI on prepared train cells; save test/train latents and held-out log p(x).

Runs in the scvi-tools venv (scvi-tools is never a dependency of omicvae_sc).  Called by
``vs_scvi.py``; runnable alone on the files written by ``_prep.py``::

    /work/venvs/dev/bin/python benchmarks/_prep.py --out-dir /tmp/pbmc3k_prep
    /work/venvs/scvi/bin/python benchmarks/_run_scvi.py --train /tmp/pbmc3k_prep/train.h5ad \
        --test /tmp/pbmc3k_prep/test.h5ad --epochs 200 --seed 0 --out /tmp/scvi.npz

Saved arrays (.npz): ``z_train``, ``z_test`` (posterior means, cells x 10), ``ll_test``
(per-cell importance-weighted log p(x), 100 samples, nats), ``obs_train``, ``obs_test``
(cell names, to check alignment), ``train_seconds`` (wall time of ``train()`` only),
``epochs`` (epochs actually run), ``tool``, ``version``,
``n_train``, ``peak_rss_mb`` (VmHWM after training, reset just before it),
``rss_before_train_mb`` (VmRSS with the
data loaded), ``rss_base_mb`` (VmHWM after imports).
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
    parser.add_argument("--batch-size", type=int, default=128, help="scvi-tools' default: 128")
    parser.add_argument("--lr", type=float, default=None,
                        help="plan_kwargs lr; default: scvi-tools' (1e-3)")
    parser.add_argument("--counts-in-x", action="store_true",
                        help="the counts are in X only (files from make_large.py)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: accelerator='gpu', one device")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import scvi  # imported late so that --help works without the scvi venv
    import torch
    from _device import GPUClock

    torch.set_num_threads(args.threads)
    rss_base = rss_mb()  # imports only
    scvi.settings.seed = args.seed
    train, test = ad.read_h5ad(args.train), ad.read_h5ad(args.test)
    if args.counts_in_x:
        for part in (train, test):
            part.layers["counts"] = part.X

    scvi.model.SCVI.setup_anndata(train, layer="counts")
    model = scvi.model.SCVI(
        train,
        n_latent=10,
        n_hidden=128,
        n_layers=1,
        dropout_rate=0.1,
        gene_likelihood=args.likelihood,
    )
    gpu = GPUClock(torch.device(args.device))
    rss_before_train = reset_peak_rss()  # data loaded and set up; the peak starts afresh
    gpu.start()
    start = time.perf_counter()
    # train_size=1.0: no validation split, every training cell is used (accepted by 1.4.2).
    # scvi-tools' default KL warm-up is 400 epochs, so at 200 epochs the KL weight only reaches
    # ~0.5; we keep the default (scvi-tools as users run it).  With plan_kwargs=
    # {"n_epochs_kl_warmup": 50} (omicvae_sc's 25% schedule) held-out log p(x) rises ~8 nats.
    model.train(
        max_epochs=args.epochs,
        train_size=1.0,
        batch_size=args.batch_size,
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        plan_kwargs=None if args.lr is None else {"lr": args.lr},
        enable_progress_bar=False,
    )
    gpu.stop()
    train_seconds = time.perf_counter() - start
    peak_mb = rss_mb()
    epochs = len(model.history["elbo_train"])

    z_train = model.get_latent_representation(train)
    z_test = model.get_latent_representation(test)
    # return_mean=False gives log p(x) per cell (higher is better).  return_mean=True averages
    # per-minibatch means: with 270 cells the last minibatch of 14 cells weighs as much as 128,
    # which on pbmc3k gives -623.1 instead of the per-cell mean -615.8.
    ll_test = model.get_marginal_ll(test, n_mc_samples=args.n_mc_samples, return_mean=False)

    np.savez(
        args.out,
        z_train=np.asarray(z_train, dtype=np.float32),
        z_test=np.asarray(z_test, dtype=np.float32),
        ll_test=ll_test.detach().cpu().numpy().astype(np.float64),
        obs_train=np.asarray(train.obs_names, dtype=str),
        obs_test=np.asarray(test.obs_names, dtype=str),
        train_seconds=train_seconds,
        peak_rss_mb=peak_mb,
        rss_before_train_mb=rss_before_train,
        rss_base_mb=rss_base,
        n_train=train.n_obs,
        **gpu.figures(),
        epochs=epochs,
        tool="scvi-tools",
        version=scvi.__version__,
    )
    print(
        f"scvi-tools {scvi.__version__}: {epochs} epochs in {train_seconds:.1f} s, "
        f"held-out log p(x) {ll_test.mean().item():.2f} nats/cell -> {args.out}"
    )


if __name__ == "__main__":
    main()
