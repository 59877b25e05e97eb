"""scvi-tools 1.4.2's ``differential_expression`` on the prepared DE benchmark set (issue 23),
in the peers' own venv::

    /work/venvs/peers/bin/python benchmarks/_run_de_scvi.py --h5ad de.h5ad --out-dir out/ \
        --seeds 0 1 2 3 4

For each seed: ``SCVI`` with its defaults on ``layers['counts']`` (``scvi.settings.seed``),
then ``mode="change"``, ``delta=0.25``, ``fdr_target=0.05`` (the settings omicvae_sc is run
with) on ``sim`` A against B and on ``null`` x against y; with the first seed also every
``cell_type`` against the rest. Writes one CSV per comparison and seed, and ``scvi.json`` with
the seconds and the peak resident memory above the start of each call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anndata as ad

sys.path.insert(0, str(Path(__file__).parent))
from _prep import reset_peak_rss, rss_mb


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--h5ad", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args()
    import scvi
    import torch

    torch.set_num_threads(2)
    out = Path(args.out_dir)
    adata = ad.read_h5ad(args.h5ad)
    record = {}
    for seed in args.seeds:
        scvi.settings.seed = seed
        scvi.model.SCVI.setup_anndata(adata, layer="counts")
        model = scvi.model.SCVI(adata)
        model.train(enable_progress_bar=False, logger=False, enable_checkpointing=False)
        runs = [("sim", "A", "B"), ("null", "x", "y")]
        if seed == args.seeds[0]:
            runs.append(("cell_type", None, None))
        for groupby, g1, g2 in runs:
            base = reset_peak_rss()
            start = time.perf_counter()
            table = model.differential_expression(
                groupby=groupby, group1=g1, group2=g2, mode="change", delta=0.25,
                fdr_target=0.05, silent=True)
            record[f"{groupby}_{seed}"] = {"seconds": time.perf_counter() - start,
                                           "peak_mb": rss_mb() - base}
            table.to_csv(out / f"scvi_{groupby}_{seed}.csv")
        print(seed, record, flush=True)
    (out / "scvi.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
