"""Speed of this checkout against an earlier commit, side by side in one run.

Both trees train the same model on the same prepared pbmc3k cells through ``_run_omicvae.py``
(the runner of ``speed.py``, taken from this checkout so both are driven alike), one subprocess
per fit, alternating base and head, ``--repeats`` times. The base commit is checked out into a
temporary git worktree and imported through ``PYTHONPATH``. Printed per fit: train seconds,
cells/s, latents and log p(x) (K=100) inference seconds; then the median ratio head / base of
each (above 1: the head is slower).

Run from the project root, after a refactor, against the commit before it::

    python benchmarks/against_commit.py --base HEAD~1 --epochs 40 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from _prep import data_path, prepare

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _fit(tree: Path, prep: Path, out: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{HERE}"}
    cmd = [sys.executable, str(HERE / "_run_omicvae.py"), "--train", str(prep / "train.h5ad"),
           "--test", str(prep / "test.h5ad"), "--out", str(out), "--epochs", str(args.epochs),
           "--seed", "0", "--threads", str(args.threads), "--time-inference",
           "--batch-size", str(args.batch_size)]
    subprocess.run(cmd, check=True, env=env, cwd=tree)
    z = np.load(out, allow_pickle=True)
    cells = int(z["n_train"]) * int(z["epochs"])
    return {"train_s": float(z["train_seconds"]),
            "cells_per_s": cells / float(z["train_seconds"]),
            "latent_s": float(z["latent_seconds"]),
            "marginal_ll_s": float(z["marginal_ll_seconds"]),
            "held_out_log_px": float(np.mean(z["ll_test"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD~1", help="the commit to compare against")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base],
                       check=True, cwd=ROOT)
        try:
            train, test = prepare(data_path())
            train.write_h5ad(tmp / "train.h5ad")
            test.write_h5ad(tmp / "test.h5ad")
            rows = []
            for repeat in range(args.repeats):
                for name, tree in (("base", base), ("head", ROOT)):
                    fit = _fit(tree, tmp, tmp / f"{name}{repeat}.npz", args)
                    rows.append({"tree": name, "repeat": repeat, **fit})
                    print(rows[-1], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                           check=False)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    medians = table.groupby("tree").median(numeric_only=True)
    ratio = medians.loc["head"] / medians.loc["base"]
    print(f"\nbase {args.base}, {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.repeats} repeats; median head / base:")
    print(ratio.drop(["repeat"]).round(3).to_string())


if __name__ == "__main__":
    main()
