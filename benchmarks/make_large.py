"""Write an atlas-sized count matrix to disk, chunk by chunk, by resampling real cells.

Cells are drawn with replacement from a real labelled set in ``../shared/data`` (pbmc3k by
default, reduced to its 2,000 highly variable genes as ``_prep.py`` does) and each drawn cell's
counts are binomially thinned with a keep probability uniform in [0.5, 1], so library sizes and
sparsity stay those of real cells while no two cells are identical. The counts are never held
in memory: each chunk of ``--chunk`` cells is drawn, appended to the file and dropped, so N can
be 10M. ``obs`` carries the source cell's label (``cell_type``), a ``batch`` (the chunk's
position modulo ``--batches``) and the source row.

``--order random`` (default) writes cells in the order they are drawn, which is a shuffled file;
``--order sorted`` writes them grouped by label, the hard case for a block-shuffling loader
(each block holds one cell type). Sorting needs the labels first, not the counts: every label's
cells are drawn in turn.

Examples::

    python benchmarks/make_large.py --cells 1000000 --out /tmp/large/pbmc_1m.h5ad
    python benchmarks/make_large.py --cells 1000000 --out /tmp/large/pbmc_1m.zarr
    python benchmarks/make_large.py --cells 100000 --order sorted --out /tmp/large/sorted.h5ad
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _prep import data_path, prepare

LABELS = {"pbmc3k.h5ad": "cell_type",
          "bastidasponce2019_pancreas_endocrine_2000hvg.h5ad": "cell_type",
          "cao2017_worm_neuron_sciRNAseq.h5ad": "cell_type_code"}


def source_cells(filename: str, n_top_genes: int) -> ad.AnnData:
    """The real cells to draw from: raw counts (CSR, float32) of their highly variable genes."""
    train, test = prepare(data_path(filename), n_top_genes=n_top_genes, test_fraction=0.0)
    del test
    train.X = sp.csr_matrix(train.layers["counts"], dtype=np.float32)
    del train.layers["counts"]
    return train


def draw(source: sp.csr_matrix, rows: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """The counts of ``rows`` of ``source``, each cell thinned binomially (keep p ~ U(0.5, 1))."""
    x = source[rows]
    keep = rng.uniform(0.5, 1.0, len(rows))
    x.data = rng.binomial(x.data.astype(np.int64),
                          np.repeat(keep, np.diff(x.indptr))).astype(np.float32)
    x.eliminate_zeros()
    # a cell thinned to nothing keeps one count of its first gene (the model needs a library)
    empty = np.flatnonzero(np.diff(x.indptr) == 0)
    if empty.size:
        fix = source[rows[empty]]
        first = fix.indices[fix.indptr[:-1]]
        x = x.tolil()
        x[empty, first] = 1.0
        x = x.tocsr()
    return x


def plan_rows(labels: np.ndarray, n_cells: int, order: str,
              rng: np.random.Generator) -> np.ndarray:
    """Source row of every output cell: uniform draws, grouped by label for ``sorted``."""
    rows = rng.integers(len(labels), size=n_cells)
    if order == "sorted":
        rows = rows[np.argsort(labels[rows], kind="stable")]
    return rows


def write(out: Path, source: ad.AnnData, source_name: str, n_cells: int, *, chunk: int,
          order: str, n_batches: int, seed: int) -> None:
    """Write ``n_cells`` resampled cells to ``out`` (a temporary name, renamed when complete)."""
    rng = np.random.default_rng(seed)
    labels = source.obs[LABELS[source_name]].astype(str).to_numpy()
    rows = plan_rows(labels, n_cells, order, rng)  # int64 per cell: 80 MB at 10M
    names = np.char.add("c", np.arange(n_cells).astype(str))
    obs = pd.DataFrame({
        "cell_type": pd.Categorical(labels[rows]),
        "batch": pd.Categorical((np.arange(n_cells) // chunk % n_batches).astype(str)),
        "source_row": rows.astype(np.int32),
    }, index=pd.Index(names, name=None))
    var = source.var[[]].copy()
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    is_zarr = out.suffix == ".zarr"
    if is_zarr:
        import zarr
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
    else:
        root = h5py.File(tmp, "w")
    ad.io.write_elem(root, "obs", obs)
    ad.io.write_elem(root, "var", var)
    ad.io.write_elem(root, "uns", {"make_large": {
        "source": source_name,
        "n_cells": n_cells, "order": order, "seed": seed, "chunk": chunk}})
    del obs, names
    counts = source.X
    t0, written = time.perf_counter(), 0
    kwargs = {}  # anndata makes the arrays resizable for append
    for lo in range(0, n_cells, chunk):
        x = draw(counts, rows[lo:lo + chunk], rng)
        if lo == 0:
            ad.io.write_elem(root, "X", x, **kwargs)
            matrix = ad.io.sparse_dataset(root["X"])
        else:
            matrix.append(x)
        written += x.shape[0]
        rate = written / (time.perf_counter() - t0)
        print(f"\r{written:,} / {n_cells:,} cells ({rate:,.0f} cells/s)", end="", flush=True)
    print()
    if not is_zarr:
        root.close()
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    tmp.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help=".h5ad file or .zarr store")
    parser.add_argument("--source", default="pbmc3k.h5ad", choices=sorted(LABELS))
    parser.add_argument("--genes", type=int, default=2000, help="highly variable genes kept")
    parser.add_argument("--chunk", type=int, default=50_000, help="cells drawn and written at once")
    parser.add_argument("--order", choices=("random", "sorted"), default="random")
    parser.add_argument("--batches", type=int, default=4, help="values of obs['batch']")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    source = source_cells(args.source, args.genes)
    write(args.out, source, args.source, args.cells, chunk=args.chunk,
          order=args.order, n_batches=args.batches, seed=args.seed)
    size = sum(p.stat().st_size for p in args.out.rglob("*")) if args.out.is_dir() \
        else args.out.stat().st_size
    print(f"wrote {args.out}: {args.cells:,} cells x {source.n_vars} genes, "
          f"{size / 1024**3:.2f} GiB")


if __name__ == "__main__":
    main()
