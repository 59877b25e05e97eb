"""Generation from the prior: new cells (``OmicVAE.sample``) and the per-gene posterior predictive
check (``OmicVAE.posterior_predictive_check``), as functions of the module and the data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from omicvae_sc.data import AnnDataSetup, CountTensors, library_sizes
from omicvae_sc.model._runtime import seeded
from omicvae_sc.module import VAE, chunk_rows


# ---------------------------------------------------------------------------- new cells
@dataclass(frozen=True)
class CellPlan:
    """What each generated cell is drawn at: its library size and covariate codes."""

    library: np.ndarray  # (n_cells,) float, the exposure of the decoder mean
    codes: np.ndarray | None  # (n_cells, n_covariates) integer codes, batch first


def plan_cells(
    setup: AnnDataSetup, library: np.ndarray, codes: np.ndarray | None, *, n_cells: int,
    batch: str | None, library_size: float | np.ndarray | None, seed: int,
) -> CellPlan:
    """Resample training cells (of ``batch`` only, when given) with ``seed`` for the library
    sizes ``library`` ``(n_train,)`` and covariate codes; ``library_size`` overrides the former."""
    pool = np.arange(len(library))
    if batch is not None:
        if setup.batch_key is None:
            msg = "batch= needs a model set up with batch_key=; this model has no batch."
            raise ValueError(msg)
        cats = list(setup.categories[0])
        if str(batch) not in cats:
            msg = f"batch={batch!r} is not a known batch; known: {cats[:10]}."
            raise ValueError(msg)
        pool = pool[codes[:, 0] == cats.index(str(batch))]
    pick = np.random.default_rng(seed).choice(pool, size=n_cells, replace=True)
    lib = np.asarray(library, dtype=np.float64)[pick]
    if library_size is not None:
        given = np.broadcast_to(np.asarray(library_size, dtype=np.float64), (n_cells,)) \
            if np.ndim(library_size) == 0 or np.shape(library_size) == (n_cells,) else None
        if given is None or not np.all(np.isfinite(given)) or not np.all(given > 0):
            msg = (f"library_size must be a positive number or {n_cells} positive numbers (one "
                   f"per cell); got shape {np.shape(library_size)}. Leave it None to resample "
                   "the training cells' library sizes.")
            raise ValueError(msg)
        lib = given.copy()
    return CellPlan(library=lib, codes=None if codes is None else codes[pick])


@torch.inference_mode()
def sample_counts(module: VAE, plan: CellPlan, device: torch.device) -> sp.csr_matrix:
    """z ~ N(0, I) per cell, decoded at the planned library and covariates, counts drawn from
    the fitted likelihood (torch's global RNG: seed it around the call). ``(n_cells, genes)``."""
    n = len(plan.library)
    step = chunk_rows(module.decoder.fraction_logits.out_features, torch.device(device))
    parts = []
    for lo in range(0, n, step):
        lib = torch.as_tensor(plan.library[lo:lo + step], dtype=torch.float32, device=device)
        codes = None if plan.codes is None else torch.as_tensor(plan.codes[lo:lo + step],
                                                                device=device)
        z = torch.randn(len(lib), module.n_latent, device=device)  # (chunk, latent)
        x = module.generative(z, lib[:, None], codes).distribution().sample()  # (chunk, genes)
        parts.append(sp.csr_matrix(x.cpu().numpy().astype(np.float32)))
    return sp.vstack(parts, format="csr")


def as_anndata(
    counts: sp.csr_matrix, plan: CellPlan, setup: AnnDataSetup, var_names: np.ndarray
) -> AnnData:
    """Generated cells as a new AnnData: counts in ``X`` and ``layers['counts']``, the planned
    ``obs['library_size']`` and each covariate as a categorical ``obs`` column."""
    obs = pd.DataFrame({"library_size": plan.library},
                       index=pd.Index([f"generated_{i}" for i in range(counts.shape[0])]))
    for j, (key, cats) in enumerate(zip(setup.covariate_keys, setup.categories, strict=True)):
        obs[key] = pd.Categorical.from_codes(plan.codes[:, j], categories=list(cats))
    adata = AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(var_names, dtype=str)))
    adata.layers["counts"] = counts.copy()
    return adata


