"""Mapping a query onto a reference (issue 21).

``--part transfer``: pbmc3k prepared as in every benchmark (genes in >= 3 cells, 2,000 HVGs;
annotated cells), cut at random into a reference (80%) and a query (20%) for each seed: the
query is held-out reference cells, whose labels are known. omicvae_sc: a model trained on the
reference alone (every default), both latents from it, ``ov.tl.transfer_labels``. Beside it
scanpy's ``sc.tl.ingest`` (the reference log-normalized, PCA and neighbours, its kNN labels).
Prints accuracy, macro F1 and, for omicvae_sc, the expected calibration error of the
uncertainty on the query (ten bins) next to that of the raw vote (``1 - winning share``).

    python benchmarks/refmap.py --part transfer --seeds 0 1 2

``--part mapping``: a query with a cell type the reference never saw, on real splits.

- ``pbmc3k``: prepared pbmc3k's annotated cells; the reference is 80% of the cells of every type
  but the withheld one, the query the other 20% plus every cell of the withheld type (a new
  batch label, "query").
- ``cellbench``: the CellBench mixture; the reference is CEL-seq2's cells of two cell lines,
  the query every Drop-seq cell (another protocol), the third line among them; demuxlet's
  doublets left out.

Genes: the 2,000 most variable of the reference (seurat flavour), chosen before the query is
seen. omicvae_sc: a reference trained with every default (``batch_key="batch"``, one category),
then ``ov.tl.map_query`` (surgery, query training, labels, novelty). scvi-tools 1.4.2 (its own
venv, ``--scvi-python``): ``_run_refmap_scvi.py``. scanpy's ``ingest`` (its labels; its novelty
score the mean distance to the 15 nearest reference cells in the reference's PCA). Printed per
split and seed: accuracy and macro F1 (over the reference's labels) on the query's cells of
reference types, every method giving each cell its best label (omicvae_sc with
``unknown_above=1``; the share its default 0.5 would call "Unknown" is printed), the AUPRC of the
withheld type for every novelty score, the share of known and withheld cells omicvae_sc flags,
the uncertainty's calibration error on held-out reference cells, and seconds: mapping the
query against training one model on reference and query from scratch.

    python benchmarks/refmap.py --part mapping --seeds 0 1 2 \
        --scvi-python /work/venvs/peers/bin/python
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).parent))


def _split(seed: int) -> tuple[ad.AnnData, ad.AnnData]:
    from _metrics import annotated_mask
    from _prep import data_path, prepare

    train, test = prepare(data_path("pbmc3k.h5ad"))
    cells = ad.concat([train, test])
    cells = cells[annotated_mask(cells.obs["cell_type"].astype(str).to_numpy())].copy()
    query = np.random.default_rng(seed).random(cells.n_obs) < 0.2
    return cells[~query].copy(), cells[query].copy()


def _omicvae(ref: ad.AnnData, query: ad.AnnData, seed: int) -> dict:
    import omicvae_sc as ov
    from omicvae_sc.tl._transfer import expected_calibration_error, neighbour_votes

    start = time.perf_counter()
    ov.OmicVAE.setup_anndata(ref, layer="counts")
    model = ov.OmicVAE(ref, seed=seed, device="cpu")
    model.train(progress_bar=False)
    ref.obsm["X_omicvae"] = model.get_latent_representation()
    query.obsm["X_omicvae"] = model.get_latent_representation(query)
    ov.tl.transfer_labels(ref, query, "cell_type")
    truth = query.obs["cell_type"].astype(str).to_numpy()
    called = query.obs["omicvae_label"].astype(str).to_numpy()
    u = query.obs["omicvae_label_uncertainty"].to_numpy()
    codes, labels = pd.factorize(ref.obs["cell_type"].astype(str), sort=True)
    votes = neighbour_votes(ref.obsm["X_omicvae"].astype(float), codes, len(labels),
                            query.obsm["X_omicvae"].astype(float), 15)
    raw_wrong = np.asarray(labels)[votes.argmax(1)] != truth
    return {"method": "omicvae_sc", "accuracy": float((called == truth).mean()),
            "macro_f1": float(f1_score(truth, called, average="macro")),
            "ece": expected_calibration_error(u, called != truth),
            "ece_raw_vote": expected_calibration_error(1 - votes.max(1), raw_wrong),
            "unknown": float((called == "Unknown").mean()),
            "seconds": time.perf_counter() - start}


def transfer(args: argparse.Namespace) -> None:
    rows = []
    for seed in args.seeds:
        ref, query = _split(seed)
        truth = query.obs["cell_type"].astype(str).to_numpy()
        rows.append({"seed": seed, **_omicvae(ref.copy(), query.copy(), seed)})
        start = time.perf_counter()
        ingested = query.copy()
        _ingest_labels(ref, ingested)
        called = ingested.obs["cell_type"].astype(str).to_numpy()
        rows.append({"seed": seed, "method": "scanpy ingest",
                     "accuracy": float((called == truth).mean()),
                     "macro_f1": float(f1_score(truth, called, average="macro")),
                     "seconds": time.perf_counter() - start})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(table.groupby("method")[["accuracy", "macro_f1", "ece", "ece_raw_vote"]].mean()
          .to_string(float_format=lambda v: f"{v:.3f}"))
    print(json.dumps(rows))


def _ingest_labels(ref: ad.AnnData, query: ad.AnnData) -> None:
    """scanpy's ingest on log-normalized counts; the query's cell_type is replaced by it."""
    _ingest_labels_of(ref.copy(), query, "cell_type")


# ---------------------------------------------------------------------------- mapping
def _reference_genes(ref: ad.AnnData, query: ad.AnnData, n_genes: int = 2000
                     ) -> tuple[ad.AnnData, ad.AnnData]:
    """The reference's most variable genes (chosen on it alone); the query keeps its genes."""
    ref = ref[:, np.asarray((ref.layers["counts"] > 0).sum(0)).ravel() >= 3].copy()
    norm = ref.copy()
    norm.X = norm.layers["counts"].copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=n_genes, flavor="seurat")
    return ref[:, norm.var["highly_variable"].to_numpy()].copy(), query


