"""Faults during training: a non-finite loss, Ctrl-C, and checkpoints that resume bit for bit.

Faults are injected by wrapping the model's real loss; the guard, the fused optimizer, the
checkpoint files and the resume path are the real ones.
"""

from __future__ import annotations

import copy
import os
import pickle

import numpy as np
import pytest
import torch

from omicvae_sc import OmicVAE
from omicvae_sc.module import LossOutput
from omicvae_sc.train import TrainingDiverged

BATCH = 64  # 300 synthetic cells -> 5 training steps per epoch without a validation split


def _model(adata, seed=0) -> OmicVAE:
    OmicVAE.setup_anndata(adata, layer="counts", batch_key="batch")
    return OmicVAE(adata, n_hidden=32, n_latent=4, seed=seed, device="cpu")


def _inject(model: OmicVAE, at_call: int, fault):
    """Make training call number ``at_call`` (1-based) of ``module.loss`` misbehave; returns
    the state dict as it was just before that call."""
    original, calls, before = model.module.loss, [0], {}

    def loss(x, codes=None, *, kl_weight=1.0, nonzero=None):
        if model.module.training:
            calls[0] += 1
            if calls[0] == at_call:
                before.update(copy.deepcopy(model.module.state_dict()))
                out = original(x, codes, kl_weight=kl_weight, nonzero=nonzero)
                return fault(out)
        return original(x, codes, kl_weight=kl_weight, nonzero=nonzero)

    model.module.loss = loss
    return before


def _times(value):
    def fault(out: LossOutput) -> LossOutput:
        return LossOutput(loss=out.loss * value, distortion=out.distortion, rate=out.rate)
    return fault


def _interrupt(out):
    raise KeyboardInterrupt


@pytest.mark.parametrize(("value", "shown"), [(float("nan"), "nan"), (float("inf"), "inf")])
def test_non_finite_loss_stops_at_its_epoch_and_step_with_last_good_weights(value, shown,
                                                                             synthetic):
    model = _model(synthetic)
    before = _inject(model, at_call=5 + 3, fault=_times(value))  # epoch 1, step 2 (0-based)
    with pytest.raises(TrainingDiverged,
                       match=rf"loss became {shown} at epoch 1, step 2 of that epoch "
                             r"\(optimizer step 7\)"):
        model.train(max_epochs=4, batch_size=BATCH, validation_fraction=0.0,
                    progress_bar=False)
    after = model.module.state_dict()
    for key, tensor in before.items():  # parameters and BatchNorm statistics
        assert torch.equal(after[key], tensor), key
    assert len(model.history) == 1 and np.isfinite(model.history.train_elbo).all()
    assert np.isfinite(model.get_latent_representation()).all()


def test_diverged_is_a_floating_point_error(synthetic):
    model = _model(synthetic)
    _inject(model, at_call=1, fault=_times(float("nan")))
    with pytest.raises(FloatingPointError, match="at epoch 0, step 0"):
        model.train(max_epochs=2, batch_size=BATCH, validation_fraction=0.0, progress_bar=False)
    assert len(model.history) == 0 and not model.is_trained


def test_ctrl_c_returns_the_model_and_history_so_far(synthetic):
    model = _model(synthetic)
    init = copy.deepcopy(model.module.state_dict())
    _inject(model, at_call=5 * 2 + 1, fault=_interrupt)  # first step of epoch 2
    with pytest.warns(UserWarning, match=r"Training interrupted \(Ctrl-C\) after 2 of 6 epochs"):
        history = model.train(max_epochs=6, batch_size=BATCH, validation_fraction=0.0,
                              progress_bar=False)
    assert history.interrupted and len(history) == 2 and model.is_trained
    changed = [k for k, v in model.module.state_dict().items() if not torch.equal(v, init[k])]
    assert "decoder.fraction_logits.weight" in changed  # it learned before the interrupt
    assert not model.module.training
    assert np.isfinite(model.get_latent_representation()).all()


def _train(model, directory, **kwargs):
    return model.train(max_epochs=6, batch_size=BATCH, validation_fraction=0.2,
                       checkpoint_dir=directory, checkpoint_every=2, progress_bar=False,
                       seed=3, **kwargs)


def test_resume_continues_bitwise_to_the_uninterrupted_result(tmp_path, synthetic):
    straight = _model(synthetic.copy())
    _train(straight, tmp_path / "a")
    first = _model(synthetic.copy())
    _inject(first, at_call=4 * 4 + 2, fault=_interrupt)  # in epoch 4; checkpoint after epoch 3
    with pytest.warns(UserWarning, match="after 4 of 6 epochs"):
        _train(first, tmp_path / "b")
    resumed = _model(synthetic.copy())  # a fresh process would build the same model
    history = _train(resumed, tmp_path / "b", resume=True)
    for key, tensor in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[key], tensor), key
    np.testing.assert_array_equal(resumed.get_latent_representation(),
                                  straight.get_latent_representation())
    assert history.epoch == straight.history.epoch
    assert history.validation_elbo == straight.history.validation_elbo


def test_resume_without_a_checkpoint_is_rejected(tmp_path, synthetic):
    with pytest.raises(FileNotFoundError, match="No checkpoint to resume from"):
        _train(_model(synthetic), tmp_path / "none", resume=True)


def test_resume_with_other_settings_is_rejected(tmp_path, synthetic):
    _train(_model(synthetic.copy()), tmp_path)
    model = _model(synthetic.copy())
    with pytest.raises(ValueError,
                       match=r"written by a run with lr=0\.001; this call has lr=0\.01"):
        _train(model, tmp_path, resume=True, lr=0.01)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"resume": True}, "resume=True needs checkpoint_dir="),
    ({"checkpoint_every": 0}, "checkpoint_every must be an integer >= 1"),
])
def test_bad_checkpoint_arguments(kwargs, match, synthetic):
    with pytest.raises(ValueError, match=match):
        _model(synthetic).train(max_epochs=1, progress_bar=False, **kwargs)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_with_a_pickle_payload_is_refused_without_running_it(tmp_path, synthetic,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    _train(_model(synthetic.copy()), tmp_path)
    with open(tmp_path / "checkpoint.pt", "wb") as f:
        pickle.dump({"format": "omicvae_sc.checkpoint", "x": _Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match="not a readable omicvae_sc checkpoint"):
        _train(_model(synthetic.copy()), tmp_path, resume=True)
    assert not (tmp_path / "PWNED").exists()
