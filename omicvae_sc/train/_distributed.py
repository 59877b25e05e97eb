"""Training on several processes with ``torch.distributed``: one process per GPU (or per group
of CPU cores), on one machine or several, started by ``torchrun`` or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (``srun`` with those exported).

A :class:`Team` is this process's place in the job. With it, :func:`omicvae_sc.train.fit` takes
each optimizer step over the cells of all processes together: gradients are averaged by
``DistributedDataParallel`` (weighted so the step is that of the whole minibatch), random
draws are those of the whole minibatch and, with ``sync_batchnorm``, BatchNorm statistics
too (``module._parallel``; by default each process normalises by its own cells and the
running statistics are averaged every epoch), losses and validation sums are all-reduced,
so every process keeps the same history and takes the same early-stopping and
non-finite-loss decisions. Rank 0 alone writes checkpoints and shows bars.

A process that dies or hangs must not leave the others waiting forever. While training, every
process bumps a counter in the job's key-value store each ``HEARTBEAT_SECONDS`` and watches the
others' counters: a collective that fails is reported as :class:`RankLost` naming the ranks whose
counters stopped, and a process whose peer has been silent for ``timeout`` seconds stops itself
with that message (a collective on a hung peer may never return).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import inspect
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT = 300.0
"""Seconds a process may go unheard before the others stop (``train(dist_timeout=...)``)."""

HEARTBEAT_SECONDS = 1.0
"""How often each process signals that it is alive, and checks the others."""

LOST_EXIT_CODE = 75
"""Exit status of a process that stops itself because a peer went silent (EX_TEMPFAIL: run
again with ``resume=True``)."""


class RankLost(RuntimeError):
    """Another process of a distributed run died or hangs; the message names it."""


_GROUPS: dict[str, object] = {}  # process groups made here, by backend


def _backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def from_environment(device: torch.device, *, distributed: bool | None,
                     timeout: float = DEFAULT_TIMEOUT, sync_batchnorm: bool = False
                     ) -> Team | None:
    """This process's :class:`Team`, or ``None`` to train alone.

    ``distributed=None`` trains together when the launcher started several processes
    (``WORLD_SIZE`` above 1) or the caller has set up a process group of several; ``False``
    trains alone in every process; ``True`` requires a launcher, and takes the distributed
    path even for one process (to measure what it costs). The process group is set up
    here when the caller has not (NCCL for CUDA tensors, gloo for the CPU's).
    """
    if distributed is False:
        return None
    world_env = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if not dist.is_available():
        if distributed or world_env > 1:
            msg = "This torch was built without torch.distributed; train in one process."
            raise RuntimeError(msg)
        return None
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if not dist.is_initialized():
        if world_env <= 1 and not (distributed and launched):
            if distributed:
                msg = ("distributed=True, but this process was not started by torchrun (or "
                       "another launcher setting RANK and WORLD_SIZE). Start it with e.g. "
                       "`torchrun --nproc_per_node=2 script.py`.")
                raise ValueError(msg)
            return None
        _init_process_group(device, timeout)
    world = dist.get_world_size()
    if world <= 1 and not distributed:  # distributed=True: the path of many, on one
        return None
    return Team(rank=dist.get_rank(), world=world, group=_group_for(device), device=device,
                timeout=float(timeout), sync_batchnorm=sync_batchnorm)


def _init_process_group(device: torch.device, timeout: float) -> None:
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # small CPU tensors can still be reduced
    # the job's store (torchrun's agent, or rank 0's), under a name per torchrun attempt:
    # restarted processes otherwise meet at the addresses the failed attempt left there
    store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"omicvae_sc/attempt{attempt}/", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    atexit.register(_close)


def _close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _group_for(device: torch.device):
    """The default group when its backend takes tensors on ``device``, else a new one."""
    want = _backend_for(device)
    backend = str(dist.get_backend())
    if want in backend:
        return dist.group.WORLD
    if want not in _GROUPS:  # every process trains, so every process makes it
        _GROUPS[want] = dist.new_group(backend=want)
    return _GROUPS[want]


@dataclass
class Team:
    """This process's place among the ``world`` processes training one model."""

    rank: int
    world: int
    group: object
    device: torch.device
    timeout: float = DEFAULT_TIMEOUT
    sync_batchnorm: bool = False
    _watch: _Watch | None = field(default=None, repr=False)
    _writes: int = field(default=0, repr=False)

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0

    @property
    def batchnorm_group(self):
        """The group BatchNorm sums its statistics over (``None``: per process)."""
        return self.group if self.sync_batchnorm else None

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the processes, in place; returns it."""
        dist.all_reduce(t, group=self.group)
        return t

    def agree(self, **values: int | float) -> None:
        """Raise ``ValueError`` unless every process has the same ``values`` (the data's
        size, the settings): processes given other data would train different models."""
        mine = torch.tensor([_comparable(v) for v in values.values()], dtype=torch.float64,
                            device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        table = torch.stack(every).cpu()
        for j, name in enumerate(values):
            column = table[:, j].tolist()
            if len(set(column)) > 1:
                per_rank = ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(column))
                msg = (f"The {self.world} processes of this run do not agree on {name} "
                       f"({per_rank}). Every process must load the same data and call train() "
                       "with the same arguments.")
                raise ValueError(msg)

    def average_buffers(self, module: nn.Module) -> None:
        """Replace the BatchNorm running statistics by their mean over the processes (per
        process BatchNorm: ``sync_batchnorm=False``); those a query's model keeps frozen
        (the reference's) are left as they are."""
        frozen = set(getattr(module, "frozen_norms", ()))
        for name, buf in module.named_buffers():
            if buf.is_floating_point() and name.endswith(("running_mean", "running_var")) \
                    and name.rsplit(".", 1)[0] not in frozen:
                self.sum_(buf).div_(self.world)

    def gather_rows(self, local: torch.Tensor, n_total: int) -> torch.Tensor:
        """Every process's rows (its :meth:`part_of` ``n_total``), stacked in rank order."""
        size = -(-n_total // self.world)
        padded = local.new_zeros((size, *local.shape[1:]))
        padded[:len(local)] = local
        every = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(every, padded, group=self.group)
        parts = [every[r][:b - a] for r, (a, b) in enumerate(
            part_of(n_total, r, self.world) for r in range(self.world))]
        return torch.cat(parts)

    def leader_writes(self, write, what: str):
        """Run ``write()`` on rank 0 alone (files must be written once) and return its result
        there; the others wait for it to finish, watching that rank 0 lives, and get ``None``.
        A failure on rank 0 is an error on every process."""
        store = _heartbeat_store()
        if store is None:  # a process group without a store: a collective marks the end
            out = write() if self.leader else None
            self.sum_(torch.zeros(1, device=self.device))
            return out
        self._writes += 1
        key = f"written/{self._writes}"
        if self.leader:
            try:
                out = write()
            except BaseException:
                store.set(key, "failed")
                raise
            store.set(key, "done")
            return out
        with self.watch(None):
            store.wait([key], timedelta(days=30))  # a large write takes what it takes
        if store.get(key) != b"done":
            msg = f"Rank 0 failed to write {what}; its error says why."
            raise RuntimeError(msg)
        return None

    def wrap(self, module: nn.Module, *, find_unused: bool) -> nn.Module:
        """``module`` in ``DistributedDataParallel``: its gradients averaged in backward (the
        weights of rank 0 given to every process first)."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index if self.device.index is not None else 0] \
            if self.device.type == "cuda" else None
        # buffers: rank 0's at the start, then BatchNorm's statistics are summed in forward
        # (or averaged per epoch), not broadcast from rank 0 before every step
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        buffers = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
        # gradients in the buckets themselves: no copy in and out of them every step
        return DistributedDataParallel(module, device_ids=ids, process_group=self.group,
                                       find_unused_parameters=find_unused,
                                       gradient_as_bucket_view=True, **buffers)

    @contextlib.contextmanager
    def watch(self, checkpoint_dir: Path | None) -> Iterator[None]:
        """Inside the block, peers that die or hang are detected (see the module's docstring):
        a ``RuntimeError`` raised in the block while a peer is silent becomes
        :class:`RankLost`."""
        store = _heartbeat_store()
        if store is None:
            yield
            return
        self._watch = _Watch(self, store, checkpoint_dir)
        self._watch.start()
        try:
            yield
        except RuntimeError as err:
            lost = self._watch.silent_ranks(3 * HEARTBEAT_SECONDS)
            if lost:
                raise RankLost(self._watch.message(lost)) from err
            raise
        finally:
            self._watch.stop()
            self._watch = None


def _comparable(value: int | float) -> float:
    """``value`` as a float64 that differs whenever two values differ: integers beyond 2^53
    (a seed from ``secrets.randbits``) are compared through a 52-bit digest."""
    if isinstance(value, int) and abs(value) >= 2**53:
        digest = hashlib.sha256(str(value).encode()).digest()
        return float(int.from_bytes(digest[:7], "little") >> 4) + 2.0**53  # apart from small
    return float(value)


def part_of(n: int, rank: int, world: int) -> tuple[int, int]:
    """The rows ``a:b`` of ``n`` that process ``rank`` of ``world`` computes outputs for."""
    return n * rank // world, n * (rank + 1) // world


def _heartbeat_store():
    """The job's key-value store (the one the process group met through), or ``None``."""
    try:
        store = dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None
    return dist.PrefixStore("omicvae_sc/alive/", store)


class _Watch:
    """The heartbeat thread of :meth:`Team.watch`."""

    def __init__(self, team: Team, store, checkpoint_dir: Path | None):
        self.team, self.store, self.checkpoint_dir = team, store, checkpoint_dir
        self.peers = [r for r in range(team.world) if r != team.rank]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="omicvae-heartbeat",
                                        daemon=True)

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        self.store.add(str(self.team.rank), 1)

    def _counts(self) -> list[int]:
        return [self.store.add(str(r), 0) for r in self.peers]

    def silent_ranks(self, wait: float) -> list[int]:
        """Peers whose counter does not move within ``wait`` seconds (all of them when the
        store itself is gone)."""
        try:
            before = self._counts()
            time.sleep(wait)
            after = self._counts()
        except (RuntimeError, OSError):  # the store is gone with the process that held it
            return [0] if self.team.rank != 0 else self.peers
        return [r for r, a, b in zip(self.peers, before, after, strict=True) if a == b]

    def message(self, lost: list[int], silent_for: float | None = None) -> str:
        names = ", ".join(map(str, lost))
        which = f"rank {names}" if len(lost) == 1 else f"ranks {names}"
        since = "" if silent_for is None else f" (silent for {silent_for:.0f} s)"
        if self.checkpoint_dir is not None:
            after = (f"The last checkpoint in {self.checkpoint_dir} is intact: run the job "
                     "again with train(..., resume=True) to continue from it.")
        else:
            after = ("No checkpoint was written (checkpoint_dir=None): a new run starts from "
                     "the beginning; pass checkpoint_dir= to be able to resume.")
        return (f"Distributed training stopped on rank {self.team.rank} of {self.team.world}: "
                f"{which} stopped responding{since}; its process died or hangs. {after}")

    def _run(self) -> None:
        now = time.monotonic()
        last_change = dict.fromkeys(self.peers, now)
        try:
            seen = self._counts()
        except (RuntimeError, OSError):
            seen = [0] * len(self.peers)
        store_down_since = None
        limit = self.team.timeout + 2 * HEARTBEAT_SECONDS  # the collective's own timeout first
        while not self._stop.wait(HEARTBEAT_SECONDS):
            now = time.monotonic()
            try:
                self._beat()
                counts = self._counts()
                store_down_since = None
            except (RuntimeError, OSError):
                store_down_since = store_down_since or now
                if now - store_down_since > limit:
                    self._abort([0] if self.team.rank else self.peers, now - store_down_since)
                continue
            for r, old, new in zip(self.peers, seen, counts, strict=True):
                if new != old:
                    last_change[r] = now
            seen = counts
            silent = [r for r in self.peers if now - last_change[r] > limit]
            if silent:
                self._abort(silent, max(now - last_change[r] for r in silent))

    def _abort(self, lost: list[int], silent_for: float) -> None:
        """A peer is gone and this process may be stuck in a collective with it: say so and
        exit (a thread cannot interrupt the wait)."""
        sys.stderr.write(f"\nomicvae_sc: {self.message(lost, silent_for)}\n")
        sys.stderr.flush()
        os._exit(LOST_EXIT_CODE)