def _mapping_splits(seed: int):
    """(name, reference, query, labels_key, withheld label) of each split."""
    import scipy.sparse as sp
    from _metrics import annotated_mask
    from _prep import data_path

    pbmc = ad.read_h5ad(data_path("pbmc3k.h5ad"))
    pbmc = pbmc[annotated_mask(pbmc.obs["cell_type"].astype(str).to_numpy())].copy()
    types = pbmc.obs["cell_type"].astype(str).to_numpy()
    held = np.random.default_rng(seed).random(pbmc.n_obs) < 0.2
    withheld = "B"
    bench = ad.read_h5ad(data_path("cellbench_3celllines_celseq2_dropseq.h5ad"))
    bench = bench[~bench.obs["is_doublet_demuxlet"].to_numpy(dtype=bool)].copy()
    protocol = bench.obs["batch"].astype(str).to_numpy()
    line = bench.obs["cell_line"].astype(str).to_numpy()
    for name, cells, ref_mask, query_mask, key, novel in (
            ("pbmc3k", pbmc, ~held & (types != withheld), held | (types == withheld),
             "cell_type", withheld),
            ("cellbench", bench, (protocol == "CEL-seq2") & (line != "H2228"),
             protocol == "Drop-seq", "cell_line", "H2228")):
        cells.layers["counts"] = sp.csr_matrix(cells.X, dtype=np.float32)
        ref, query = cells[ref_mask].copy(), cells[query_mask].copy()
        ref.obs["batch"], query.obs["batch"] = "reference", "query"
        yield (name, *_reference_genes(ref, query), key, novel)


def _ingest_mapping(ref: ad.AnnData, query: ad.AnnData, key: str) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """scanpy's ingest labels and the mean distance to the 15 nearest reference cells in the
    reference's PCA."""
    from sklearn.neighbors import NearestNeighbors

    query = query[:, ref.var_names].copy()
    ingested = query.copy()
    ingested.obs[key] = "?"
    ref_norm = ref.copy()
    _ingest_labels_of(ref_norm, ingested, key)
    distance = NearestNeighbors(n_neighbors=15).fit(ref_norm.obsm["X_pca"]).kneighbors(
        ingested.obsm["X_pca"])[0].mean(1)
    return ingested.obs[key].astype(str).to_numpy(), distance


def _ingest_labels_of(ref: ad.AnnData, query: ad.AnnData, key: str) -> None:
    """scanpy's ingest of ``query`` onto ``ref`` (both log-normalized in place, ``ref`` given
    50 PCs and a 15-neighbour graph); ``query.obs[key]`` is replaced by its labels."""
    for a in (ref, query):
        a.X = a.layers["counts"].copy()
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
    sc.pp.pca(ref, n_comps=50)
    sc.pp.neighbors(ref, n_neighbors=15)
    # scanpy 1.11.5's ingest rebuilds pynndescent's search forest with n_search_trees, which
    # pynndescent 0.7 leaves None (the option is deprecated there): one tree, its old default
    import pynndescent

    init = pynndescent.NNDescent.__init__

    def one_tree(self, *a, **k):
        init(self, *a, **k)
        if self.n_search_trees is None:
            self.n_search_trees = 1

    pynndescent.NNDescent.__init__ = one_tree
    try:
        sc.tl.ingest(query, ref, obs=key, embedding_method="pca")
    finally:
        pynndescent.NNDescent.__init__ = init


