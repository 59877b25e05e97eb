"""``tl.rate_distortion``: a beta sweep that traces the rate-distortion frontier.

The ELBO is -(distortion + rate): distortion -log p(x|z) is how badly the latent reconstructs
the counts, rate KL(q(z|x) || p(z)) is how much information the latent carries about the cell.
Training with a weight beta on the rate picks one point on the frontier: a large beta buys a
cheap, uninformative latent at the price of reconstruction. Each point here is a model trained
at one beta and evaluated on the same held-out cells.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from anndata import AnnData
from tqdm.auto import tqdm

from omicvae_sc.data import build_setup, check_key_added, write_uns
from omicvae_sc.model import OmicVAE, validation_split

DEFAULT_BETAS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class RateDistortionFrontier:
    """Mean rate and distortion (nats per cell) of one model per beta, by beta, on the cells
    each model was trained on and on held-out cells."""

    beta: np.ndarray
    rate: np.ndarray  # training cells
    distortion: np.ndarray
    held_out_rate: np.ndarray
    held_out_distortion: np.ndarray
    n_train: int
    n_held_out: int

    @property
    def monotone(self) -> bool:
        """True when, on the training cells, rate never rises and distortion never falls as
        beta grows: the trade-off each model was trained to make."""
        return _monotone(self.rate, self.distortion)

    @property
    def held_out_monotone(self) -> bool:
        """The same on held-out cells, where overfitting at small beta can break it."""
        return _monotone(self.held_out_rate, self.held_out_distortion)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({
            "beta": self.beta, "rate": self.rate, "distortion": self.distortion,
            "held_out_rate": self.held_out_rate,
            "held_out_distortion": self.held_out_distortion,
            "held_out_elbo": -(self.held_out_rate + self.held_out_distortion)})

    def to_dict(self) -> dict:
        """Plain, h5ad-serializable dict."""
        d = {k: (np.asarray(v) if isinstance(v, np.ndarray) else v)
             for k, v in asdict(self).items()}
        return d | {"monotone": self.monotone, "held_out_monotone": self.held_out_monotone}

    @classmethod
    def from_dict(cls, d: dict) -> RateDistortionFrontier:
        arrays = ("beta", "rate", "distortion", "held_out_rate", "held_out_distortion")
        return cls(**{k: np.asarray(d[k], dtype=float) for k in arrays},
                   n_train=int(d["n_train"]), n_held_out=int(d["n_held_out"]))


def _monotone(rate: np.ndarray, distortion: np.ndarray) -> bool:
    return bool(np.all(np.diff(rate) <= 0) and np.all(np.diff(distortion) >= 0))


def _check_betas(betas) -> np.ndarray:
    arr = np.asarray(list(betas), dtype=float)
    if arr.size < 2 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        msg = f"betas must hold at least 2 positive, finite values; got {list(betas)}."
        raise ValueError(msg)
    if len(np.unique(arr)) != arr.size:
        msg = f"betas must be distinct; got {list(betas)}."
        raise ValueError(msg)
    return np.sort(arr)


def rate_distortion(
    adata: AnnData, *, betas=DEFAULT_BETAS, layer: str | None = None,
    batch_key: str | None = None, validation_fraction: float = 0.1,
    max_epochs: int | None = None, n_samples: int = 10, seed: int = 0,
    device: str = "auto", model_kwargs: dict | None = None, train_kwargs: dict | None = None,
    key_added: str = "omicvae_rate_distortion", progress_bar: bool = True, copy: bool = False,
) -> AnnData | None:
    """Train one model per beta and measure its rate and distortion: the frontier.

    Every model is trained on the same cells and evaluated on them and on the same held-out
    cells (drawn with ``seed``). Every model trains for the same ``max_epochs``, with the KL
    weight warming up to its beta, and without early stopping, so that the points differ in
    beta only.

    Parameters
    ----------
    adata
        Cells x genes with raw integer counts in ``adata.X`` or ``adata.layers[layer]``.
    betas
        KL weights to train at (at least 2, positive, distinct); sorted ascending.
    layer
        Layer with the raw counts (``None``: ``adata.X``).
    batch_key
        ``adata.obs`` column with the batch.
    validation_fraction
        Share of cells held out from training; rate and distortion are also measured on them.
    max_epochs
        Training epochs per model (``None``: scales with the number of cells).
    n_samples
        Posterior draws per held-out cell for the distortion.
    seed
        Seeds the split, every model's initialisation and training, and the evaluation.
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
    model_kwargs, train_kwargs
        Further arguments of :class:`~omicvae_sc.OmicVAE` and
        :meth:`~omicvae_sc.OmicVAE.train` (not ``beta``).
    key_added
        ``adata.uns`` key of the frontier.
    progress_bar
        Show a bar over the betas.
    copy
        Work on and return a copy instead of writing into ``adata``.

    Returns
    -------
    ``None``, or the copy when ``copy=True``. Writes ``adata.uns[key_added]``: ``beta``
    (ascending); mean ``rate`` and ``distortion`` per beta on the training cells and
    ``held_out_rate`` / ``held_out_distortion`` on the held-out cells (nats per cell);
    ``n_train``, ``n_held_out``; ``monotone`` (on the training cells, rate never rises and
    distortion never falls with beta) and ``held_out_monotone``.
    ``ov.pl.rate_distortion(adata)`` plots it.
    """
    check_key_added(key_added)
    betas = _check_betas(betas)
    if "beta" in (train_kwargs or {}) or "validation_fraction" in (train_kwargs or {}):
        msg = ("train_kwargs may not set beta or validation_fraction; rate_distortion sets "
               "them (pass betas= and validation_fraction=).")
        raise ValueError(msg)
    setup = build_setup(adata, layer=layer, batch_key=batch_key)
    train_idx, held_out = validation_split(adata.n_obs, validation_fraction, True, seed)
    parts = {"train": adata[train_idx], "held_out": adata[held_out]}  # read only: views
    found: dict[str, list[float]] = {}
    for beta in tqdm(betas, disable=not progress_bar, desc="betas"):
        model = OmicVAE.from_setup(adata, setup, device=device, seed=seed,
                                   **(model_kwargs or {}))
        # every beta gets the same number of epochs: early stopping would end each model at a
        # different point of its optimization and blur the frontier (train_kwargs may turn it on)
        model.train(max_epochs, beta=float(beta), validation_fraction=validation_fraction,
                    seed=seed, progress_bar=False,
                    **({"early_stopping": False} | (train_kwargs or {})))
        for name, cells in parts.items():
            rate, distortion = model.get_rate_distortion(cells, n_samples=n_samples, seed=seed)
            found.setdefault(f"{name}_rate", []).append(float(rate.mean()))
            found.setdefault(f"{name}_distortion", []).append(float(distortion.mean()))
    frontier = RateDistortionFrontier(
        beta=betas, rate=np.asarray(found["train_rate"]),
        distortion=np.asarray(found["train_distortion"]),
        held_out_rate=np.asarray(found["held_out_rate"]),
        held_out_distortion=np.asarray(found["held_out_distortion"]),
        n_train=len(train_idx), n_held_out=len(held_out))
    target = adata.copy() if copy else adata
    write_uns(target, key_added, frontier.to_dict())
    return target if copy else None
