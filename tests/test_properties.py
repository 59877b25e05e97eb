"""Property-based tests (hypothesis): over random shapes, sparsity, covariates, formats and
dtypes, valid input always sets up, trains and writes back; invalid input always raises the
documented error and leaves the AnnData as it was."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omicvae_sc import OmicVAE

FORMATS = {"dense": np.asarray, "csr": sp.csr_matrix, "csc": sp.csc_matrix}
DTYPES = [np.int32, np.int64, np.float32, np.float64]
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@st.composite
def count_data(draw) -> tuple[np.ndarray, pd.DataFrame, str, type]:
    """Counts (every cell with at least one), covariates of 1-3 categories, format, dtype."""
    n_cells, n_genes = draw(st.integers(2, 40)), draw(st.integers(1, 25))
    density = draw(st.floats(0.05, 1.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    counts = rng.poisson(draw(st.floats(0.5, 20.0)), (n_cells, n_genes))
    counts *= rng.random((n_cells, n_genes)) < density
    counts[np.arange(n_cells), rng.integers(0, n_genes, n_cells)] += 1
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_cells)])
    for j in range(draw(st.integers(0, 2))):
        obs[f"cov{j}"] = pd.Categorical(rng.integers(0, draw(st.integers(1, 3)), n_cells)
                                        .astype(str))
    return counts, obs, draw(st.sampled_from(list(FORMATS))), draw(st.sampled_from(DTYPES))


def _adata(counts, obs, fmt, dtype) -> AnnData:
    adata = AnnData(X=FORMATS[fmt](counts.astype(dtype)), obs=obs)
    adata.var_names = [f"g{i}" for i in range(counts.shape[1])]
    return adata


@SETTINGS
@given(data=count_data(), with_batch=st.booleans())
def test_valid_input_sets_up_trains_and_writes_back(data, with_batch):
    adata = _adata(*data)
    keys = list(adata.obs.columns)
    batch_key = keys[0] if keys and with_batch else None
    others = [k for k in keys if k != batch_key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one-cell categories, empty genes
        OmicVAE.setup_anndata(adata, batch_key=batch_key, categorical_covariate_keys=others)
        model = OmicVAE(adata, n_hidden=8, n_latent=2, device="cpu")
        model.train(2, batch_size=16, progress_bar=False)
        model.write_results(adata, n_samples=2)
    assert adata.obsm["X_omicvae"].shape == (adata.n_obs, 2)
    assert np.isfinite(adata.obsm["X_omicvae"]).all()
    for key in ("log_likelihood", "rate", "distortion", "anomaly_score", "doublet_score"):
        assert np.isfinite(adata.obs[f"omicvae_{key}"]).all(), key


def _fingerprint(adata: AnnData) -> tuple:
    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    return (x.tobytes(), x.dtype.str, type(adata.X).__name__, tuple(adata.obs.columns),
            tuple(adata.uns.keys()))


BAD = {  # what is planted -> (needs a float dtype, the documented message)
    "negative": (False, r"holds negative values \(first -1 at cell"),
    "NaN": (True, r"holds NaN or infinite values \(first nan at cell"),
    "infinite": (True, r"holds NaN or infinite values \(first inf at cell"),
    "non-integer": (True, r"holds non-integer values \(first 0\.5 at cell"),
    "empty cell": (False, r"cell\(s\) in adata\.X have zero total counts"),
}
PLANTED = {"negative": -1.0, "NaN": np.nan, "infinite": np.inf, "non-integer": 0.5}


@SETTINGS
@given(data=count_data(), bad=st.sampled_from(list(BAD)), where=st.integers(0, 10**6))
def test_invalid_input_raises_the_documented_error_and_changes_nothing(data, bad, where):
    counts, obs, fmt, dtype = data
    needs_float, match = BAD[bad]
    counts = counts.astype(np.float64 if needs_float and dtype not in (np.float32, np.float64)
                           else dtype)
    cell, gene = where % counts.shape[0], (where // counts.shape[0]) % counts.shape[1]
    if bad == "empty cell":
        counts[cell] = 0
    else:
        counts[cell, gene] = PLANTED[bad]
    adata = _adata(counts, obs, fmt, counts.dtype)
    before = _fingerprint(adata)
    with pytest.raises(ValueError, match=match):
        OmicVAE.setup_anndata(adata)
    assert _fingerprint(adata) == before