def _omicvae_mapping(ref: ad.AnnData, query: ad.AnnData, key: str, seed: int) -> dict:
    import warnings

    import omicvae_sc as ov

    def fitted(adata: ad.AnnData) -> tuple[ov.OmicVAE, float]:
        start = time.perf_counter()
        ov.OmicVAE.setup_anndata(adata, layer="counts", batch_key="batch")
        model = ov.OmicVAE(adata, seed=seed, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.train(progress_bar=False)
        return model, time.perf_counter() - start

    ref, query = ref.copy(), query.copy()
    model, ref_seconds = fitted(ref)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # every cell's best label: the peers never abstain (the share our default
        # unknown_above=0.5 would call "Unknown" is reported beside it)
        ov.tl.map_query(query, model, adata_ref=ref, labels_key=key, seed=seed,
                        progress_bar=False, unknown_above=1.0)
    map_seconds = time.perf_counter() - start
    _, scratch_seconds = fitted(ad.concat([ref, query[:, ref.var_names]]))
    return {"labels": query.obs["omicvae_label"].astype(str).to_numpy(),
            "novelty": query.obs["omicvae_novelty_score"].to_numpy(),
            "flagged": query.obs["omicvae_is_novel"].to_numpy(dtype=bool),
            "ece_reference": query.uns["omicvae_label_transfer"]["expected_calibration_error"],
            "uncertainty": query.obs["omicvae_label_uncertainty"].to_numpy(),
            "reference_seconds": ref_seconds, "map_seconds": map_seconds,
            "scratch_seconds": scratch_seconds,
            "query_epochs": query.uns["omicvae_mapping"]["epochs"]}


def _scvi_mapping(ref: ad.AnnData, query: ad.AnnData, key: str, seed: int,
                  python: str) -> dict:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref.write_h5ad(tmp / "ref.h5ad")
        query.write_h5ad(tmp / "query.h5ad")
        run = subprocess.run([python, str(Path(__file__).parent / "_run_refmap_scvi.py"),
                              "--ref", str(tmp / "ref.h5ad"), "--query",
                              str(tmp / "query.h5ad"), "--labels", key, "--out",
                              str(tmp / "scvi.json"), "--seed", str(seed)],
                             capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"scvi-tools' mapping failed:\n{run.stderr[-3000:]}")
        return json.loads((tmp / "scvi.json").read_text())


def mapping(args: argparse.Namespace) -> None:
    from sklearn.metrics import average_precision_score

    from omicvae_sc.tl._transfer import expected_calibration_error

    rows = []
    for seed in args.seeds:
        for name, ref, query, key, novel_label in _mapping_splits(seed):
            truth = query.obs[key].astype(str).to_numpy()
            novel = truth == novel_label
            known = ~novel

            classes = sorted(set(ref.obs[key].astype(str)))

            def scores(called: np.ndarray, truth=truth, known=known, classes=classes) -> dict:
                return {"accuracy": float((called[known] == truth[known]).mean()),
                        "macro_f1": float(f1_score(truth[known], called[known],  # over the
                                                   labels=classes, average="macro"))}  # ref's

            ours = _omicvae_mapping(ref, query, key, seed)
            wrong = ours["labels"][known] != truth[known]
            rows.append({"split": name, "seed": seed, "method": "omicvae_sc",
                         **scores(ours["labels"]),
                         "auprc": average_precision_score(novel, ours["novelty"]),
                         "flag_known": float(ours["flagged"][known].mean()),
                         "flag_novel": float(ours["flagged"][novel].mean()),
                         "ece_reference": ours["ece_reference"],
                         "ece_query": expected_calibration_error(
                             ours["uncertainty"][known], wrong),
                         "unknown_at_0.5": float((ours["uncertainty"][known] > 0.5).mean()),
                         "map_s": ours["map_seconds"], "scratch_s": ours["scratch_seconds"],
                         "reference_s": ours["reference_seconds"],
                         "novel_share": float(novel.mean())})
            if args.only_omicvae:
                print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
                continue
            start = time.perf_counter()
            ingest_labels, ingest_distance = _ingest_mapping(ref, query, key)
            rows.append({"split": name, "seed": seed, "method": "scanpy ingest",
                         **scores(ingest_labels),
                         "auprc": average_precision_score(novel, ingest_distance),
                         "map_s": time.perf_counter() - start})
            if args.scvi_python:
                peer = _scvi_mapping(ref, query, key, seed, args.scvi_python)
                rows.append({"split": name, "seed": seed, "method": "scvi-tools",
                             **scores(np.asarray(peer["labels"])),
                             "auprc": average_precision_score(novel, peer["knn_distance"]),
                             "auprc_marginal": average_precision_score(
                                 novel, peer["neg_marginal_ll"]),
                             "map_s": peer["query_seconds"],
                             "reference_s": peer["reference_seconds"]})
            print(pd.DataFrame(rows[-3:]).to_string(index=False,
                                                     float_format=lambda v: f"{v:.3f}"),
                  flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(table.groupby(["split", "method"]).mean(numeric_only=True).drop(columns="seed")
          .to_string(float_format=lambda v: f"{v:.3f}"))
    print(json.dumps(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["transfer", "mapping"], default="transfer")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only-omicvae", action="store_true",
                   help="--part mapping without the peers (to compare settings of ours)")
    p.add_argument("--scvi-python", default=None,
                   help="python of a venv with scvi-tools 1.4.2 (for --part mapping)")
    args = p.parse_args()
    (mapping if args.part == "mapping" else transfer)(args)


if __name__ == "__main__":
    main()
