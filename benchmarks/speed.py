"""Training and inference speed: omicvae_sc against scvi-tools 1.4.2, side by side in one run.

Both tools train the same architecture (10 latent dimensions, one hidden layer of 128,
dropout 0.1, ``--likelihood``: ZINB by default, as in scvi-tools) through their runners
(``_run_omicvae.py`` in this venv, ``_run_scvi.py`` in the scvi-tools venv), one subprocess
per fit, alternating tool by tool. Printed per fit: epochs, train seconds, seconds per epoch,
training cells/s (train cells x epochs / train seconds), peak resident memory
(``peak_rss_mb``) and its rise during ``train()`` over the memory held before it, data loaded
(``train_rss_mb``; compare with ``csr_mb``, the training counts as CSR), held-out
importance-weighted log p(x) (K=100), and the ratios to scvi-tools.

Parts (``--parts``):

``pbmc3k``
    pbmc3k, 2,000 HVGs, 10% of cells held out (``_prep.py``). Both tools train ``--epochs``
    epochs (default 400, scvi-tools' own default at this size): scvi-tools once per
    ``--scvi-batch-sizes`` (default: its own default batch of 128), omicvae_sc once per
    ``--batch-sizes`` and ``--precisions`` (``train(precision=)``; ``auto``, the default, is
    bfloat16 matrix products on a CPU with AVX512-BF16 or AMX). Above batch 128 both tools get
    the learning rate 1e-3 x sqrt(batch / 128). ``speed_ratio`` and ``wall_ratio`` are against
    scvi-tools at batch 128 (as users run it); ``same_batch_ratio`` against scvi-tools at the
    fit's own batch size, where it was run.
    Then omicvae_sc with every default (validation split, early stopping): its wall time and
    held-out log p(x) beside scvi-tools' (time-to-quality). Order within a repeat: scvi-tools
    at 128, omicvae_sc's fits, then scvi-tools' other batch sizes.
``large``
    ``--large-cells`` cells resampled from pbmc3k's training cells (drawn with replacement, each
    count thinned binomially with a per-cell keep probability in [0.5, 1]); one epoch of each
    tool (cells/s, peak memory beside the CSR size); then omicvae_sc's inference: latents for
    every cell and log p(x) with K=100 for 10,000 cells.

``--device cuda`` trains both tools on the GPU (scvi-tools with ``accelerator="gpu"``, as its
users run it there) and adds ``peak_gpu_mb``, torch's peak device allocation during
``train()``; clocks are read after the device has finished its queued work; ``--cuda-graphs
both`` runs each omicvae_sc fit eagerly and replayed as a CUDA graph. On the lent GPU
machine, ``benchmarks/device_run.sh`` runs this with the wheels and data that
``benchmarks/device_kit.sh`` gathers here.

Run from the project root::

    python benchmarks/speed.py --scvi-python /work/venvs/scvi/bin/python
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from _prep import data_path, prepare

HERE = Path(__file__).resolve().parent


def resample(adata: ad.AnnData, n_cells: int, seed: int = 0) -> ad.AnnData:
    """``n_cells`` cells drawn with replacement from ``adata``, counts binomially thinned."""
    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(adata.layers["counts"])[rng.integers(adata.n_obs, size=n_cells)]
    keep = rng.uniform(0.5, 1.0, n_cells)
    x.data = rng.binomial(x.data.astype(np.int64), np.repeat(keep, np.diff(x.indptr)))
    x.data = x.data.astype(np.float32)
    x.eliminate_zeros()
    out = ad.AnnData(x, var=adata.var[[]])
    out.obs_names = [f"cell{i}" for i in range(n_cells)]
    out.layers["counts"] = out.X
    return out


GLIBC_STEADY_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
                     "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20)}
"""glibc's environment form of the malloc settings omicvae_sc makes itself (train/_heap.py),
for ``--scvi-steady-heap``."""


def fit(tool: str, train: Path, test: Path, out: Path, args, extra: list[str]) -> dict:
    python = sys.executable if tool == "omicvae_sc" else args.scvi_python
    env = {**os.environ, **(GLIBC_STEADY_HEAP if tool == "scvi" and args.scvi_steady_heap
                             else {})}
    runner = HERE / ("_run_omicvae.py" if tool == "omicvae_sc" else "_run_scvi.py")
    cmd = [python, str(runner), "--train", str(train), "--test", str(test), "--out", str(out),
           "--seed", str(args.seed), "--threads", str(args.threads),
           "--likelihood", args.likelihood, "--device", args.device, *extra]
    if args.keep_going:  # a failed fit is a row saying so; the run goes on
        rc = subprocess.run(cmd, check=False, env=env).returncode
        if rc:
            return {"tool": tool, "failed_rc": rc}
    else:
        subprocess.run(cmd, check=True, env=env)
    z = np.load(out)
    row = {k: z[k].item() for k in z.files if z[k].ndim == 0 and k not in ("tool", "version")}
    row["tool"] = tool
    row["ll_test"] = float(z["ll_test"].mean())
    row["cells_per_s"] = row["n_train"] * row["epochs"] / row["train_seconds"]
    row["s_per_epoch"] = row["train_seconds"] / row["epochs"]
    # every figure at once, so that a run cut short (a time limit) keeps it in its log
    print("fit " + json.dumps({k: v for k, v in row.items() if np.isscalar(v)}), flush=True)
    return row


def prepared(tmp: Path) -> tuple[ad.AnnData, tuple[Path, Path]]:
    """pbmc3k train cells, and the paths of the written train and test files."""
    paths = (tmp / "train.h5ad", tmp / "test.h5ad")
    train, test = prepare(data_path("pbmc3k.h5ad"))
    train.write_h5ad(paths[0])
    test.write_h5ad(paths[1])
    return train, paths


def graph_modes(args) -> list[bool]:
    """omicvae_sc's train(cuda_graphs=) values to run: ``--cuda-graphs`` off, on or both."""
    return {"off": [False], "on": [True], "both": [False, True]}[args.cuda_graphs]


