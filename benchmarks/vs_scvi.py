"""omicvae_sc versus scvi-tools on pbmc3k, trained the same way, compared side by side.

Both tools get the same prepared data (``_prep.py``: genes in >= 3 cells, 2,000 Seurat HVGs,
10% of cells held out with ``default_rng(0)``), the same architecture (10 latent dims, one
hidden layer of 128, dropout 0.1), likelihood, batch size 128, epochs and seed, and train on
all training cells (no validation split).  Each tool runs in its own venv as a subprocess
(``_run_omicvae.py``, ``_run_scvi.py``, same command line); scvi-tools is never imported here.

Printed per tool, and the ratio omicvae/scvi:

- held-out marginal log-likelihood log p(x), importance-weighted with K=100 samples, mean per
  held-out cell in nats (negative; higher is better, so a ratio below 1 favours omicvae_sc);
- ARI and NMI of k-means (fixed seed, ``--n-init`` restarts, k = number of annotated types)
  against ``obs['cell_type']``, and 15-nearest-neighbour label purity, on the posterior-mean
  latent of the held-out cells and of the training cells; ``unannotated`` cells are excluded;
- seconds per epoch: wall time of the ``train()`` call divided by the epochs run.

Run from the project root, in the dev venv::

    /work/venvs/dev/bin/python benchmarks/vs_scvi.py --epochs 200

Data folder: ``$OMICVAE_SC_DATA`` if set, else ``../shared/data`` (relative to the project root).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np

# benchmarks/ is not a package: these resolve because Python puts the script's folder on sys.path.
from _metrics import latent_metrics
from _prep import data_path, prepare

HERE = Path(__file__).resolve().parent
RUNNERS = {"omicvae_sc": HERE / "_run_omicvae.py", "scvi-tools": HERE / "_run_scvi.py"}
ROWS = [  # (key, label, which way is better)
    ("ll", "held-out log p(x), K=100 (nats/cell)", "higher"),
    ("test_ari", "k-means ARI, held-out cells", "higher"),
    ("test_nmi", "k-means NMI, held-out cells", "higher"),
    ("test_knn_purity", "15-NN purity, held-out cells", "higher"),
    ("train_ari", "k-means ARI, training cells", "higher"),
    ("train_nmi", "k-means NMI, training cells", "higher"),
    ("train_knn_purity", "15-NN purity, training cells", "higher"),
    ("s_per_epoch", "seconds per epoch", "lower"),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="training seed (run r uses seed+r)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool, order alternated")
    parser.add_argument("--likelihood", choices=["zinb", "nb", "poisson"], default="zinb")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads per run")
    parser.add_argument("--n-init", type=int, default=20, help="k-means restarts")
    parser.add_argument("--scvi-python", default="/work/venvs/scvi/bin/python")
    parser.add_argument("--omicvae-python", default=sys.executable)
    parser.add_argument("--tools", nargs="+", choices=list(RUNNERS), default=list(RUNNERS))
    return parser.parse_args()


def run_tool(tool: str, python: str, workdir: Path, args: argparse.Namespace, seed: int) -> Path:
    """Run one runner as a subprocess; return its .npz or raise RuntimeError with its stderr."""
    out = workdir / f"{tool}_seed{seed}.npz"
    cmd = [
        python, str(RUNNERS[tool]),
        "--train", str(workdir / "train.h5ad"), "--test", str(workdir / "test.h5ad"),
        "--out", str(out), "--epochs", str(args.epochs), "--seed", str(seed),
        "--likelihood", args.likelihood, "--threads", str(args.threads),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        msg = f"{tool} runner exited with {proc.returncode}:\n  $ {' '.join(cmd)}\n{tail}"
        raise RuntimeError(msg)
    print(f"  {proc.stdout.strip().splitlines()[-1]}")
    return out


def score(npz: Path, train_labels: np.ndarray, test_labels: np.ndarray, *, n_init: int) -> dict:
    """All table figures for one run."""
    res = np.load(npz)
    figures = {"ll": float(res["ll_test"].mean())}
    figures["s_per_epoch"] = float(res["train_seconds"]) / int(res["epochs"])
    for part, labels in (("test", test_labels), ("train", train_labels)):
        for key, value in latent_metrics(res[f"z_{part}"], labels, n_init=n_init).items():
            figures[f"{part}_{key}"] = value
    return figures


def describe(
    args: argparse.Namespace,
    train: ad.AnnData,
    test: ad.AnnData,
    results: dict[str, list[dict]],
    load_before: float,
) -> str:
    """Header line: data, settings, cells scored and how busy the machine was."""
    first = next(iter(results.values()))[0]
    # Other processes on the machine inflate seconds/epoch: record the 1-minute load average.
    load = (
        f"load avg {load_before:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} CPUs)"
    )
    return (
        f"pbmc3k: {train.n_obs} training / {test.n_obs} held-out cells, {train.n_vars} HVGs, "
        f"{args.likelihood}, {args.epochs} epochs, batch 128, seed {args.seed}, "
        f"{args.repeats} repeat(s) (mean), {args.threads} torch threads\n"
        f"k-means k={first['test_k']} (held-out) / {first['train_k']} (train), "
        f"n_init={args.n_init}; scored {first['test_n_cells']} held-out / "
        f"{first['train_n_cells']} training annotated cells; {load}"
    )


def print_table(results: dict[str, list[dict]], header: str) -> None:
    tools = list(RUNNERS)
    means = {t: {k: np.mean([r[k] for r in results[t]]) for k, *_ in ROWS} for t in results}
    print(f"\n{header}")
    print(f"{'metric':<40}" + "".join(f"{t:>13}" for t in tools) + f"{'omicvae/scvi':>14}  better")
    for key, label, better in ROWS:
        cells = [f"{means[t][key]:>13.3f}" if t in means else f"{'no result':>13}" for t in tools]
        ratio = (
            f"{means['omicvae_sc'][key] / means['scvi-tools'][key]:>14.3f}"
            if len(means) == 2
            else f"{'-':>14}"
        )
        print(f"{label:<40}" + "".join(cells) + ratio + f"  {better}")


def main() -> None:
    args = parse_args()
    pythons = {"omicvae_sc": args.omicvae_python, "scvi-tools": args.scvi_python}
    train, test = prepare(data_path("pbmc3k.h5ad"))
    train_labels = train.obs["cell_type"].to_numpy()
    test_labels = test.obs["cell_type"].to_numpy()
    results: dict[str, list[dict]] = {t: [] for t in args.tools}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vs_scvi_") as tmp:
        workdir = Path(tmp)
        train.write_h5ad(workdir / "train.h5ad")
        test.write_h5ad(workdir / "test.h5ad")
        for r in range(args.repeats):
            order = args.tools if r % 2 == 0 else args.tools[::-1]
            for tool in order:
                print(f"run {r + 1}/{args.repeats}, {tool}, seed {args.seed + r} ...", flush=True)
                try:
                    npz = run_tool(tool, pythons[tool], workdir, args, args.seed + r)
                    results[tool].append(score(npz, train_labels, test_labels, n_init=args.n_init))
                except Exception as err:  # one side failing must not stop the other
                    print(f"  FAILED: {type(err).__name__}: {err}", flush=True)
    results = {t: runs for t, runs in results.items() if runs}
    if not results:
        print("\nno tool finished; nothing to compare")
        sys.exit(1)
    print_table(results, describe(args, train, test, results, load_before))


if __name__ == "__main__":
    main()
