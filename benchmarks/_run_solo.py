"""Score doublets with scvi-tools SOLO (an SCVI model, then a SOLO classifier on its latent space).

Runs in the scvi-tools venv only (it imports neither omicvae_sc nor scvi-tools at module level,
so ``--help`` works anywhere).  Inputs hold raw integer counts (CSR float32) in ``X`` with the same
genes, e.g. as written by ``_prep.py``::

    /work/venvs/scvi/bin/python benchmarks/_run_solo.py --train cells.h5ad --score cells.h5ad \
        --batch-key batch --seed 0 --out /tmp/solo.json

What it does, with scvi-tools 1.4.2 defaults unless stated:

1. ``SCVI.setup_anndata(train, batch_key=...)``; ``SCVI(train)`` (default architecture);
   ``train(max_epochs=--epochs)`` (``None``: scvi-tools' heuristic, 400 epochs up to 20,000
   cells).  Seed: ``scvi.settings.seed = --seed``.
2. ``SOLO.from_scvi_model(scvi_model[, adata=score])``, ``solo.train()`` (400 epochs at most,
   early stopping on the validation loss), ``solo.predict(soft=True)``; the score is the
   ``"doublet"`` column, a softmax probability in scvi-tools >= 1.1.3 (logits before).
   When SCVI was trained on several batches, SOLO is built and trained once per batch of the
   scored cells with ``restrict_to_batch=b`` (scvi-tools' documented practice: "Solo should be
   trained on one lane of data at a time"); without it SOLO simulates every doublet with the
   first batch's label.  The per-batch scores are put back in the scored cells' order.

Output (.json): ``score`` (per-cell doublet probability, in SCORE's cell order), ``obs_names``,
``seconds_scvi`` (SCVI ``train()``), ``seconds_solo`` (all SOLO construction, training and
prediction), ``seconds`` (their sum), ``scvi_epochs``, ``solo_epochs`` (summed over batches),
``solo_epochs_per_batch`` (``{batch: epochs}``; key ``"all"`` without batches), ``tool``,
``version``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, type=Path, help=".h5ad to train SCVI on")
    parser.add_argument("--score", required=True, type=Path, help=".h5ad of cells to score")
    parser.add_argument("--out", required=True, type=Path, help="output .json")
    parser.add_argument("--batch-key", default=None, help="obs column of batches (default none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--epochs", type=int, default=None, help="SCVI max_epochs (default: scvi-tools' heuristic)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    return parser.parse_args()


def quiet() -> None:
    """Silence Lightning's info lines and known harmless warnings (progress bars: train())."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*SOLO.predict.*")  # logits-vs-probability note
    warnings.filterwarnings("ignore", message=".*num_workers.*")
    warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")  # < 10 minibatches/epoch
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def epochs_run(model, key: str) -> int:
    """Epochs in a trained scvi-tools model's history (length of an epoch-level series)."""
    return len(model.history[key])


def main() -> None:
    args = parse_args()
    import scvi  # imported late so that --help works without the scvi venv
    import torch

    quiet()  # before the seed: Lightning logs "Seed set to ..."
    scvi.settings.verbosity = logging.WARNING
    torch.set_num_threads(args.threads)
    scvi.settings.seed = args.seed

    same = args.score.resolve() == args.train.resolve()
    train = ad.read_h5ad(args.train)
    score = train if same else ad.read_h5ad(args.score)
    if not same and list(score.var_names) != list(train.var_names):
        raise ValueError("--train and --score must have the same genes in the same order")

    scvi.model.SCVI.setup_anndata(train, batch_key=args.batch_key)
    model = scvi.model.SCVI(train)
    start = time.perf_counter()
    model.train(max_epochs=args.epochs, enable_progress_bar=False)
    seconds_scvi = time.perf_counter() - start
    scvi_epochs = epochs_run(model, "elbo_train")

    start = time.perf_counter()
    kwargs = {} if same else {"adata": score}
    if model.summary_stats.n_batch > 1:
        # Codes of the scored cells (an unknown batch in --score fails in from_scvi_model).
        batches = score.obs[args.batch_key].to_numpy()
        groups = [(b, np.flatnonzero(batches == b)) for b in dict.fromkeys(batches)]
    else:
        groups = [(None, np.arange(score.n_obs))]
    scores = np.full(score.n_obs, np.nan)
    solo_epochs: dict[str, int] = {}
    for batch, idx in groups:
        if batch is None:
            solo = scvi.external.SOLO.from_scvi_model(model, **kwargs)
        else:
            solo = scvi.external.SOLO.from_scvi_model(model, restrict_to_batch=batch, **kwargs)
        solo.train(enable_progress_bar=False)
        solo_epochs["all" if batch is None else str(batch)] = epochs_run(solo, "train_loss_epoch")
        pred = solo.predict(soft=True)  # DataFrame, columns "doublet" and "singlet", rows=cells
        # Rows follow the batch's cells in order; check by name, then place by position (names
        # need not be unique across files).
        if pred.shape[0] != idx.size or not np.array_equal(
            pred.index.to_numpy(), score.obs_names[idx].to_numpy()
        ):
            raise RuntimeError(f"SOLO returned cells out of order for batch {batch!r}")
        scores[idx] = pred["doublet"].to_numpy(dtype=np.float64)
    seconds_solo = time.perf_counter() - start
    if np.isnan(scores).any():
        raise RuntimeError("some cells got no SOLO score")

    result = {
        "score": scores.tolist(),
        "obs_names": [str(name) for name in score.obs_names],
        "seconds_scvi": seconds_scvi,
        "seconds_solo": seconds_solo,
        "seconds": seconds_scvi + seconds_solo,
        "scvi_epochs": scvi_epochs,
        "solo_epochs": sum(solo_epochs.values()),
        "solo_epochs_per_batch": solo_epochs,
        "tool": "scvi-tools SOLO",
        "version": scvi.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result))
    print(
        f"scvi-tools {scvi.__version__} SOLO: SCVI {scvi_epochs} epochs in {seconds_scvi:.1f} s, "
        f"SOLO {solo_epochs} epochs in {seconds_solo:.1f} s, {score.n_obs} cells -> {args.out}"
    )


if __name__ == "__main__":
    main()