def scaled_lr(batch_size: int) -> float:
    """The learning rate of a batch size: 1e-3 (both tools' default at 128) x sqrt(batch / 128)."""
    return 1e-3 * math.sqrt(batch_size / 128)


def part_pbmc3k(args, tmp: Path) -> list[dict]:
    _, paths = prepared(tmp)
    rows = []

    def scvi_fit(rep: int, bs: int) -> None:
        lr = [] if bs == 128 else ["--lr", str(scaled_lr(bs))]  # 128: its own default
        rows.append({"fit": f"scvi-tools, batch {bs}"
                            f"{f', lr {scaled_lr(bs):.2g}' if lr else ''}, "
                            f"{args.epochs} epochs", "repeat": rep, "batch": bs,
                     **fit("scvi", *paths, tmp / "s.npz", args,
                           ["--epochs", str(args.epochs), "--batch-size", str(bs), *lr])})

    scvi_sizes = args.scvi_batch_sizes if args.scvi_python else []
    for rep in range(args.repeats):
        # scvi-tools as users run it (batch 128) first, its other batch sizes last: a run cut
        # short by a time limit keeps the main comparison
        for bs in (b for b in scvi_sizes if b == 128):
            scvi_fit(rep, bs)
        for bs, precision, graphs in itertools.product(args.batch_sizes, args.precisions,
                                                       graph_modes(args)):
            lr = scaled_lr(bs)
            rows.append({"fit": f"omicvae_sc, batch {bs}, lr {lr:.2g}, {precision}"
                                f"{', CUDA graph' if graphs else ''}, {args.epochs} epochs",
                         "repeat": rep, "batch": bs,
                         **fit("omicvae_sc", *paths, tmp / "o.npz", args,
                               ["--epochs", str(args.epochs), "--batch-size", str(bs),
                                "--lr", str(lr), "--precision", precision,
                                *(["--cuda-graphs"] if graphs else [])])})
        rows.append({"fit": "omicvae_sc, all defaults (early stopping)", "repeat": rep,
                     **fit("omicvae_sc", *paths, tmp / "o.npz", args, ["--defaults"])})
        for bs in (b for b in scvi_sizes if b != 128):
            scvi_fit(rep, bs)
    return [row | {"part": "pbmc3k", "likelihood": args.likelihood} for row in rows]


