"""bfloat16 matrix products in training: same model quality, float32 everywhere else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omicvae_sc import OmicVAE
from omicvae_sc.model._runtime import fast_bfloat16, resolve_precision
from omicvae_sc.module import VAE
from omicvae_sc.module._nn import Dropout, Linear


def test_linear_in_bfloat16_keeps_float32_in_and_out():
    torch.manual_seed(0)
    layer = Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    exact = layer(x)
    layer.compute_dtype = torch.bfloat16
    low = layer(x)
    low.sum().backward()
    assert low.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert layer.weight.grad.dtype == torch.float32
    assert not torch.equal(low, exact)  # the product really ran in bfloat16
    torch.testing.assert_close(low, exact, rtol=0.05, atol=0.05)


def test_matmul_dtype_covers_the_gene_sized_layers_and_is_undone():
    vae = VAE(50, likelihood="zinb")
    layers = [vae.encoder.body.net[0], vae.decoder.fraction_logits, vae.decoder.zi_logits]
    with pytest.raises(RuntimeError, match="inside"), vae.matmul_dtype(torch.bfloat16):
        assert all(layer.compute_dtype == torch.bfloat16 for layer in layers)
        assert vae.decoder.body.net[0].compute_dtype is None  # latent-sized: stays float32
        raise RuntimeError("inside")
    assert all(layer.compute_dtype is None for layer in layers)


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) == "float32"
    assert resolve_precision("bfloat16", cpu) == "bfloat16"
    assert resolve_precision("auto", cpu) == ("bfloat16" if fast_bfloat16(cpu) else "float32")
    with pytest.raises(ValueError, match=r"precision='half' is not supported; expected one of"):
        resolve_precision("half", cpu)


def test_bad_precision_is_refused_before_training(synthetic, adata_fingerprint):
    OmicVAE.setup_anndata(synthetic, layer="counts")
    model = OmicVAE(synthetic, seed=0)
    before = adata_fingerprint(synthetic)
    with pytest.raises(ValueError, match="precision='fp8' is not supported"):
        model.train(2, precision="fp8", progress_bar=False)
    assert adata_fingerprint(synthetic) == before
    assert not model.is_trained


def test_bfloat16_training_matches_float32_quality(synthetic):
    """Same data, seed and epochs: the held-out ELBO (computed in float32) is as good."""
    OmicVAE.setup_anndata(synthetic, layer="counts", batch_key="batch")
    held_out = np.arange(synthetic.n_obs) % 5 == 0
    train, test = synthetic[~held_out].copy(), synthetic[held_out].copy()
    elbo = {}
    for precision in ("float32", "bfloat16"):
        model = OmicVAE(train, seed=0)
        model.train(60, precision=precision, validation_fraction=0.0, progress_bar=False)
        elbo[precision] = float(np.mean(model.get_elbo(test)))
    assert elbo["bfloat16"] != elbo["float32"]  # the setting changes the arithmetic
    assert elbo["bfloat16"] > elbo["float32"] - 0.01 * abs(elbo["float32"])


def test_dropout_keeps_each_unit_with_probability_one_minus_p_and_rescales():
    torch.manual_seed(0)
    layer = Dropout(0.1)
    x = torch.ones(400, 500, requires_grad=True)
    y = layer(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005  # 200,000 draws: sd 0.0007
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()  # the gradient goes through the kept units only, rescaled alike
    torch.testing.assert_close(x.grad, kept.float() / 0.9)
    layer.eval()
    assert layer(x) is x
    assert Dropout(0.0)(x) is x


def test_dropout_off_the_cpu_is_torch_s_fused_kernel(monkeypatch):
    calls = []
    fused = torch.nn.functional.dropout
    monkeypatch.setattr(torch.nn.functional, "dropout",
                        lambda x, p, training: calls.append(p) or fused(x, p, training))
    layer = Dropout(0.1)
    assert layer(torch.empty(4, 8, device="meta")).device.type == "meta"
    assert calls == [0.1]
    layer(torch.ones(4, 8))  # the CPU draws its own mask
    assert calls == [0.1]
