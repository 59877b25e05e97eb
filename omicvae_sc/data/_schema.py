"""The results schema: every key a fit writes into an AnnData, defined once.

:data:`FIELDS` lists what ``OmicVAE.write_results`` / ``tl.omicvae`` may add (attribute, name,
content, when); :class:`ResultsRecord` is the typed form of ``uns['<key_added>']``, written with
a schema version and read back by ``pl``, the command line and the tests only through
:meth:`ResultsRecord.read`. The README's "What is written where" table lists the same fields
(a test compares them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from anndata import AnnData

SCHEMA_VERSION = 1
"""Layout version of ``uns['<key_added>']`` (files written before it was recorded are 1)."""


@dataclass(frozen=True)
class Field:
    """One key a fit writes: ``attribute`` of the AnnData and the name's ``suffix``."""

    attribute: str  # "obsm", "obs", "layers", "var" or "uns"
    suffix: str  # the part after "<key_added>_" ("X_<key_added>" for the latent)
    content: str
    written: str = "always"  # or the argument that turns it on or off

    def name(self, key_added: str) -> str:
        """The key under ``key_added``, e.g. ``obs['omicvae_log_likelihood']``."""
        if self.attribute == "obsm":
            return f"X_{key_added}"
        if self.attribute == "uns":
            return key_added
        return f"{key_added}_{self.suffix}"


FIELDS = (
    Field("obsm", "latent", "posterior mean of the latent state, cells x n_latent"),
    Field("obs", "log_likelihood", "importance-weighted log p(x) per cell, nats"),
    Field("obs", "rate", "KL(q(z|x) || N(0, I)) per cell, nats"),
    Field("obs", "distortion", "E_q[-log p(x|z)] per cell, nats"),
    Field("obs", "anomaly_score", "predictive z-score of the cell's counts", "anomaly"),
    Field("obs", "is_anomaly", "the anomaly rule's flag", "anomaly"),
    Field("obs", "doublet_score", "posterior doublet probability", "doublets"),
    Field("obs", "is_doublet", "the doublet rule's flag", "doublets"),
    Field("layers", "denoised", "expected counts at each cell's own depth", "layers"),
    Field("var", "genes", "the genes the model was fitted on", "n_top_genes"),
    Field("uns", "", "the ResultsRecord: params, setup, history, diagnostics, flag rules"),
)


def field(attribute: str, suffix: str) -> Field:
    """The field of ``attribute`` with ``suffix`` (a ``KeyError`` for one not in the schema)."""
    for f in FIELDS:
        if f.attribute == attribute and f.suffix == suffix:
            return f
    msg = f"{attribute}[...{suffix}] is not in the results schema."
    raise KeyError(msg)


def obs_key(key_added: str, suffix: str) -> str:
    """The ``obs`` column of ``suffix`` under ``key_added``, e.g. ``omicvae_doublet_score``."""
    return field("obs", suffix).name(key_added)


@dataclass(frozen=True)
class ResultsRecord:
    """``uns['<key_added>']``: what the fit was and what it found, as plain values.

    ``params`` (hyperparameters, importance samples, device), ``setup`` (layer, covariates,
    categories), ``history`` (``History.to_dict()``), ``latent_diagnostics``
    (``LatentDiagnostics.to_dict()``) and, when scored, ``anomaly`` / ``doublet``: the flag
    rule, its value, the threshold and the number of cells flagged.
    """

    params: dict
    setup: dict
    history: dict
    latent_diagnostics: dict | None = None
    anomaly: dict | None = None
    doublet: dict | None = None
    schema_version: int = SCHEMA_VERSION

    def to_uns(self) -> dict:
        """The plain, h5ad-writable dict stored in ``uns`` (absent entries left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_uns(cls, entry: dict) -> ResultsRecord:
        """Inverse of :meth:`to_uns`; refuses a layout newer than this package knows."""
        version = int(entry.get("schema_version", 1))
        if version > SCHEMA_VERSION:
            msg = (f"These results have schema version {version}; this omicvae_sc reads up to "
                   f"{SCHEMA_VERSION}. Update omicvae_sc to read them.")
            raise ValueError(msg)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in entry.items() if k in names} | {"schema_version": version})

    @classmethod
    def read(cls, adata: AnnData, key: str = "omicvae") -> ResultsRecord:
        """The record in ``adata.uns[key]``, or a ``KeyError`` that says how to make one."""
        entry = adata.uns.get(key)
        if not isinstance(entry, dict) or "history" not in entry:
            msg = (f"adata.uns[{key!r}] holds no omicvae results; run ov.tl.omicvae(adata, "
                   f"key_added={key!r}) (or model.write_results(adata)) first.")
            raise KeyError(msg)
        return cls.from_uns(entry)

    def flag_rule(self, kind: str) -> dict | None:
        """The ``"anomaly"`` or ``"doublet"`` flag rule, or ``None`` when not scored."""
        return {"anomaly": self.anomaly, "doublet": self.doublet}[kind]
