"""Per-epoch training history: ELBO, rate, distortion, KL weight and time."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class History:
    """What training recorded, one entry per epoch.

    ELBO, rate and distortion are per-cell averages in nats (ELBO = -(distortion + rate)).
    Validation entries are NaN when training had no validation split.
    """

    epoch: tuple[int, ...] = ()
    train_elbo: tuple[float, ...] = ()
    train_rate: tuple[float, ...] = ()
    train_distortion: tuple[float, ...] = ()
    validation_elbo: tuple[float, ...] = ()
    validation_rate: tuple[float, ...] = ()
    validation_distortion: tuple[float, ...] = ()
    kl_weight: tuple[float, ...] = ()
    seconds: tuple[float, ...] = ()
    stopped_early: bool = False
    best_epoch: int = -1
    interrupted: bool = False  # ended by Ctrl-C (KeyboardInterrupt)

    def to_dict(self) -> dict:
        """Plain, h5ad-serializable dict of numpy arrays and scalars."""
        out = {}
        for key, value in asdict(self).items():
            out[key] = np.asarray(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> History:
        """Inverse of :meth:`to_dict` (accepts lists or arrays)."""
        kwargs = {}
        for name in cls.__dataclass_fields__:
            if name not in d:
                continue
            value = d[name]
            if name in ("stopped_early", "interrupted"):
                kwargs[name] = bool(value)
            elif name == "best_epoch":
                kwargs[name] = int(value)
            else:
                cast = int if name == "epoch" else float
                kwargs[name] = tuple(cast(v) for v in np.asarray(value).ravel())
        return cls(**kwargs)

    def __len__(self) -> int:
        return len(self.epoch)

    def concat(self, other: History) -> History:
        """This history followed by ``other`` (training continued)."""
        merged = {}
        for name in self.__dataclass_fields__:
            a, b = getattr(self, name), getattr(other, name)
            merged[name] = a + b if isinstance(a, tuple) else b
        return History(**merged)
