"""A user's training script, run by the distributed tests under ``torchrun`` (several processes)
and with ``python`` (one): it builds or reads the data, trains, and writes what it learned.

Each process writes ``<out>/rank<R>.npz`` (history, weights, latent, log p(x) of held-out
cells) and, at start, ``<out>/pid<R>-<restart>.txt`` (its process id, for the fault tests;
``restart`` counts torchrun's restarts). Not a test
module: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

import omicvae_sc as ov


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cells", type=int, default=600)
    p.add_argument("--genes", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--likelihood", default="zinb")
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--early-stopping", action="store_true")
    p.add_argument("--sync-batchnorm", action="store_true")
    p.add_argument("--h5ad", type=Path, help="train on this file, opened backed='r'")
    p.add_argument("--in-memory", action="store_true", help="read --h5ad whole")
    p.add_argument("--distributed", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--labels", help="obs column saved beside the latent")
    p.add_argument("--block-rows", type=int, default=1024)
    p.add_argument("--checkpoint-dir", type=Path)
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the checkpoint; --resume auto: when there is one")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--held-out", type=Path, help="h5ad of cells to score log p(x) on")
    p.add_argument("--batch-key")
    p.add_argument("--layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cuda: GPU LOCAL_RANK (device='auto')")
    p.add_argument("--tl", action="store_true",
                   help="run ov.tl.omicvae (fit, results, a saved model) instead of train")
    p.add_argument("--nan-at-step", type=int, help="make this training step's loss NaN...")
    p.add_argument("--nan-rank", type=int, default=1, help="...on this process only")
    p.add_argument("--cells-plus-rank", action="store_true",
                   help="give each process other data (rank R: R more cells), a user's error")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = _args(argv)
    rank = int(os.environ.get("RANK", "0"))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"pid{rank}-{restart}.txt").write_text(str(os.getpid()))
    if args.h5ad is not None:
        import anndata as ad

        adata = ad.read_h5ad(args.h5ad, backed=None if args.in_memory else "r")
    else:
        n = args.cells + (rank if args.cells_plus_rank else 0)
        adata = ov.datasets.synthetic_counts(n, args.genes, seed=1)
    if args.tl:
        _tl(adata, args, rank)
        return
    ov.OmicVAE.setup_anndata(adata, layer=args.layer, batch_key=args.batch_key)
    device = "auto" if args.device == "cuda" else args.device
    model = ov.OmicVAE(adata, likelihood=args.likelihood, seed=args.seed, device=device)
    result = {}
    before = {} if args.nan_at_step is None else _nan_at(model, args.nan_at_step,
                                                          args.nan_rank == rank)
    try:
        model.train(max_epochs=args.epochs, batch_size=args.batch_size, precision="float32",
                    validation_fraction=args.validation_fraction,
                    early_stopping=args.early_stopping, progress_bar=False,
                    sync_batchnorm=args.sync_batchnorm, dist_timeout=args.timeout,
                    checkpoint_dir=args.checkpoint_dir, checkpoint_every=1,
                    resume=args.resume, block_rows=args.block_rows,
                    distributed={"auto": None, "on": True, "off": False}[args.distributed])
    except ov.train.TrainingDiverged as err:
        result["diverged"] = np.asarray(str(err))
    result |= before
    result |= {f"w.{k}": v.numpy() for k, v in model.module.state_dict().items()}
    result |= {f"h.{k}": np.asarray(v, dtype=float)
               for k, v in model.history.to_dict().items() if isinstance(v, np.ndarray)}
    result["latent"] = model.get_latent_representation()
    result["threads"] = np.asarray(torch.get_num_threads())
    if args.labels is not None:
        result["labels"] = adata.obs[args.labels].astype(str).to_numpy()
    if args.held_out is not None:
        import anndata as ad

        held = ad.read_h5ad(args.held_out)
        result["held_out_log_px"] = model.get_marginal_ll(held, n_samples=100)
    np.savez(args.out / f"rank{rank}.npz", **result)


def _tl(adata, args: argparse.Namespace, rank: int) -> None:
    """The one-call path: fit, every result, the denoised layer in a zarr store and a saved
    model (rank 0 writes both)."""
    ov.tl.omicvae(adata, max_epochs=args.epochs, device="cpu", progress_bar=False,
                  batch_key=args.batch_key, save_model=args.out / "model", layers=True,
                  denoised_path=args.out / "denoised.zarr",
                  train_kwargs={"batch_size": args.batch_size, "precision": "float32",
                                "dist_timeout": args.timeout})
    np.savez(args.out / f"rank{rank}.npz", latent=adata.obsm["X_omicvae"],
             denoised=np.asarray(adata.layers["omicvae_denoised"][:]),
             **{c: adata.obs[c].to_numpy() for c in adata.obs if c.startswith("omicvae_")})


def _nan_at(model, step: int, here: bool) -> dict:
    """From training step ``step`` (0-based) on, this process's loss is NaN when ``here``;
    the returned dict receives every process's weights as they were before that step."""
    before, calls, loss = {}, [0], model.module.loss

    def faulty(*args, **kwargs):
        if not model.module.training:
            return loss(*args, **kwargs)
        if calls[0] == step:
            before.update({f"before.{k}": v.numpy().copy()
                           for k, v in model.module.state_dict().items()})
        out = loss(*args, **kwargs)
        calls[0] += 1
        if here and calls[0] > step:
            out = type(out)(loss=out.loss * float("nan"), distortion=out.distortion,
                            rate=out.rate)
        return out

    model.module.loss = faulty
    return before


if __name__ == "__main__":
    main(sys.argv[1:])
