"""Peak memory of one output pass over cells streamed from disk: log p(x), rate and distortion
(``model/_outputs.evaluate``), or with ``--pass latent`` the latent written to a zarr store
(``get_latent_representation(out=)``), of an untrained model on every cell of a file, in this
process.

A pass over chunks must not hold memory that grows with the cells: its peak should be close to
its start. ``--no-prefetch`` reads blocks on the main thread, ``--trim`` calls glibc's
``malloc_trim(0)`` before each buffer is read (run with ``MALLOC_ARENA_MAX=1`` in the
environment for a single malloc arena). Examples::

    python benchmarks/output_memory.py --file /tmp/large/pbmc_100k.h5ad
    python benchmarks/output_memory.py --file /tmp/large/pbmc_10m.h5ad --pass latent --no-prefetch
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
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
    parser.add_argument("--pass", dest="which", choices=["evaluate", "latent"],
                        default="evaluate")
    parser.add_argument("--no-prefetch", action="store_true",
                        help="read blocks on the main thread (data._stream.PREFETCH = False)")
    parser.add_argument("--trim", action="store_true",
                        help="glibc malloc_trim(0) before each buffer of blocks is read")
    args = parser.parse_args()

    import torch

    import omicvae_sc as ov
    from omicvae_sc.data import _stream
    from omicvae_sc.model import _outputs

    torch.set_num_threads(args.threads)
    _stream.PREFETCH = not args.no_prefetch
    if args.trim:
        read, libc = _stream.BlockStream._read, ctypes.CDLL("libc.so.6")

        def trimmed(self, blocks):
            libc.malloc_trim(0)
            return read(self, blocks)

        _stream.BlockStream._read = trimmed
    adata = ov.read_lazy(args.file)
    ov.OmicVAE.setup_anndata(adata)
    model = ov.OmicVAE(adata, device="cpu", seed=0)
    data = model._tensors(None)
    if args.idle_thread:
        threading.Thread(target=_wake_every_second, daemon=True).start()
    start = reset_peak_rss()
    t0 = time.perf_counter()
    if args.which == "latent":
        store = Path(args.file).with_name(f".latent-{Path(args.file).stem}.zarr")
        model.get_latent_representation(out=store)
        shutil.rmtree(store)
        what = "the latent to disk"
    else:
        _outputs.evaluate(model.module, data, args.n_samples, 0)
        what = f"log p(x), {args.n_samples} samples"
    print(f"{adata.n_obs:,} cells, {what}: {time.perf_counter() - t0:.0f} s, RSS "
          f"{start:.0f} MB before the pass, peak {rss_mb():.0f} MB during it "
          f"({rss_mb() - start:.0f} above), {rss_mb('VmRSS'):.0f} MB after")

if __name__ == "__main__":
    main()
