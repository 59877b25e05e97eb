"""Peak memory of one output pass over cells streamed from disk: log p(x), rate and distortion
(``model/_outputs.evaluate``) of an untrained model on every cell of a file, in this process.

A pass over chunks must not hold memory that grows with the cells: its peak should be close to
its start. Example::

    python benchmarks/output_memory.py --file /tmp/large/pbmc_100k.h5ad
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _prep import reset_peak_rss, rss_mb


def _wake_every_second() -> None:
    while True:
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", required=True, help="an .h5ad of raw counts (make_large.py)")
    parser.add_argument("--n-samples", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--idle-thread", action="store_true",
                        help="run a second Python thread that wakes every second, as a "
                             "progress bar's monitor does")
    args = parser.parse_args()

    import torch

    import omicvae_sc as ov
    from omicvae_sc.model import _outputs

    torch.set_num_threads(args.threads)
    adata = ov.read_lazy(args.file)
    ov.OmicVAE.setup_anndata(adata)
    model = ov.OmicVAE(adata, device="cpu", seed=0)
    data = model._tensors(None)
    if args.idle_thread:
        threading.Thread(target=_wake_every_second, daemon=True).start()
    start = reset_peak_rss()
    t0 = time.perf_counter()
    _outputs.evaluate(model.module, data, args.n_samples, 0)
    print(f"{adata.n_obs:,} cells, {args.n_samples} samples: {time.perf_counter() - t0:.0f} s, "
          f"RSS {start:.0f} MB before the pass, peak {rss_mb():.0f} MB during it")


if __name__ == "__main__":
    main()