def sample_cells(module: VAE, setup: AnnDataSetup, var_names: np.ndarray,
                 counts: np.ndarray | sp.spmatrix, codes: np.ndarray | None,
                 device: torch.device, *, n_cells: int, batch: str | None,
                 library_size: float | np.ndarray | None, seed: int) -> AnnData:
    """``OmicVAE.sample``: new cells at the library sizes and covariates of the training
    cells (``counts``, ``codes``) resampled with ``seed``, as an AnnData."""
    library = library_sizes(counts)
    plan = plan_cells(setup, library, codes, n_cells=n_cells, batch=batch,
                      library_size=library_size, seed=seed)
    with seeded(seed, device):
        x = sample_counts(module, plan, device)
    return as_anndata(x, plan, setup, var_names)


# ---------------------------------------------------------------------------- the check
class _GeneSums:
    """Running per-gene sums over cells: count, sum, sum of squares and zeros (float64)."""

    def __init__(self, n_genes: int, device: torch.device):
        self.n = 0
        self.sums = torch.zeros(3, n_genes, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.double()  # (chunk, genes)
        self.n += len(x)
        self.sums += torch.stack([x.sum(0), x.pow(2).sum(0), (x == 0).double().sum(0)])

    def moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        total, squares, zeros = self.sums.cpu().numpy()
        mean = total / self.n
        var = (squares - self.n * mean**2) / max(1, self.n - 1)
        return mean, np.maximum(var, 0.0), zeros / self.n


@torch.inference_mode()
def predictive_moments(module: VAE, data: CountTensors) -> pd.DataFrame:
    """Per-gene mean, variance and zero fraction of the observed cells and of one cell generated
    per observed cell (z ~ N(0, I), the observed library size and covariates). Uses torch's
    global RNG: seed it around the call. Columns ``observed_<m>`` / ``generated_<m>``."""
    observed, generated = (_GeneSums(data.n_genes, data.device) for _ in range(2))
    for x, codes in data.batches(chunk_rows(data.n_genes, data.device), shuffle=False):
        z = torch.randn(len(x), module.n_latent, device=x.device)  # (chunk, latent)
        observed.add(x)
        library = x.sum(-1, keepdim=True)
        generated.add(module.generative(z, library, codes).distribution().sample())
    out = {}
    for name, sums in (("observed", observed), ("generated", generated)):
        for stat, values in zip(("mean", "variance", "zero_fraction"), sums.moments(),
                                strict=True):
            out[f"{name}_{stat}"] = values
    return pd.DataFrame(out)


def summarize(df: pd.DataFrame) -> None:
    """Store summary errors in ``df.attrs``: mean absolute error of the zero fractions and of
    log1p of the means and variances (observed vs generated, over genes)."""
    def mae(a: str, b: str, log: bool) -> float:
        x, y = df[a].to_numpy(), df[b].to_numpy()
        return float(np.mean(np.abs(np.log1p(x) - np.log1p(y)) if log else np.abs(x - y)))

    df.attrs["zero_fraction_mae"] = mae("observed_zero_fraction", "generated_zero_fraction", False)
    df.attrs["log_mean_mae"] = mae("observed_mean", "generated_mean", True)
    df.attrs["log_variance_mae"] = mae("observed_variance", "generated_variance", True)


def posterior_predictive_check(module: VAE, data: CountTensors, var_names: np.ndarray,
                               seed: int) -> pd.DataFrame:
    """``OmicVAE.posterior_predictive_check`` on the (already subsampled) cells ``data``."""
    with seeded(seed, data.device):
        df = predictive_moments(module, data)
    df.index = pd.Index(var_names, name="gene")
    summarize(df)
    df.attrs["n_cells"] = data.n_cells
    return df
