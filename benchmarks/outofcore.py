"""Training from disk: memory, speed and quality of the block-streaming loader.

Three parts, each a table; every measurement runs in its own child process so that its peak
resident memory (VmHWM, reset after imports) is its own.

``scale``: for each file given (written by ``make_large.py``), one training epoch and the
latent of every cell, streamed from disk (``ov.read_lazy``) and, for ``--memory-up-to`` cells or
fewer, from memory (``anndata.read_h5ad``): seconds of the set-up check, of the epoch and of the
latent, training cells/s, peak RSS, the RSS once the file is open (imports plus the AnnData's
own obs and var, which anndata keeps in memory; ``obs_mb`` is obs's own size) and the peak
above that (``model_peak_mb``: what set-up, training and inference add, the latent included,
unless ``--latent-to-disk`` writes it to a zarr store chunk by chunk), and the peak and RSS
after each stage, each stage's peak its own. ``--drop-cache`` adds a
streamed run whose page cache is emptied after set-up, so that the epoch reads every block from
the disk, as it would from a file larger than the page cache. ``--scvi-python`` adds
scvi-tools 1.4.2 on the same file (it loads the file into memory): its peak RSS and cells/s for
one epoch.

``end-to-end``: ``tl.omicvae`` on each file opened with ``ov.read_lazy`` (``--epochs`` epochs;
anomaly scores only with ``--anomaly``, doublets only with ``--doublets``), its per-cell
results written to a new h5ad without the counts: wall time, the time of each stage, and peak
RSS.

``quality``: held-out log p(x) (K=100 importance samples) after the same epochs and seed, fully
shuffled in memory against block-shuffled streaming at several block and buffer sizes, on
real sets from ``../shared/data`` written in their own order and sorted by cell type (each block
one type: the hard case).

Examples::

    python benchmarks/make_large.py --cells 1000000 --out /tmp/large/pbmc_1m.h5ad
    python benchmarks/outofcore.py --part scale --files /tmp/large/pbmc_100k.h5ad \\
        /tmp/large/pbmc_1m.h5ad --scvi-python /work/venvs/peers/bin/python
    python benchmarks/outofcore.py --part quality --epochs 100
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _prep import data_path, prepare, reset_peak_rss, rss_mb  # noqa: E402

QUALITY_SETS = {"pbmc3k": ("pbmc3k.h5ad", "cell_type"),
                "pancreas": ("bastidasponce2019_pancreas_endocrine_2000hvg.h5ad", "cell_type")}
STREAM_GRID = [(1024, 16), (256, 4), (64, 4), (16, 4), (64, 1)]
"""(block_rows, buffer_blocks) tried in the quality part: the default, then smaller buffers."""


# ---------------------------------------------------------------------------- children
def child_scale(args) -> dict:
    """One epoch and the latent of one file, streamed or in memory; the peak and the RSS after
    each stage (opening, set-up, epoch, latent), each peak its own (VmHWM reset before it)."""
    import anndata as ad
    import torch

    import omicvae_sc as ov

    torch.set_num_threads(args.threads)
    stages: dict[str, float] = {}

    def stage(name, since):
        stages[f"{name}_s"] = time.perf_counter() - since
        stages[f"{name}_peak_mb"], stages[f"{name}_rss_mb"] = rss_mb(), rss_mb("VmRSS")
        reset_peak_rss()
        return time.perf_counter()

    base = reset_peak_rss()
    t0 = time.perf_counter()
    adata = ov.read_lazy(args.file) if args.mode == "stream" else ad.read_h5ad(args.file)
    t0 = stage("open", t0)  # imports and the AnnData (its obs and var live in memory)
    ov.OmicVAE.setup_anndata(adata)
    model = ov.OmicVAE(adata, device="cpu", seed=0)
    if args.drop_cache:  # the set-up check just read the file: the epoch must not find it cached
        _drop_page_cache()
    t0 = stage("setup", t0)
    model.train(1, batch_size=args.batch_size, validation_fraction=0.0, progress_bar=False,
                **({"block_rows": args.block_rows, "buffer_blocks": args.buffer_blocks}
                   if args.mode == "stream" else {}))
    t0 = stage("epoch", t0)
    store = args.out_dir / f".latent-{os.getpid()}.zarr" if args.latent_to_disk else None
    z = model.get_latent_representation(out=store)
    stage("latent", t0)
    finite = bool(np.isfinite(z[:]).all())
    if store is not None:
        shutil.rmtree(store)
    peaks = [stages[f"{k}_peak_mb"] for k in ("setup", "epoch", "latent")]
    return {"file": Path(args.file).name, "mode": args.mode, "cells": adata.n_obs,
            "cells_per_s": adata.n_obs / stages["epoch_s"], "latent_finite": finite,
            "latent": "disk" if store is not None else "memory",
            "page_cache": "dropped" if args.drop_cache else "warm",
            "peak_rss_mb": max(stages["open_peak_mb"], *peaks), "rss_base_mb": base,
            "obs_mb": adata.obs.memory_usage(deep=True).sum() / 2**20,
            "model_peak_mb": max(peaks) - stages["open_rss_mb"], **stages}


def _drop_page_cache() -> None:
    """Empty the kernel's page cache (Linux, root), so that reads go to the disk: what an epoch
    over a file larger than the page cache meets at every block."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def child_quality(args) -> dict:
    """Held-out log p(x) of one training run on a prepared train file."""
    import anndata as ad
    import torch

    import omicvae_sc as ov

    torch.set_num_threads(args.threads)
    test = ad.read_h5ad(args.test)
    if args.mode == "stream":
        train = ov.read_lazy(args.file)
        kwargs = {"block_rows": args.block_rows, "buffer_blocks": args.buffer_blocks}
    else:
        train, kwargs = ad.read_h5ad(args.file), {}
    ov.OmicVAE.setup_anndata(train)
    model = ov.OmicVAE(train, device="cpu", seed=args.seed)
    t0 = time.perf_counter()
    model.train(args.epochs, batch_size=args.batch_size, validation_fraction=0.0,
                progress_bar=False, seed=args.seed, **kwargs)
    seconds = time.perf_counter() - t0
    test.uns["omicvae_setup"] = train.uns["omicvae_setup"]
    ll = model.get_marginal_ll(test, n_samples=100)
    return {"mode": args.mode, "block_rows": args.block_rows if args.mode == "stream" else None,
            "buffer_blocks": args.buffer_blocks if args.mode == "stream" else None,
            "heldout_ll": float(np.mean(ll)), "train_s": seconds}


