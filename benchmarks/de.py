"""Differential expression users can trust (issue 23): omicvae_sc against scvi-tools 1.4.2's
``differential_expression`` and scanpy's Wilcoxon ``rank_genes_groups`` on the same cells.

Data: pbmc3k's annotated cells, genes in >= 3 cells, 2,000 HVGs (seurat flavour, chosen before
any change is simulated). **Simulated changes** (``simulate``, seeded): CD14+ monocytes split at
random into arms A and B; 100 genes detected in >= 10% of them (the canonical markers below
left out) get a known log2 fold change L ~ U(0.5, 2): for 50 every count in arm B is thinned
binomially with probability 2^-L (up in A), for 50 those in arm A (down in A). Counts stay
real integer counts; every other gene and cell is untouched. A **null split**: naive CD4 T
cells halved at random (``null`` x against y): every call there is false. **Real markers**:
each annotated type against the rest, scored by where the canonical pbmc3k markers (Seurat's
tutorial; those among the 2,000 genes) fall among the genes each method ranks up-regulated:
the share in the top 10 and the median rank.

Methods: omicvae_sc (``OmicVAE`` with its defaults, then ``differential_expression`` with its
defaults: ``mode="change"``, ``delta=0.25``, ``fdr=0.05``); scVI (its defaults, then
``mode="change"``, ``delta=0.25``, ``fdr_target=0.05``; ``_run_de_scvi.py`` in the peers'
venv); scanpy's Wilcoxon on log-normalized counts (calls: Benjamini-Hochberg ``pvals_adj <
0.05``). The simulation's figures are means over the seeds (Wilcoxon has no seed).
Rankings: each method's own (the order of its table: omicvae_sc by the probability of a
change, ties by how far the LFC's interval lies from 0; scVI by ``proba_de``; Wilcoxon by the
p-value, ties by |score|). Seed agreement: the mean Jaccard index of the top 100 genes of A
against B between every pair of ``--seeds`` (training and test seeded alike). Seconds and peak
memory (resident, above the start of the call) are those of the test alone, the model already
trained.

    python benchmarks/de.py --peers-python /work/venvs/peers/bin/python --out-dir /tmp/de
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from sklearn.metrics import average_precision_score

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _metrics import annotated_mask  # noqa: E402
from _prep import data_path, reset_peak_rss, rss_mb  # noqa: E402

MARKERS = {"Naive CD4 T": ["IL7R", "CCR7"], "Memory CD4 T": ["IL7R", "S100A4"],
           "CD14+ Mono": ["CD14", "LYZ"], "B": ["MS4A1", "CD79A"], "CD8 T": ["CD8A"],
           "FCGR3A+ Mono": ["FCGR3A", "MS4A7"], "NK": ["GNLY", "NKG7"],
           "DC": ["FCER1A", "CST3"], "Platelet": ["PPBP"]}
SIM_TYPE, NULL_TYPE, N_DE, TOP = "CD14+ Mono", "Naive CD4 T", 100, 100
GENES: set[str] = set()  # the genes of the prepared set (markers outside it are not scored)


def prepared() -> ad.AnnData:
    adata = ad.read_h5ad(data_path("pbmc3k.h5ad"))
    adata = adata[annotated_mask(adata.obs["cell_type"].astype(str).to_numpy())].copy()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).astype("category")
    adata = adata[:, np.asarray((adata.X > 0).sum(0)).ravel() >= 3].copy()
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=2000, flavor="seurat")
    adata = adata[:, norm.var["highly_variable"].to_numpy()].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def simulate(adata: ad.AnnData, seed: int = 0, kind_changed: str = SIM_TYPE
             ) -> tuple[ad.AnnData, pd.Series]:
    """``adata`` with the changes of the module docstring; returns it and the true LFC of
    every gene (0 for the untouched ones)."""
    rng = np.random.default_rng(seed)
    x = adata.X.toarray()
    kind = adata.obs["cell_type"].to_numpy()
    sim = np.flatnonzero(kind == kind_changed)
    arm_a = rng.random(len(sim)) < 0.5
    markers = {g for genes in MARKERS.values() for g in genes}
    detected = (x[sim] > 0).mean(0) >= 0.1
    candidates = np.flatnonzero(detected & ~adata.var_names.isin(list(markers)))
    de = rng.choice(candidates, N_DE, replace=False)
    lfc = rng.uniform(0.5, 2.0, N_DE)
    truth = np.zeros(adata.n_vars)
    for i, (gene, l2) in enumerate(zip(de, lfc, strict=True)):
        up = i < N_DE // 2
        cells = sim[~arm_a] if up else sim[arm_a]
        x[cells, gene] = rng.binomial(x[cells, gene].astype(np.int64), 2.0**-l2)
        truth[gene] = l2 if up else -l2
    out = adata.copy()
    out.X = sp.csr_matrix(x.astype(np.float32))
    out.layers["counts"] = out.X.copy()
    arms = np.full(adata.n_obs, None, dtype=object)
    arms[sim] = np.where(arm_a, "A", "B")
    out.obs["sim"] = pd.Categorical(arms)
    null = np.flatnonzero(kind == NULL_TYPE)
    halves = np.full(adata.n_obs, None, dtype=object)
    halves[null] = np.where(rng.random(len(null)) < 0.5, "x", "y")
    out.obs["null"] = pd.Categorical(halves)
    return out, pd.Series(truth, index=adata.var_names)


def sim_scores(order: list[str], calls: set[str], truth: pd.Series) -> dict:
    true = set(truth.index[truth != 0])
    position = pd.Series(np.arange(len(order)), index=order).reindex(truth.index)
    hit = len(calls & true)
    return {"AUPRC": average_precision_score(truth.to_numpy() != 0, -position.to_numpy()),
            "calls": len(calls), "precision": hit / len(calls) if calls else np.nan,
            "recall": hit / len(true),  # no call, no false discovery:
            "observed FDR": 1 - hit / len(calls) if calls else 0.0}


def marker_ranks(up_orders: dict[str, list[str]]) -> list[int]:
    """Rank (1 = first) of each canonical marker among its group's up-regulated genes (one
    past the last when the method does not rank it up)."""
    return [up_orders[g].index(m) + 1 if m in up_orders[g] else len(up_orders[g]) + 1
            for g, ms in MARKERS.items() for m in ms if g in up_orders and m in GENES]


def jaccard(tops: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(set(a) | set(b))
                          for a, b in itertools.combinations(tops, 2)]))


def timed(fn):
    base = reset_peak_rss()
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start, rss_mb() - base


def run_omicvae(adata: ad.AnnData, seeds: list[int], out_dir: Path) -> dict:
    import omicvae_sc as ov

    out = {"tops": [], "sims": [], "seconds": {}, "peak_mb": {}}
    for seed in seeds:
        work = adata.copy()
        ov.OmicVAE.setup_anndata(work, layer="counts")
        model = ov.OmicVAE(work, seed=seed, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.train(progress_bar=False)
        table, secs, peak = timed(lambda m=model, w=work, s=seed: m.differential_expression(
            "sim", "A", "B", adata=w, seed=s, key_added=None))
        out["tops"].append(list(table.index[:TOP]))  # its own ranking
        out["sims"].append(table)
        table.to_csv(out_dir / f"omicvae_sim_{seed}.csv")
        out["seconds"][f"sim_{seed}"], out["peak_mb"][f"sim_{seed}"] = secs, peak
        if seed != seeds[0]:
            continue
        out["sim"] = table
        out["null"] = model.differential_expression("null", "x", "y", adata=work,
                                                    key_added=None)
        _, secs, peak = timed(lambda m=model, w=work: ov.tl.differential_expression(
            w, groupby="cell_type", model=m, progress_bar=False))
        out["seconds"]["cell_type"], out["peak_mb"]["cell_type"] = secs, peak
        up = {}
        for group in work.obs["cell_type"].cat.categories:
            frame = sc.get.rank_genes_groups_df(work, group, key="omicvae_de")
            up[group] = list(frame["names"][frame["logfoldchanges"] > 0])
        out["markers"] = marker_ranks(up)
    return out


def run_wilcoxon(adata: ad.AnnData) -> dict:
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    out = {}
    for key, g1, g2 in (("sim", "A", "B"), ("null", "x", "y")):
        sub = norm[norm.obs[key].notna()].copy()
        (_, secs, peak) = timed(lambda s=sub, k=key, a=g1, b=g2: sc.tl.rank_genes_groups(
            s, k, groups=[a], reference=b, method="wilcoxon"))
        frame = sc.get.rank_genes_groups_df(sub, g1)
        frame = frame.iloc[np.lexsort((-np.abs(frame["scores"]), frame["pvals"]))]
        out[key] = frame
        out.setdefault("seconds", {})[key] = secs
        out.setdefault("peak_mb", {})[key] = peak
    _, secs, peak = timed(lambda: sc.tl.rank_genes_groups(norm, "cell_type", method="wilcoxon"))
    out["seconds"]["cell_type"], out["peak_mb"]["cell_type"] = secs, peak
    out["markers"] = marker_ranks({g: list(sc.get.rank_genes_groups_df(norm, g).query(
        "logfoldchanges > 0")["names"]) for g in norm.obs["cell_type"].cat.categories})
    return out


def scvi_results(out_dir: Path, seeds: list[int]) -> dict:
    record = json.loads((out_dir / "scvi.json").read_text())
    read = {s: pd.read_csv(out_dir / f"scvi_sim_{s}.csv", index_col=0) for s in seeds}
    res = {"sim": read[seeds[0]],
           "null": pd.read_csv(out_dir / f"scvi_null_{seeds[0]}.csv", index_col=0),
           "tops": [list(t.index[:TOP]) for t in read.values()],  # its own ranking
           "sims": list(read.values()),
           "seconds": {k: v["seconds"] for k, v in record.items()},
           "peak_mb": {k: v["peak_mb"] for k, v in record.items()}}
    every = pd.read_csv(out_dir / f"scvi_cell_type_{seeds[0]}.csv", index_col=0)
    up = {}
    for group, frame in every.groupby("group1"):
        up[str(group).removesuffix(" vs Rest")] = list(frame.index[frame["lfc_mean"] > 0])
    res["markers"] = marker_ranks(up)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers-python", required=True)
    p.add_argument("--out-dir", default="/tmp/de")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--skip-scvi", action="store_true", help="reuse scVI's files in --out-dir")
    p.add_argument("--sim-seed", type=int, default=0, help="seed of the simulated changes")
    p.add_argument("--sim-type", default=SIM_TYPE, help="the cell type given the changes")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adata, truth = simulate(prepared(), args.sim_seed, args.sim_type)
    GENES.update(adata.var_names)
    print("canonical markers among the genes:",
          sorted(m for ms in MARKERS.values() for m in ms if m in GENES), flush=True)
    path = out / "de.h5ad"
    adata.write_h5ad(path)
    if not args.skip_scvi:
        subprocess.run([args.peers_python, str(HERE / "_run_de_scvi.py"), "--h5ad", str(path),
                        "--out-dir", str(out), "--seeds", *map(str, args.seeds)], check=True)
    ours, wilcoxon = run_omicvae(adata, args.seeds, out), run_wilcoxon(adata)
    scvi = scvi_results(out, args.seeds)
    rows = {}
    for name, res in (("omicvae_sc", ours), ("scVI", scvi), ("Wilcoxon", wilcoxon)):
        if name == "Wilcoxon":
            sim, null = res["sim"], res["null"]
            per_seed = [sim_scores(list(sim["names"]),
                                   set(sim["names"][sim["pvals_adj"] < 0.05]), truth)]
            null_calls, tops = int((null["pvals_adj"] < 0.05).sum()), None
        else:
            flag = "is_de" if name == "omicvae_sc" else "is_de_fdr_0.05"
            per_seed = [sim_scores(list(t.index), set(t.index[t[flag].astype(bool)]), truth)
                        for t in res["sims"]]  # each method's own ranking
            tops = res["tops"]
            null_calls = int(res["null"][flag].astype(bool).sum())
        scores = {k: np.mean([d[k] for d in per_seed]) for k in per_seed[0]}
        rows[name] = {**scores, "observed FDR, worst seed": max(d["observed FDR"]
                                                                for d in per_seed),
                      "null-split calls": null_calls,
                      f"top-{TOP} Jaccard over seeds": jaccard(tops) if tops else np.nan,
                      "canonical markers in the top 10": np.mean(np.array(res["markers"]) <= 10),
                      "canonical markers' median rank": np.median(res["markers"]),
                      "seconds, A vs B": np.mean([v for k, v in res["seconds"].items()
                                                  if k.startswith("sim")]),
                      "peak MB, A vs B": np.max([v for k, v in res["peak_mb"].items()
                                                 if k.startswith("sim")]),
                      "seconds, 9 types vs rest": res["seconds"]["cell_type"]
                      if "cell_type" in res["seconds"] else res["seconds"]["cell_type_0"],
                      "peak MB, 9 types vs rest": res["peak_mb"].get(
                          "cell_type", res["peak_mb"].get(f"cell_type_{args.seeds[0]}"))}
    table = pd.DataFrame(rows).T
    table.to_csv(out / "de_table.csv")
    pd.set_option("display.width", 250)
    print(table.T.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
