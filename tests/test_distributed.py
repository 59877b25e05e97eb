"""Training on several processes: real ``torchrun`` launches of two CPU processes (gloo), each
running ``tests/distributed_worker.py`` as a user's script would, against one process.

What must hold: two processes at batch B take the steps of one at 2B (same seed, float
tolerance), whether the model is in memory or streamed from disk they agree on every weight,
each reads disjoint cells, and every wrong set-up is a clear error.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

import omicvae_sc as ov
from omicvae_sc.data import BlockStream, CountTensors, RankPart, RowReader
from omicvae_sc.data._loader import shared_bounds
from omicvae_sc.model._results import LOG_LIKELIHOOD_SAMPLES

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun(out: Path, *args: str, nproc: int = 2, timeout: float = 300
             ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(WORKER), "--out", str(out), *args]
    return subprocess.run(cmd, env=worker_env(), capture_output=True, text=True,
                          timeout=timeout)


def alone(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(WORKER), "--out", str(out), *args]
    return subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300)


def ok(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def weights(npz) -> dict[str, np.ndarray]:
    return {k: npz[k] for k in npz.files if k.startswith("w.")}


@pytest.mark.parametrize("args", [
    # dropout, a validation split with early stopping, minibatches of 2 x 64 = 128
    ("--cells", "600", "--early-stopping", "--sync-batchnorm"),
    # Poisson has a parameter without gradient (no dispersion); 550 training cells leave a
    # last step of 38 cells, 19 a process
    ("--cells", "611", "--likelihood", "poisson", "--sync-batchnorm"),
], ids=["zinb", "poisson-uneven-tail"])
def test_two_processes_at_batch_b_take_the_steps_of_one_at_2b(tmp_path, args):
    """With BatchNorm statistics summed over the processes (sync_batchnorm=True)."""
    ok(torchrun(tmp_path / "two", *args, "--batch-size", "64"))
    ok(alone(tmp_path / "one", *args, "--batch-size", "128"))
    r0, r1 = (np.load(tmp_path / "two" / f"rank{r}.npz") for r in (0, 1))
    one = np.load(tmp_path / "one" / "rank0.npz")
    w0, w1, w = weights(r0), weights(r1), weights(one)
    for name in w:
        np.testing.assert_array_equal(w0[name], w1[name], err_msg=name)  # ranks agree exactly
        np.testing.assert_allclose(w0[name], w[name], rtol=1e-4, atol=2e-5, err_msg=name)
    for key in ("h.train_elbo", "h.validation_elbo"):
        np.testing.assert_allclose(r0[key], one[key], rtol=1e-6)
    assert len(one["h.train_elbo"]) == 3
    np.testing.assert_allclose(r0["latent"], one["latent"], atol=1e-4)


def test_per_process_batchnorm_is_the_default_and_changes_the_steps(tmp_path):
    """sync_batchnorm=False (the default): each process normalises by its own cells (so the
    steps are not one process's at 2B) and the running statistics are averaged: the ranks
    still agree."""
    ok(torchrun(tmp_path / "two", "--batch-size", "64"))
    ok(alone(tmp_path / "one", "--batch-size", "128"))
    r0, r1 = (np.load(tmp_path / "two" / f"rank{r}.npz") for r in (0, 1))
    one = np.load(tmp_path / "one" / "rank0.npz")
    for name, value in weights(r0).items():
        np.testing.assert_array_equal(value, r1[name], err_msg=name)
    differ = np.abs(r0["w.encoder.body.net.0.weight"] - one["w.encoder.body.net.0.weight"])
    assert differ.max() > 1e-4
    # the same model all the same: the ELBOs are close
    np.testing.assert_allclose(r0["h.train_elbo"], one["h.train_elbo"], rtol=0.01)


def test_two_processes_stream_one_file_and_agree(tmp_path):
    path = tmp_path / "cells.h5ad"
    ov.datasets.synthetic_counts(3000, 60, seed=1).write_h5ad(path)
    args = ("--h5ad", str(path), "--block-rows", "256", "--epochs", "4")
    ok(torchrun(tmp_path / "two", *args, "--batch-size", "64"))
    ok(alone(tmp_path / "one", *args, "--batch-size", "128"))
    r0, r1 = (np.load(tmp_path / "two" / f"rank{r}.npz") for r in (0, 1))
    one = np.load(tmp_path / "one" / "rank0.npz")
    for name, value in weights(r0).items():
        np.testing.assert_array_equal(value, r1[name], err_msg=name)
    # other cells in each step than one process's, the same learning: within 1 nat a cell
    assert abs(r0["h.validation_elbo"][-1] - one["h.validation_elbo"][-1]) < 1.0
    assert r0["h.validation_elbo"][-1] > r0["h.validation_elbo"][0] + 10


def _served(source, batch_size, rank, world, **kwargs):
    """Cell ids (their covariate 'code') and shares of each step of one process."""
    steps = []
    for share, _x, codes in source.part_batches(batch_size, rank=rank, world=world, **kwargs):
        steps.append((share, codes[:, 0].numpy().copy()))
    return steps


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_each_process_reads_disjoint_cells_every_cell_once_in_equal_steps(tmp_path, where):
    adata = ov.datasets.synthetic_counts(1000, 20, seed=3)
    ids = np.arange(adata.n_obs)[:, None]
    if where == "memory":
        source = CountTensors(adata.X, ids)
    else:
        adata.write_h5ad(tmp_path / "a.h5ad")
        disk = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
        reader = RowReader(disk.X, "adata.X", disk.obs_names)
        source = BlockStream(reader, ids, block_rows=100, buffer_blocks=2,
                             cells=np.arange(1000) % 7 != 0)  # a training split
    world, gen_seed = 3, 5
    parts = [_served(source, 32, r, world, shuffle=True,
                     generator=torch.Generator().manual_seed(gen_seed)) for r in range(world)]
    n_steps = len(shared_bounds(source.n_cells, 32, world)) - 1
    assert [len(p) for p in parts] == [n_steps] * world  # nobody waits at an uneven tail
    cells = np.concatenate([c for p in parts for _, c in p])
    assert len(cells) == source.n_cells == len(np.unique(cells))  # disjoint, complete
    for step in range(n_steps):
        shares = [parts[r][step][0] for r in range(world)]
        sizes = [len(parts[r][step][1]) for r in range(world)]
        assert all(s >= 2 for s in sizes)
        assert [s[0] for s in shares] == list(np.cumsum([0, *sizes[:-1]]))
        assert {s[1] for s in shares} == {sum(sizes)}
    if where == "memory":  # the steps are exactly one process's minibatches at 3 x 32
        whole = [codes[:, 0].numpy() for _, codes in source.batches(
            96, shuffle=True, generator=torch.Generator().manual_seed(gen_seed))]
        joined = [np.concatenate([parts[r][s][1] for r in range(world)])
                  for s in range(n_steps)]
        assert all(np.array_equal(a, b) for a, b in zip(whole, joined, strict=True))
    else:  # blocks are not split between processes
        blocks = [{int(cell) // 100 for _, cells in parts[r] for cell in cells}
                  for r in range(world)]
        assert not (blocks[0] & blocks[1]) and not (blocks[1] & blocks[2])


def test_too_few_cells_or_blocks_for_the_processes_are_errors(tmp_path):
    adata = ov.datasets.synthetic_counts(5, 10, seed=0)
    with pytest.raises(ValueError, match="3 processes need at least 6 cells"):
        RankPart(CountTensors(adata.X, None), 0, 3)
    big = ov.datasets.synthetic_counts(300, 10, seed=0)
    big.write_h5ad(tmp_path / "b.h5ad")
    disk = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    stream = BlockStream(RowReader(disk.X, "adata.X", disk.obs_names), None, block_rows=200)
    with pytest.raises(ValueError, match=r"3 processes need at least 3 blocks.*fill 2 of "
                                         r"block_rows=200"):
        next(RankPart(stream, 0, 3).batches(16, shuffle=True))


def test_distributed_true_outside_a_launcher_is_an_error(adata_fingerprint):
    adata = ov.datasets.synthetic_counts(100, 20, seed=0)
    ov.OmicVAE.setup_anndata(adata)
    model = ov.OmicVAE(adata, device="cpu")
    before = adata_fingerprint(adata)
    with pytest.raises(ValueError, match="not started by torchrun"):
        model.train(max_epochs=1, distributed=True, progress_bar=False)
    with pytest.raises(ValueError, match="dist_timeout must be a positive"):
        model.train(max_epochs=1, dist_timeout=0, progress_bar=False)
    assert adata_fingerprint(adata) == before
    assert not model.is_trained


def test_processes_given_different_data_stop_with_an_error_naming_it(tmp_path):
    run = torchrun(tmp_path / "out", "--cells-plus-rank")
    assert run.returncode != 0
    assert "do not agree on cells (rank 0: 600, rank 1: 601)" in run.stderr


# ---------------------------------------------------------------------------- faults
def launch(out: Path, *args: str, world: int = 2) -> list[subprocess.Popen]:
    """``world`` processes started as a launcher without torchrun would (srun, a script):
    rank 0 holds the key-value store."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = worker_env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                              "RANK": str(rank), "LOCAL_RANK": str(rank),
                              "WORLD_SIZE": str(world)}
        procs.append(subprocess.Popen(
            [sys.executable, str(WORKER), "--out", str(out), *args], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def wait_for(path: Path, procs: list[subprocess.Popen], limit: float = 120) -> None:
    start = time.monotonic()
    while not path.exists():
        assert all(p.poll() is None for p in procs), "a process ended before the checkpoint"
        assert time.monotonic() - start < limit, f"no {path} after {limit} s"
        time.sleep(0.05)


FAULT_RUN = ("--cells", "12000", "--epochs", "4", "--timeout", "8")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_lost_process_stops_the_other_with_an_error_naming_it(tmp_path, sig):
    """Killed mid-epoch, the peer's collective fails and the survivor names the lost rank
    (RankLost); stopped (hung), the survivor's heartbeat watch ends it within the timeout."""
    procs = launch(tmp_path / "out", *FAULT_RUN, "--checkpoint-dir", str(tmp_path / "ck"))
    try:
        wait_for(tmp_path / "ck" / "checkpoint.pt", procs)
        time.sleep(0.3)  # into the next epoch
        os.kill(procs[1].pid, sig)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == (75 if sig == signal.SIGSTOP else 1), err[-2000:]
    assert "stopped on rank 0 of 2: rank 1 stopped responding" in err
    assert f"The last checkpoint in {tmp_path / 'ck'} is intact" in err
    assert took < 8 + 6  # the timeout, two heartbeats and some slack
    assert not (tmp_path / "out" / "rank0.npz").exists()


def test_a_run_killed_mid_epoch_resumes_from_its_checkpoint_to_the_same_end(tmp_path):
    ck = ("--checkpoint-dir", str(tmp_path / "ck"))
    procs = launch(tmp_path / "cut", *FAULT_RUN, *ck)
    try:
        wait_for(tmp_path / "ck" / "checkpoint.pt", procs)
        time.sleep(0.3)
        procs[1].kill()
        procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode != 0
    shutil.copytree(tmp_path / "ck", tmp_path / "ck_alone")
    cut_at = len(torch.load(tmp_path / "ck" / "checkpoint.pt", weights_only=True)["rows"]["epoch"])
    resumed = launch(tmp_path / "resumed", *FAULT_RUN, *ck, "--resume")
    whole = launch(tmp_path / "whole", *FAULT_RUN, "--checkpoint-dir", str(tmp_path / "ck2"))
    for p in resumed + whole:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    a, b = np.load(tmp_path / "resumed" / "rank0.npz"), np.load(tmp_path / "whole" / "rank0.npz")
    assert len(a["h.train_elbo"]) == 4
    for name, value in weights(a).items():
        np.testing.assert_allclose(value, b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # the same checkpoint on one process: twice the steps an epoch from there on
    ok(alone(tmp_path / "alone", *FAULT_RUN, "--checkpoint-dir", str(tmp_path / "ck_alone"),
             "--resume"))
    one = np.load(tmp_path / "alone" / "rank0.npz")
    assert 1 <= cut_at < 4 and len(one["h.train_elbo"]) == 4
    np.testing.assert_array_equal(one["h.train_elbo"][:cut_at], a["h.train_elbo"][:cut_at])
    assert one["h.train_elbo"][-1] > one["h.train_elbo"][cut_at - 1]  # it went on learning


def test_torchrun_restarts_a_failed_job_and_it_resumes_by_itself(tmp_path):
    """`torchrun --max-restarts=1` with train(resume="auto"): a killed process makes torchrun
    stop and restart both, and the restarted job continues from the checkpoint."""
    out, ck = tmp_path / "out", tmp_path / "ck"
    # one store for both attempts: the restarted processes must not meet at the addresses
    # the failed attempt left in it (train sets up its process group per attempt)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--max-restarts=1", f"--master_port={free_port()}", str(WORKER), "--out", str(out),
           *FAULT_RUN, "--checkpoint-dir", str(ck), "--resume", "auto"]
    job = subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ck / "checkpoint.pt", [job])
        time.sleep(0.3)
        os.kill(int((out / "pid1-0.txt").read_text()), signal.SIGKILL)
        _, err = job.communicate(timeout=300)
    finally:
        job.kill()
        job.wait()
    assert job.returncode == 0, err[-3000:]
    assert (out / "pid1-1.txt").exists()  # a second attempt ran
    assert len(np.load(out / "rank0.npz")["h.train_elbo"]) == 4


def test_a_non_finite_loss_on_one_process_rolls_every_process_back_together(tmp_path):
    """Rank 1's loss becomes NaN at step 7 (epoch 1, step 2 of 5): both processes stop with
    the same error and keep the weights from before that step (and, each process having
    its own BatchNorm statistics, the mean of theirs)."""
    ok(torchrun(tmp_path / "out", "--cells", "600", "--validation-fraction", "0",
                "--nan-at-step", "7", "--nan-rank", "1"))
    r0, r1 = (np.load(tmp_path / "out" / f"rank{r}.npz") for r in (0, 1))
    assert str(r0["diverged"]) == str(r1["diverged"])
    assert "loss became nan at epoch 1, step 2 of that epoch" in str(r0["diverged"])
    for name, value in weights(r0).items():
        before = [r[f"before.{name[2:]}"] for r in (r0, r1)]
        if name.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(value, (before[0] + before[1]) / 2, rtol=1e-6)
        else:
            np.testing.assert_array_equal(value, before[0], err_msg=name)
    for name, value in weights(r0).items():
        np.testing.assert_array_equal(value, r1[name], err_msg=name)


def test_outputs_after_distributed_training_are_shared_out_and_gathered_in_cell_order(
        tmp_path):
    """ov.tl.omicvae under torchrun: each process scores its part of the cells and every
    process writes every cell's results, equal to what the saved model gives in one process;
    rank 0 alone saves the model and the denoised store, which both processes read."""
    ok(torchrun(tmp_path / "out", "--tl", "--cells", "600", "--epochs", "5"))
    r0, r1 = (np.load(tmp_path / "out" / f"rank{r}.npz", allow_pickle=True) for r in (0, 1))
    for key in r0.files:
        np.testing.assert_array_equal(r0[key], r1[key], err_msg=key)
    adata = ov.datasets.synthetic_counts(600, 60, seed=1)
    model = ov.OmicVAE.load(tmp_path / "out" / "model", adata, device="cpu")
    torch.set_num_threads(1)  # as in the workers: the same sums to the last bit
    np.testing.assert_allclose(r0["latent"], model.get_latent_representation(), atol=1e-5)
    np.testing.assert_allclose(r0["denoised"], model.get_normalized_expression(
        library_size="observed"), rtol=1e-4, atol=1e-5)
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert written == {"model", "denoised.zarr", "rank0.npz", "rank1.npz", "pid0-0.txt",
                       "pid1-0.txt"}  # one store, one model, no temporary left
    # Monte Carlo estimates: other draws (each process draws for its own part), the same
    # values up to their noise
    log_px = model.get_marginal_ll(n_samples=LOG_LIKELIHOOD_SAMPLES)
    for half in (slice(0, 300), slice(300, None)):
        ours = r0["omicvae_log_likelihood"][half]
        assert abs(ours.mean() - log_px[half].mean()) < 0.5
        assert np.corrcoef(ours, log_px[half])[0, 1] > 0.98
    # as close to one process's anomaly scores as one process's at another seed (0.77 here:
    # a model of 5 epochs)
    alone_0, alone_1 = model.get_anomaly_score(seed=0), model.get_anomaly_score(seed=1)
    between_seeds = np.corrcoef(alone_0, alone_1)[0, 1]
    assert np.corrcoef(r0["omicvae_anomaly_score"], alone_0)[0, 1] > 0.9 * between_seeds


def test_the_command_line_runs_under_torchrun_and_rank_0_writes_the_output(tmp_path):
    ov.datasets.synthetic_counts(400, 40, seed=2).write_h5ad(tmp_path / "in.h5ad")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "omicvae_sc.cli", "fit",
           str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "out.h5ad"), "--layer", "counts",
           "--epochs", "3", "--no-progress", "--no-doublets"]
    ok(subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300))
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["X_omicvae"].shape == (400, 10)
    assert np.isfinite(out.obs["omicvae_anomaly_score"]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "out.h5ad"]  # one file