def part_large(args, tmp: Path) -> list[dict]:
    train, _ = prepared(tmp)
    big = resample(train, args.large_cells, args.seed)
    path = tmp / "large.h5ad"
    big.write_h5ad(path)
    del big
    rows = []  # omicvae_sc first: a run cut short by a time limit keeps its figures
    for bs, graphs in itertools.product(args.large_batch_sizes or args.batch_sizes,
                                        graph_modes(args)):
        lr = scaled_lr(bs)
        rows.append({"fit": f"omicvae_sc, {args.large_cells} cells, batch {bs}"
                            f"{', CUDA graph' if graphs else ''}, 1 epoch",
                     **fit("omicvae_sc", path, tmp / "test.h5ad", tmp / "o.npz", args,
                           ["--epochs", "1", "--batch-size", str(bs), "--lr", str(lr),
                            "--time-inference", *(["--cuda-graphs"] if graphs else [])])})
    if args.scvi_python:
        rows.append({"fit": f"scvi-tools, {args.large_cells} cells, batch 128, 1 epoch",
                     **fit("scvi", path, tmp / "test.h5ad", tmp / "s.npz", args,
                           ["--epochs", "1"])})
    return [row | {"part": "large", "likelihood": args.likelihood} for row in rows]


def report(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in ("peak_rss_mb", "rss_before_train_mb", "cells_per_s", "train_seconds"):
        if col not in df:  # every fit failed (--keep-going)
            df[col] = np.nan
    df["train_rss_mb"] = df["peak_rss_mb"] - df["rss_before_train_mb"]
    cols = ["fit", "likelihood", "epochs", "train_seconds", "s_per_epoch", "cells_per_s", "ll_test",
            "peak_rss_mb", "train_rss_mb", "csr_mb", "model_mb", "peak_gpu_mb", "latent_seconds",
            "marginal_ll_seconds"]
    if "repeat" not in df:
        df["repeat"] = 0
    df["repeat"] = df["repeat"].fillna(0).astype(int)
    # ratios to scvi-tools' fit of the same part and repeat: the fits of one repeat run back
    # to back, so they share the machine's conditions (on a shared machine those drift)
    for mine in df.groupby(["part", "repeat"]).groups.values():
        group = df.loc[mine]
        scvi = group[group["tool"] == "scvi"]
        ref = scvi[scvi["batch"] == 128] if "batch" in scvi and (scvi["batch"] == 128).any() \
            else scvi
        if len(ref):
            df.loc[mine, "speed_ratio"] = group["cells_per_s"] / ref["cells_per_s"].mean()
            df.loc[mine, "wall_ratio"] = ref["train_seconds"].mean() / group["train_seconds"]
        if "batch" in scvi and len(scvi):  # scvi-tools at the fit's own batch size
            same = scvi.groupby("batch")["cells_per_s"].mean()
            df.loc[mine, "same_batch_ratio"] = group["cells_per_s"] / group["batch"].map(same)
    cols = ["repeat", *cols, "speed_ratio", "wall_ratio", "same_batch_ratio", "failed_rc"]
    return df[[c for c in cols if c in df]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["pbmc3k", "large"],
                        default=["pbmc3k", "large"])
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--scvi-batch-sizes", type=int, nargs="+", default=[128],
                        help="scvi-tools' batch sizes in the equal-epoch pbmc3k fits")
    parser.add_argument("--precisions", nargs="+", default=["auto"],
                        choices=["auto", "float32", "bfloat16"],
                        help="omicvae_sc train(precision=) of the equal-epoch pbmc3k fits")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--large-cells", type=int, default=100_000)
    parser.add_argument("--large-batch-sizes", type=int, nargs="+", default=None,
                        help="omicvae_sc's batch sizes in the large part (default: "
                             "--batch-sizes)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where both tools train (cuda: scvi-tools with accelerator='gpu')")
    parser.add_argument("--cuda-graphs", default="off", choices=["off", "on", "both"],
                        help="omicvae_sc's fits with train(cuda_graphs=True) (CUDA only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--likelihood", choices=["zinb", "nb"], default="zinb",
                        help="both tools' count likelihood")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scvi-python", default=os.environ.get("SCVI_PYTHON"),
                        help="python of the scvi-tools venv (scvi-tools is skipped without it)")
    parser.add_argument("--csv", type=Path, default=None, help="also write the table here")
    parser.add_argument("--scvi-steady-heap", action="store_true",
                        help="run scvi-tools with glibc's MALLOC_MMAP_THRESHOLD_ and "
                             "MALLOC_TRIM_THRESHOLD_ at omicvae_sc's own settings")
    parser.add_argument("--keep-going", action="store_true",
                        help="record a failed fit (its exit status in failed_rc) and go on")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            rows += (part_pbmc3k if part == "pbmc3k" else part_large)(args, Path(tmp))
            df = report(rows)
            print(df.to_string(index=False, float_format="%.3f"), flush=True)
            if args.csv:  # after each part, so that a run cut short keeps what it measured
                df.to_csv(args.csv, index=False)
    print(f"\nload average {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()