class _StageTimes(logging.Handler):
    """Collects the ``omicvae_sc: <stage> in <s> s`` lines of a run, and the process's peak
    and current RSS (MiB) as each stage ends, so that a run's peak can be placed."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}
        self.rss: dict[str, tuple[float, float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("omicvae_sc: ") and text.endswith(" s") and " in " in text:
            name, _, value = text[len("omicvae_sc: "):-2].rpartition(" in ")
            self.seconds[name] = self.seconds.get(name, 0.0) + float(value)
            self.mark(name)

    def mark(self, name: str) -> None:
        self.rss[name] = (round(rss_mb()), round(rss_mb("VmRSS")))


def child_end_to_end(args) -> dict:
    """``tl.omicvae`` on a file opened lazily: fit, latent, anomaly scores (and doublets with
    ``--doublets``), and the per-cell results written to a new h5ad without the counts."""
    import anndata as ad
    import torch

    import omicvae_sc as ov

    torch.set_num_threads(args.threads)
    stages = _StageTimes()
    logging.getLogger("omicvae_sc").addHandler(stages)
    logging.getLogger("omicvae_sc").setLevel(logging.INFO)
    reset_peak_rss()
    t0 = time.perf_counter()
    adata = ov.read_lazy(args.file)
    rss_open = rss_mb("VmRSS")
    ov.tl.omicvae(adata, max_epochs=args.epochs, doublets=args.doublets, anomaly=args.anomaly,
                  n_samples=args.n_samples, train_kwargs={"batch_size": args.batch_size},
                  progress_bar=True)
    t_fit = time.perf_counter() - t0
    stages.mark("fit and scores (tl.omicvae)")
    out = Path(args.out_dir) / (Path(args.file).stem + "_omicvae_results.h5ad")
    ad.AnnData(obs=adata.obs, obsm=dict(adata.obsm), uns=dict(adata.uns)).write_h5ad(out)
    stages.mark("results written")
    return {"file": Path(args.file).name, "cells": adata.n_obs, "epochs": args.epochs,
            "anomaly": args.anomaly, "doublets": args.doublets, "n_samples": args.n_samples,
            "wall_s": time.perf_counter() - t0, "fit_and_score_s": t_fit,
            "peak_rss_mb": rss_mb(), "rss_open_mb": rss_open,
            "results_file_mb": out.stat().st_size / 2**20, "stages_s": stages.seconds,
            "peak_and_rss_mb_after": stages.rss,
            "obs_columns": [c for c in adata.obs.columns if c.startswith("omicvae")]}


def run_child(argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--child-out", out.name, *argv], check=True)
        return json.loads(Path(out.name).read_text())


# ---------------------------------------------------------------------------- parts
def part_scale(args) -> pd.DataFrame:
    rows = []
    for file in args.files:
        import anndata as ad

        n = ad.read_h5ad(file, backed="r").n_obs
        modes = ["stream"] + (["memory"] if n <= args.memory_up_to else [])
        for mode in modes:
            for drop in [False, True] if args.drop_cache and mode == "stream" else [False]:
                row = run_child(["--child", "scale", "--mode", mode, "--file", str(file),
                                 "--batch-size", str(args.batch_size), "--threads",
                                 str(args.threads), "--block-rows", str(args.block_rows),
                                 "--buffer-blocks", str(args.buffer_blocks),
                                 "--out-dir", str(args.out_dir)]
                                + (["--drop-cache"] if drop else [])
                                + (["--latent-to-disk"] if args.latent_to_disk else []))
                print(row, flush=True)
                rows.append(row)
        if args.scvi_python and n <= args.memory_up_to:
            rows.append(scvi_epoch(args, Path(file), n))
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def scvi_epoch(args, file: Path, n: int) -> dict:
    """scvi-tools 1.4.2, one epoch on the same file (read into memory by its runner)."""
    import anndata as ad

    with tempfile.TemporaryDirectory() as tmp:
        small = ad.read_h5ad(file, backed="r")[:200].to_memory()
        small.write_h5ad(Path(tmp) / "test.h5ad")
        out = Path(tmp) / "scvi.npz"
        subprocess.run([args.scvi_python, str(HERE / "_run_scvi.py"), "--train", str(file),
                        "--test", str(Path(tmp) / "test.h5ad"), "--out", str(out),
                        "--epochs", "1", "--threads", str(args.threads), "--n-mc-samples",
                        "2", "--batch-size", str(args.batch_size), "--counts-in-x"],
                       check=True)
        got = np.load(out)
        return {"file": file.name, "mode": "scvi-tools (memory)", "cells": n,
                "epoch_s": float(got["train_seconds"]),
                "cells_per_s": n / float(got["train_seconds"]),
                "peak_rss_mb": float(got["peak_rss_mb"]),
                "rss_base_mb": float(got["rss_base_mb"])}


def part_quality(args) -> pd.DataFrame:
    import anndata as ad

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (filename, label) in QUALITY_SETS.items():
            train, test = prepare(data_path(filename))
            test.write_h5ad(Path(tmp) / f"{name}_test.h5ad")
            for order in ("file", "sorted"):
                part = train if order == "file" else train[
                    np.argsort(train.obs[label].astype(str).to_numpy(), kind="stable")].copy()
                path = Path(tmp) / f"{name}_{order}.h5ad"
                ad.AnnData(part.X, obs=part.obs, var=part.var[[]]).write_h5ad(path)
                runs = [("memory", 0, 0)] + [("stream", b, k) for b, k in STREAM_GRID]
                for mode, block, buffer in runs:
                    if mode == "memory" and order == "sorted":
                        continue  # fully shuffled: the order of the file does not matter
                    row = run_child(["--child", "quality", "--mode", mode, "--file", str(path),
                                     "--test", str(Path(tmp) / f"{name}_test.h5ad"),
                                     "--epochs", str(args.epochs), "--seed", str(args.seed),
                                     "--batch-size", str(args.batch_size), "--threads",
                                     str(args.threads), "--block-rows", str(block),
                                     "--buffer-blocks", str(buffer)])
                    row |= {"set": name, "order": order, "cells": part.n_obs}
                    print(row, flush=True)
                    rows.append(row)
    df = pd.DataFrame(rows)
    ref = df[df["mode"] == "memory"].set_index("set")["heldout_ll"]
    df["vs_memory"] = df["heldout_ll"] - df["set"].map(ref)
    return df


def part_end_to_end(args) -> pd.DataFrame:
    rows = []
    for file in args.files:
        row = run_child(["--child", "end-to-end", "--file", str(file), "--epochs",
                         str(args.epochs), "--batch-size", str(args.batch_size), "--threads",
                         str(args.threads), "--out-dir", str(args.out_dir)]
                        + (["--doublets"] if args.doublets else [])
                        + (["--anomaly"] if args.anomaly else [])
                        + ["--n-samples", str(args.n_samples)])
        print(row, flush=True)
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["scale", "quality", "end-to-end"], default="quality")
    parser.add_argument("--files", nargs="+", default=[], help="h5ad files for --part scale")
    parser.add_argument("--memory-up-to", type=int, default=1_000_000,
                        help="also run in memory (and scvi-tools) up to this many cells")
    parser.add_argument("--scvi-python", default=None)
    parser.add_argument("--epochs", type=int, default=100, help="quality part")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--block-rows", type=int, default=1024)
    parser.add_argument("--buffer-blocks", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--doublets", action="store_true", help="end-to-end: score doublets")
    parser.add_argument("--n-samples", type=int, default=25,
                        help="end-to-end: importance samples of the written log p(x)")
    parser.add_argument("--anomaly", action="store_true",
                        help="end-to-end: anomaly scores (10 generated cells a cell)")
    parser.add_argument("--drop-cache", action="store_true",
                        help="scale: also stream each file with the page cache emptied after "
                             "set-up (Linux, root): the epoch reads from the disk")
    parser.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="end-to-end: where the results h5ad is written; scale: where "
                             "--latent-to-disk writes the latent (then removed)")
    parser.add_argument("--latent-to-disk", action="store_true",
                        help="scale: write the latent to a zarr store chunk by chunk "
                             "(get_latent_representation(out=)) instead of holding it")
    # a child's own arguments
    parser.add_argument("--child", choices=["scale", "quality", "end-to-end"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["stream", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--test", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = {"scale": child_scale, "quality": child_quality,
               "end-to-end": child_end_to_end}[args.child](args)
        Path(args.child_out).write_text(json.dumps(row))
        return
    df = {"scale": part_scale, "quality": part_quality,
          "end-to-end": part_end_to_end}[args.part](args)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(df.round(3).to_string(index=False))
    if args.csv:
        df.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
