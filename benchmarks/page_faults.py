"""Page faults and kernel time per training step, with and without ``steady_heap``.

Each fit is the training loop (``--loop fit``, the default) or ``OmicVAE.train`` with its
diagnostics (``--loop train``) on pbmc3k (2,000 HVGs, the train cells of ``_prep.py``), the
first training of its own process, with ``OMICVAE_SC_TUNE_MALLOC=0`` (glibc's default malloc
settings) and ``=1`` (the package's, ``train/_heap.py``) alternating, so that both see the same
drift of this shared machine. Printed per fit: ms per step, minor page faults per step, kernel
(system) and user CPU ms per step, from ``getrusage`` around the training; then the ratio of
the medians.

    python benchmarks/page_faults.py --batch-sizes 512 128 --repeats 3"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def one_fit(train_path: Path, batch_size: int, epochs: int, threads: int, loop: str) -> dict:
    import resource
    import time

    import anndata as ad
    import torch

    from omicvae_sc import OmicVAE
    from omicvae_sc.data import CountTensors
    from omicvae_sc.model._runtime import resolve_precision
    from omicvae_sc.train import TrainConfig, fit

    torch.set_num_threads(threads)
    train = ad.read_h5ad(train_path)
    OmicVAE.setup_anndata(train, layer="counts")
    model = OmicVAE(train, device="cpu")
    kwargs = {"batch_size": batch_size, "validation_fraction": 0.0, "progress_bar": False}
    data = CountTensors(train.layers["counts"], None, "cpu")
    config = TrainConfig(max_epochs=epochs, batch_size=batch_size, progress_bar=False,
                         precision=resolve_precision("auto", torch.device("cpu")))
    # the process's first training, as a user's: an earlier one (its outputs after training
    # free large chunks) would have let glibc's adaptive threshold rise already
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if loop == "train":  # OmicVAE.train: the loop, then the diagnostics
        history = model.train(epochs, **kwargs)
    else:  # the training loop alone, seeded as train() seeds it
        torch.manual_seed(0)
        history = fit(model.module, data, None, config, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    steps = epochs * data.n_batches(batch_size)
    return {"ms_per_step": seconds / steps * 1e3,
            "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
            "sys_ms_per_step": (r1.ru_stime - r0.ru_stime) / steps * 1e3,
            "user_ms_per_step": (r1.ru_utime - r0.ru_utime) / steps * 1e3,
            "elbo": history.train_elbo[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--loop", choices=["fit", "train"], default="fit",
                        help="time the training loop alone (fit) or OmicVAE.train with its "
                             "diagnostics (train)")
    parser.add_argument("--one", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the child process: one fit, its figures as JSON
        print(json.dumps(one_fit(Path(args.one[0]), int(args.one[1]), args.epochs,
                                 args.threads, args.loop)))
        return
    from _prep import data_path, prepare

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.h5ad"
        prepare(data_path("pbmc3k.h5ad"))[0].write_h5ad(path)
        print(f"{'batch':>5s} {'malloc':>8s} {'ms/step':>8s} {'faults/step':>12s} "
              f"{'sys ms':>7s} {'user ms':>8s}")
        for bs in args.batch_sizes:
            runs = {"0": [], "1": []}
            for _ in range(args.repeats):
                for tune in ("0", "1"):
                    out = subprocess.run(
                        [sys.executable, __file__, "--one", str(path), str(bs), "--epochs",
                         str(args.epochs), "--threads", str(args.threads), "--loop", args.loop],
                        env={**os.environ, "OMICVAE_SC_TUNE_MALLOC": tune}, check=True,
                        capture_output=True, text=True).stdout
                    row = json.loads(out.strip().splitlines()[-1])
                    runs[tune].append(row)
                    print(f"{bs:5d} {'default' if tune == '0' else 'steady':>8s} "
                          f"{row['ms_per_step']:8.2f} {row['faults_per_step']:12.0f} "
                          f"{row['sys_ms_per_step']:7.2f} {row['user_ms_per_step']:8.2f}",
                          flush=True)
            med = {t: statistics.median(r["ms_per_step"] for r in rows)
                   for t, rows in runs.items()}
            same = all(a["elbo"] == b["elbo"] for a, b in zip(runs["0"], runs["1"], strict=True))
            print(f"batch {bs}: steady / default step time, medians: {med['1'] / med['0']:.3f}"
                  f" (same training ELBO: {same})")


if __name__ == "__main__":
    main()
