"""``tl.omicvae`` with every default on pbmc3k at 2,000, 8,000 and all 32,738 genes: seconds of
each stage and peak resident memory.

Each gene count runs in a fresh process (so its peak RSS is its own): the raw pbmc3k counts,
all 2,700 cells, ``ov.tl.omicvae(adata, n_top_genes=N)`` for N = 2,000 and 8,000 (the model's
own gene selection, seurat_v3 on the counts) and ``ov.tl.omicvae(adata)`` on every gene.
Stages are timed by the package's own log lines (``omicvae_sc: <stage> in <s> s``): gene
selection, training, log-likelihood (K=25), anomaly scores, doublet scores, latents and
diagnostics, write-back. Printed: one JSON line per run as it ends, then a table with the
after-training stages' total over training (goal at all genes: below 1) and peak RSS (goal:
under 3 GB).

    python benchmarks/full_genes.py                      # 2000, 8000, all
    python benchmarks/full_genes.py --genes all --max-epochs 5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_one(genes: str, max_epochs: int | None, threads: int) -> dict:
    """In this process: one default fit, the stages it logged and the peak RSS."""
    import anndata as ad
    import torch
    from _prep import data_path, reset_peak_rss, rss_mb

    import omicvae_sc as ov

    torch.set_num_threads(threads)
    adata = ad.read_h5ad(data_path("pbmc3k.h5ad"))
    stages: dict[str, float] = {}

    class Stages(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = re.fullmatch(r"omicvae_sc: (.+) in ([\d.]+) s", record.getMessage())
            if found:
                stages[found[1]] = stages.get(found[1], 0.0) + float(found[2])

    logger = logging.getLogger("omicvae_sc")
    logger.addHandler(Stages())
    logger.setLevel(logging.INFO)
    base = reset_peak_rss()
    start = time.perf_counter()
    n_top = None if genes == "all" else int(genes)
    ov.tl.omicvae(adata, n_top_genes=n_top, max_epochs=max_epochs, progress_bar=False)
    total = time.perf_counter() - start
    history = adata.uns["omicvae"]["history"]
    modelled = int(adata.var["omicvae_genes"].sum()) if n_top else adata.n_vars
    after = sum(v for k, v in stages.items() if k != "training")
    return {"genes": modelled, "cells": adata.n_obs, "epochs": len(history["epoch"]),
            "seconds": stages | {"total": total,
                                 "gene selection": total - sum(stages.values())},
            "after_training_over_training": after / stages["training"],
            "peak_rss_mb": rss_mb(), "rss_before_mb": base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", nargs="+", default=["2000", "8000", "all"])
    parser.add_argument("--max-epochs", type=int, default=None, help="default: the package's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's run
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.max_epochs, args.threads)), flush=True)
        return
    rows = []
    for genes in args.genes:
        cmd = [sys.executable, str(HERE / "full_genes.py"), "--one", genes,
               "--threads", str(args.threads)]
        if args.max_epochs is not None:
            cmd += ["--max-epochs", str(args.max_epochs)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'genes':>7} {'epochs':>6} {'train s':>8} {'log p s':>8} {'anomaly s':>9} "
          f"{'doublet s':>9} {'latent s':>8} {'write s':>7} {'after/train':>11} {'peak MB':>8}")
    for r in rows:
        s = r["seconds"]
        print(f"{r['genes']:>7} {r['epochs']:>6} {s['training']:>8.1f} "
              f"{s['log-likelihood, rate and distortion']:>8.1f} {s['anomaly scores']:>9.1f} "
              f"{s['doublet scores']:>9.1f} {s['latent diagnostics and latents']:>8.1f} "
              f"{s['write-back']:>7.2f} {r['after_training_over_training']:>11.2f} "
              f"{r['peak_rss_mb']:>8.0f}")
    print(f"load average {os.getloadavg()}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