def test_the_readmes_training_script_runs_under_torchrun(tmp_path):
    """The README's train_atlas.py, as pasted, on two processes: a model saved once, a
    checkpoint, and the same script restarted continues from that checkpoint."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    script = next(b for b in re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.M)
                  if b.startswith("# train_atlas.py"))
    (tmp_path / "train_atlas.py").write_text(script)
    ov.datasets.synthetic_counts(600, 60, n_batches=2, seed=0).write_h5ad(tmp_path / "cells.h5ad")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "train_atlas.py"]
    for _ in range(2):  # the second run finds the finished run's checkpoint and resumes it
        ok(subprocess.run(cmd, env=worker_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300))
    model = ov.OmicVAE.load(tmp_path / "atlas_model", ad.read_h5ad(tmp_path / "cells.h5ad"))
    assert model.is_trained and len(model.history) == 10
    assert (tmp_path / "checkpoints" / "checkpoint.pt").is_file()


def test_values_compared_across_processes_stay_apart_beyond_float_precision():
    from omicvae_sc.train._distributed import _comparable

    big = 2**60
    assert float(big) == float(big + 1)  # what a plain float64 comparison would miss
    assert _comparable(big) != _comparable(big + 1)
    assert _comparable(big) == _comparable(big)
    assert _comparable(12345) == 12345.0 and _comparable(0.25) == 0.25
