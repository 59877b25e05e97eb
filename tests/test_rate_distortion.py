"""The beta sweep: rate falls and distortion rises as beta grows, on held-out cells."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import omicvae_sc as ov
from omicvae_sc.tl._rate_distortion import RateDistortionFrontier

KEY = "omicvae_rate_distortion"


def _sweep(adata, **kwargs):
    return ov.tl.rate_distortion(adata, layer="counts", max_epochs=60, device="cpu",
                                 progress_bar=False, model_kwargs={"n_latent": 4}, **kwargs)


def test_frontier_is_monotone_written_and_plotted(synthetic, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    assert _sweep(synthetic, betas=(5.0, 0.1, 1.0), validation_fraction=0.2) is None
    frontier = RateDistortionFrontier.from_dict(synthetic.uns[KEY])
    np.testing.assert_array_equal(frontier.beta, [0.1, 1.0, 5.0])  # sorted
    assert frontier.monotone
    assert frontier.rate[0] > 2 * frontier.rate[-1]  # a strong KL weight empties the latent
    assert frontier.distortion[-1] > frontier.distortion[0] + 1.0
    assert frontier.n_held_out == 60 and frontier.n_train == 240
    assert frontier.held_out_rate[0] > frontier.held_out_rate[-1]
    path = tmp_path / "swept.h5ad"
    synthetic.write_h5ad(path)
    back = RateDistortionFrontier.from_dict(ad.read_h5ad(path).uns[KEY])
    np.testing.assert_array_equal(back.rate, frontier.rate)
    fig = ov.pl.rate_distortion(synthetic, save=str(tmp_path / "rd.png"), show=False)
    assert len(fig.axes[0].lines[0].get_xdata()) == 3
    assert (tmp_path / "rd.png").stat().st_size > 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"betas": (1.0,)}, r"betas must hold at least 2 positive, finite values; got \[1\.0\]"),
    ({"betas": (1.0, -1.0)}, r"betas must hold at least 2 positive, finite values"),
    ({"betas": (1.0, 1.0)}, r"betas must be distinct; got \[1\.0, 1\.0\]"),
    ({"train_kwargs": {"beta": 2.0}}, r"train_kwargs may not set beta or validation_fraction"),
    ({"validation_fraction": 0.0}, r"needs a validation split"),
    ({"key_added": ""}, r"key_added must be a non-empty string"),
])
def test_bad_arguments_are_rejected_before_training(kwargs, match, synthetic,
                                                    adata_fingerprint):
    before = adata_fingerprint(synthetic)
    with pytest.raises(ValueError, match=match):
        _sweep(synthetic, **kwargs)
    assert adata_fingerprint(synthetic) == before


def test_plot_errors_name_what_is_missing(synthetic):
    with pytest.raises(KeyError, match=r"adata\.uns has no 'omicvae_rate_distortion'; run "
                                       r"ov\.tl\.rate_distortion\(adata\) first"):
        ov.pl.rate_distortion(synthetic)
    with pytest.raises(TypeError, match=r"Expected a RateDistortionFrontier or an AnnData, "
                                        r"got dict"):
        ov.pl.rate_distortion({})
