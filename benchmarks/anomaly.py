"""Doublet and anomaly flagging: omicvae_sc against scanpy's scrublet and scvi-tools' SOLO.

Three cases, each scored by every method on the same cells in one run:

1. ``cellbench``: CellBench CEL-seq2 + Drop-seq (499 cells), truth ``is_doublet_demuxlet``
   (49 genotype-called doublets); batch = protocol.
2. ``pbmc3k+dbl``: pbmc3k with 8% heterotypic doublets added (``round(0.08 * 2700)`` pairs of
   annotated cells of different ``cell_type``, raw counts summed); truth = the added cells.
3. ``pbmc3k-ood``: 20% of pbmc3k cells form the scored set; the model (and scvi-tools' SCVI for
   SOLO) trains on the other 80% without B cells; truth = the B cells of the scored set.

4. ``<set>+5%`` for every labelled shared set (pbmc3k, pancreas, worm neurons, CellBench without
   its demuxlet doublets): 5% artificial heterotypic doublets from ``_doublets.py`` (pairs of
   differently labelled cells, within a batch, raw counts summed; seed 0); truth = those cells.

With ``--peers-python`` (a venv holding pyscdblfinder and doubletdetection, see
``_run_peers.py``), scDblFinder's Python port and DoubletDetection score the same cells on the
same genes, per batch.

Genes: in >= 3 cells, 2,000 Seurat HVGs on a log-normalized copy of the training cells.
omicvae_sc trains with its defaults (``OmicVAE``, ZINB, early stopping); its doublet score
(``get_doublet_score``) is the primary score for cases 1, 2 and 4 and its anomaly score
(``get_anomaly_score``) for case 3; both are printed for every case, with the raw
importance-weighted -log p(x) (K=100) as the uncalibrated baseline. After the rows, a summary
gives every doublet method's AUPRC, AUROC and seconds per doublet case and their mean.
scrublet runs on the scored cells' raw counts, all genes (``sc.pp.scrublet``, per batch where
there are batches). SOLO runs in the scvi-tools venv (``_run_solo.py``). Printed: AUPRC
(average precision), AUROC, the Spearman correlation of each score with library size among
truth-negative cells, and seconds.

Run from the project root in the dev venv (scikit-learn, scikit-image for scrublet)::

    python benchmarks/anomaly.py --scvi-python /work/venvs/scvi/bin/python

Issue 26's table (every shared truth set and every artificial set, all peers)::

    python benchmarks/anomaly.py --cases cellbench cellbench+5% pancreas+5% pbmc3k+5% worm+5% \
        --peers-python /work/venvs/peers/bin/python --scvi-python /work/venvs/peers/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from _prep import data_path
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, roc_auc_score

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- cases
def hvg_names(adata: ad.AnnData, n_top: int = 2000) -> pd.Index:
    a = adata.copy()
    sc.pp.filter_genes(a, min_cells=3)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=n_top, flavor="seurat")
    return a.var_names[a.var["highly_variable"].to_numpy()]


def case_cellbench() -> dict:
    a = ad.read_h5ad(data_path("cellbench_3celllines_celseq2_dropseq.h5ad"))
    truth = a.obs["is_doublet_demuxlet"].to_numpy().astype(bool)
    return {"train": a, "score": a, "truth": truth, "batch_key": "batch", "primary": "doublet"}


def case_pbmc_doublets(rate: float = 0.08, seed: int = 0) -> dict:
    a = ad.read_h5ad(data_path("pbmc3k.h5ad"))
    rng = np.random.default_rng(seed)
    types = a.obs["cell_type"].astype(str).to_numpy()
    annotated = np.flatnonzero(types != "unannotated")
    n_dbl = round(rate * a.n_obs)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < n_dbl:
        i, j = rng.choice(annotated, 2, replace=False)
        if types[i] != types[j]:
            pairs.append((i, j))
    first, second = np.asarray(pairs).T
    counts = sp.csr_matrix(a.X)
    obs = pd.DataFrame({"cell_type": np.r_[types, [f"{types[i]}+{types[j]}" for i, j in pairs]]},
                       index=[*a.obs_names, *(f"doublet{k}" for k in range(n_dbl))])
    b = ad.AnnData(sp.vstack([counts, counts[first] + counts[second]]).tocsr(), obs=obs,
                   var=a.var[[]])
    truth = np.r_[np.zeros(a.n_obs, bool), np.ones(n_dbl, bool)]
    return {"train": b, "score": b, "truth": truth, "batch_key": None, "primary": "doublet"}


def case_pbmc_ood(withheld: str = "B", fraction: float = 0.2, seed: int = 0) -> dict:
    a = ad.read_h5ad(data_path("pbmc3k.h5ad"))
    scored = np.random.default_rng(seed).random(a.n_obs) < fraction
    types = a.obs["cell_type"].astype(str).to_numpy()
    return {"train": a[~scored & (types != withheld)].copy(), "score": a[scored].copy(),
            "truth": types[scored] == withheld, "batch_key": None, "primary": "anomaly"}


ARTIFICIAL = {  # every labelled shared set: file, label column, batch column
    "pbmc3k": ("pbmc3k.h5ad", "cell_type", None),
    "pancreas": ("bastidasponce2019_pancreas_endocrine_2000hvg.h5ad", "cell_type", None),
    "worm": ("cao2017_worm_neuron_sciRNAseq.h5ad", "cell_type_code", None),
    "cellbench": ("cellbench_3celllines_celseq2_dropseq.h5ad", "cell_line", "batch"),
}
"""Sets given 5% artificial heterotypic doublets by ``_doublets.heterotypic_doublets`` (seed 0;
CellBench without its demuxlet doublets, pairs within a protocol)."""


def case_artificial(name: str, rate: float = 0.05, seed: int = 0) -> dict:
    from _doublets import heterotypic_doublets

    file, label_key, batch_key = ARTIFICIAL[name]
    a = ad.read_h5ad(data_path(file))
    if "is_doublet_demuxlet" in a.obs:
        a = a[~a.obs["is_doublet_demuxlet"].to_numpy().astype(bool)].copy()
    b = heterotypic_doublets(a, label_key, rate=rate, seed=seed, batch_key=batch_key)
    del b.uns["doublets"]["pairs"]
    return {"train": b, "score": b, "truth": b.obs["is_doublet"].to_numpy(),
            "batch_key": batch_key, "primary": "doublet"}


CASES = {"cellbench": case_cellbench, "pbmc3k+dbl": case_pbmc_doublets,
         "pbmc3k-ood": case_pbmc_ood,
         **{f"{name}+5%": (lambda n=name: case_artificial(n)) for name in ARTIFICIAL}}


# ---------------------------------------------------------------------------- methods
def run_omicvae(train: ad.AnnData, score: ad.AnnData, batch_key: str | None, seed: int) -> dict:
    import omicvae_sc as ov

    start = time.perf_counter()
    ov.OmicVAE.setup_anndata(train, batch_key=batch_key)
    model = ov.OmicVAE(train, seed=seed)
    model.train(seed=seed, progress_bar=False)
    trained = time.perf_counter()
    doublet = model.get_doublet_score(score, seed=seed)
    scored_dbl = time.perf_counter()
    anomaly = model.get_anomaly_score(score, seed=seed)
    end = time.perf_counter()
    # the uncalibrated baseline the issue names: -log p(x), importance-weighted (K=100)
    nll = -model.get_marginal_ll(score, n_samples=100, seed=seed)
    return {"doublet": doublet, "anomaly": anomaly, "-log p(x)": nll,
            "epochs": len(model.history),
            "seconds": {"train": trained - start, "doublet": scored_dbl - trained,
                        "anomaly": end - scored_dbl,
                        "-log p(x)": time.perf_counter() - end}}


def run_scrublet(score: ad.AnnData, batch_key: str | None, seed: int) -> dict:
    a = score.copy()
    start = time.perf_counter()
    sc.pp.scrublet(a, batch_key=batch_key, use_approx_neighbors=False, random_state=seed)
    return {"doublet": a.obs["doublet_score"].to_numpy(), "seconds": time.perf_counter() - start}


def run_peers(score_path: Path, batch_key: str | None, seed: int, python: str,
              out: Path) -> dict:
    """pyscdblfinder and DoubletDetection in their own venv (``_run_peers.py``)."""
    cmd = [python, str(HERE / "_run_peers.py"), "--score", str(score_path), "--out", str(out),
           "--seed", str(seed)]
    if batch_key is not None:
        cmd += ["--batch-key", batch_key]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def run_solo(train_path: Path, score_path: Path, batch_key: str | None, seed: int,
             python: str, threads: int, out: Path) -> dict:
    cmd = [python, str(HERE / "_run_solo.py"), "--train", str(train_path), "--score",
           str(score_path), "--out", str(out), "--seed", str(seed), "--threads", str(threads)]
    if batch_key is not None:
        cmd += ["--batch-key", batch_key]
    subprocess.run(cmd, check=True)
    result = json.loads(out.read_text())
    return {"doublet": np.asarray(result["score"]), "seconds": result["seconds"]}


# ---------------------------------------------------------------------------- report
def figures(truth: np.ndarray, score: np.ndarray, library: np.ndarray) -> dict:
    rho = spearmanr(score[~truth], library[~truth]).statistic
    return {"auprc": average_precision_score(truth, score), "auroc": roc_auc_score(truth, score),
            "rho_library": rho}


def run_case(name: str, case: dict, args: argparse.Namespace, workdir: Path) -> list[dict]:
    genes = hvg_names(case["train"])
    train, score = case["train"][:, genes].copy(), case["score"][:, genes].copy()
    same = case["train"] is case["score"]
    paths = {"train": workdir / f"{name}_train.h5ad", "score": workdir / f"{name}_score.h5ad"}
    train.write_h5ad(paths["train"])
    if not same:
        score.write_h5ad(paths["score"])
    truth, library = case["truth"], np.asarray(score.X.sum(1)).ravel()
    rows = []
    ov_out = run_omicvae(train, score if not same else train, case["batch_key"], args.seed)
    for kind in ("doublet", "anomaly", "-log p(x)"):
        label = f"omicvae_sc {kind}" + (" *" if kind == case["primary"] else "")
        secs = ov_out["seconds"]["train"] + ov_out["seconds"][kind]
        rows.append({"case": name, "method": label, "seconds": secs,
                     **figures(truth, ov_out[kind], library)})
    scr = run_scrublet(case["score"], case["batch_key"], args.seed)
    rows.append({"case": name, "method": "scrublet", "seconds": scr["seconds"],
                 **figures(truth, scr["doublet"], library)})
    if args.peers_python:
        peers = run_peers(paths["train" if same else "score"], case["batch_key"], args.seed,
                          args.peers_python, workdir / f"{name}_peers.json")
        for method, result in peers.items():
            if "error" in result:
                print(f"{name}: {method} failed:\n{result['error']}", file=sys.stderr)
                continue
            rows.append({"case": name, "method": method, "seconds": result["seconds"],
                         **figures(truth, np.asarray(result["score"]), library)})
    if args.scvi_python:
        solo = run_solo(paths["train"], paths["train" if same else "score"], case["batch_key"],
                        args.seed, args.scvi_python, args.threads, workdir / f"{name}_solo.json")
        rows.append({"case": name, "method": "SOLO (scvi-tools)", "seconds": solo["seconds"],
                     **figures(truth, solo["doublet"], library)})
    for row in rows:
        row |= {"positives": int(truth.sum()), "cells": len(truth),
                "omicvae_epochs": ov_out["epochs"]}
    return rows


def summary(rows: list[dict]) -> str:
    """AUPRC, AUROC and seconds of every doublet method on every doublet case (omicvae_sc's
    doublet score, scrublet and the peers), one row per case and their mean."""
    df = pd.DataFrame(rows)
    df = df[~df["method"].str.startswith("omicvae_sc") | (df["method"] == "omicvae_sc doublet *")]
    df = df[df["case"].isin(df.loc[df["method"] == "omicvae_sc doublet *", "case"])]
    df["method"] = df["method"].replace({"omicvae_sc doublet *": "omicvae_sc"})
    out = []
    for figure in ("auprc", "auroc", "seconds"):
        table = df.pivot_table(index="case", columns="method", values=figure, sort=False)
        table.loc["mean"] = table.mean()
        out.append(f"{figure}:\n{table.to_string(float_format='%.3f')}")
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scvi-python", default=os.environ.get("SCVI_PYTHON"),
                        help="python of the scvi-tools venv (SOLO is skipped without it)")
    parser.add_argument("--peers-python", default=os.environ.get("PEERS_PYTHON"),
                        help="python of the venv with pyscdblfinder and doubletdetection "
                             "(skipped without it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            rows += run_case(name, CASES[name](), args, Path(tmp))
            print(pd.DataFrame(rows).to_string(index=False, float_format="%.3f"), flush=True)
    print(f"\nload average {os.getloadavg()}; * = the omicvae_sc score meant for the case",
          file=sys.stderr)
    print("\n" + summary(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
