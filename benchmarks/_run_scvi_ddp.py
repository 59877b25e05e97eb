"""scvi-tools' own multi-process training (Lightning DDP) on the CPU, timed per epoch.

Runs in the peers' venv (scvi-tools is never a dependency of omicvae_sc); called by
``distributed.py --part scvi``. Lightning starts the other processes itself (it runs this
script again with their ranks). Prints one ``RESULT {json}`` line from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import anndata as ad
import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--h5ad", required=True)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    import scvi
    import torch
    from lightning.pytorch.callbacks import Callback

    torch.set_num_threads(args.threads)

    class EpochTimer(Callback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, module):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            self.seconds.append(time.perf_counter() - self.t0)

    adata = ad.read_h5ad(args.h5ad)
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata)
    timer = EpochTimer()
    strategy = "ddp_find_unused_parameters_true" if args.devices > 1 else "auto"
    model.train(max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
                strategy=strategy, train_size=1.0, batch_size=args.batch_size,
                enable_progress_bar=False, callbacks=[timer], logger=False,
                enable_checkpointing=False)  # nothing left in the working folder
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        epoch = float(np.median(timer.seconds[1:] or timer.seconds))
        print("RESULT " + json.dumps({
            "tool": "scvi-tools", "version": scvi.__version__, "processes": args.devices,
            "threads": args.threads, "batch_size": args.batch_size, "cells": adata.n_obs,
            "epoch_s": epoch, "cells_per_s": adata.n_obs / epoch}), flush=True)


if __name__ == "__main__":
    main()
