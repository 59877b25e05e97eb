"""Training on several processes: quality against one process, and throughput (issue 20).

Every run is a real launch of ``tests/distributed_worker.py`` (a user's script): ``torchrun``
for the distributed runs, plain ``python`` for one process. Parts:

``--part quality``: pbmc3k prepared as in every benchmark (genes in >= 3 cells, 2,000 HVGs,
10% of cells held out), trained to the defaults' end (400 epochs, early stopping on a 10%
validation split); held-out log p(x) (100 importance samples, mean nats per cell) and 15-NN
purity of the latent of the training cells (annotated cells) for one process at batch 128,
two at 64 each (the same steps) and two at 128 each (the same per-process batch, half the
steps), with BatchNorm statistics summed over the processes and per process. Goal: two
processes within 1 nat and 0.02 purity of one.

``--part speed --h5ad FILE``: training cells per second (median epoch after the first, no
validation split) on FILE in memory and streamed from disk: one process with every core's
thread, the same through the distributed path (``torchrun`` with one process and
``distributed=True``: what the path costs), and two processes with a thread each (BatchNorm
statistics summed over them, and per process).

With ``--device cuda`` (the lent GPU machine, benchmarks/device_run.sh stage 3) only the
one-process runs, on the GPU: the distributed path's cost on one GPU.

``--part scvi --h5ad FILE``: scvi-tools 1.4.2's own DDP (Lightning, CPU) at one and two
processes on the same file, in the peers' venv (``--scvi-python``).

    python benchmarks/distributed.py --part quality
    python benchmarks/distributed.py --part speed --h5ad /tmp/large/pbmc_100k.h5ad
    python benchmarks/distributed.py --part scvi --h5ad /tmp/large/pbmc_100k.h5ad

Do not run anything else meanwhile: the processes share this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
sys.path.insert(0, str(Path(__file__).parent))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out: Path, args: list[str], *, nproc: int | None, threads: int) -> list[dict]:
    """One launch; every process's saved arrays. ``nproc=None``: plain python."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(threads)
    head = [sys.executable] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={_port()}"]
    cmd = [*head, str(WORKER), "--out", str(out), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return [dict(np.load(out / f"rank{r}.npz", allow_pickle=True)) for r in range(nproc or 1)]


def quality(args: argparse.Namespace) -> None:
    from _metrics import latent_metrics
    from _prep import data_path, prepare

    train, test = prepare(data_path("pbmc3k.h5ad"))
    work = Path(tempfile.mkdtemp(prefix="dist_quality_"))
    train.write_h5ad(work / "train.h5ad")
    test.write_h5ad(work / "test.h5ad")
    common = ["--h5ad", str(work / "train.h5ad"), "--in-memory", "--layer", "counts",
              "--held-out", str(work / "test.h5ad"), "--labels", "cell_type",
              "--epochs", str(args.epochs), "--early-stopping", "--validation-fraction",
              "0.1"]
    runs = {"1 process, batch 128": (None, 128, []),
            "2 processes, 64 each, BatchNorm summed": (2, 64, ["--sync-batchnorm"]),
            "2 processes, 128 each, BatchNorm summed": (2, 128, ["--sync-batchnorm"]),
            "2 processes, 128 each (default)": (2, 128, [])}
    rows = []
    for name, (nproc, batch, more) in runs.items():
        threads = args.threads if nproc is None else 1
        r = _run(work / name.replace(" ", "_").replace(",", ""),
                 [*common, "--batch-size", str(batch), *more], nproc=nproc,
                 threads=threads)[0]
        m = latent_metrics(r["latent"], r["labels"])
        rows.append({"run": name, "epochs": len(r["h.train_elbo"]),
                     "held_out_log_px": float(np.mean(r["held_out_log_px"])),
                     "knn_purity": m["knn_purity"], "ari": m["ari"],
                     "train_s": float(np.sum(r["h.seconds"]))})
    base = rows[0]
    print("| run | epochs | held-out log p(x) | vs one | 15-NN purity | vs one | ARI | "
          "training s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['run']} | {row['epochs']} | {row['held_out_log_px']:.2f} | "
              f"{row['held_out_log_px'] - base['held_out_log_px']:+.2f} | "
              f"{row['knn_purity']:.3f} | {row['knn_purity'] - base['knn_purity']:+.3f} | "
              f"{row['ari']:.3f} | {row['train_s']:.0f} |")
    print(json.dumps(rows))


def _cells_per_s(r: dict, n_train: int) -> float:
    seconds = r["h.seconds"][1:] if len(r["h.seconds"]) > 1 else r["h.seconds"]
    return n_train / float(np.median(seconds))


def speed(args: argparse.Namespace) -> None:
    import anndata as ad

    n = ad.read_h5ad(args.h5ad, backed="r").n_obs
    work = Path(tempfile.mkdtemp(prefix="dist_speed_"))
    common = ["--h5ad", str(args.h5ad), "--epochs", str(args.epochs),
              "--validation-fraction", "0", "--batch-size", "128"]
    runs = [("1 process", None, args.threads, ["--device", args.device]),
            ("1 process, distributed path", 1, args.threads,
             ["--distributed", "on", "--sync-batchnorm", "--device", args.device]),
            ("2 processes, BatchNorm summed", 2, 1, ["--sync-batchnorm"]),
            ("2 processes (default)", 2, 1, [])]
    if args.device != "cpu":  # one GPU: what the distributed path costs on it
        runs = runs[:2]
    print(f"| data | run | threads a process | cells/s | vs 1 process |  ({args.device})")
    print("|---|---|---:|---:|---:|")
    for where, extra in (("in memory", ["--in-memory"]), ("streamed", [])):
        base = None
        for name, nproc, threads, more in runs:
            label = f"{where}_{name}".replace(" ", "_").replace(",", "")
            r = _run(work / label, [*common, *extra, *more], nproc=nproc, threads=threads)[0]
            rate = _cells_per_s(r, n)
            base = base or rate
            print(f"| {where} | {name} | {threads} | {rate:,.0f} | {rate / base:.2f} |",
                  flush=True)


def scvi(args: argparse.Namespace) -> None:
    script = Path(__file__).with_name("_run_scvi_ddp.py")
    print("| run | threads a process | cells/s | vs 1 process |")
    print("|---|---:|---:|---:|")
    base = None
    for devices, threads in ((1, args.threads), (2, 1)):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        done = subprocess.run(
            [args.scvi_python, str(script), "--h5ad", str(args.h5ad), "--devices",
             str(devices), "--threads", str(threads), "--epochs", str(args.epochs)],
            env=env, capture_output=True, text=True)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not lines:
            raise RuntimeError(done.stderr[-4000:])
        result = json.loads(lines[-1][len("RESULT "):])
        base = base or result["cells_per_s"]
        print(f"| scvi-tools {result['version']}, {devices} process(es) | {threads} | "
              f"{result['cells_per_s']:,.0f} | {result['cells_per_s'] / base:.2f} |",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["quality", "speed", "scvi"], required=True)
    p.add_argument("--h5ad", type=Path, help="speed and scvi: the cells (counts in X)")
    p.add_argument("--epochs", type=int, default=None,
                   help="quality: 400 (early stopping ends sooner); speed, scvi: 3")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads of the one-process runs (the distributed ones: 1 each)")
    p.add_argument("--scvi-python", default="/work/venvs/peers/bin/python")
    p.add_argument("--device", default="cpu", help="speed: cuda measures the one-GPU runs")
    args = p.parse_args()
    if args.epochs is None:
        args.epochs = 400 if args.part == "quality" else 3
    if args.part != "quality" and args.h5ad is None:
        p.error(f"--part {args.part} needs --h5ad")
    {"quality": quality, "speed": speed, "scvi": scvi}[args.part](args)


if __name__ == "__main__":
    main()
