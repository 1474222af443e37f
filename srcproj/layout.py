"""The store layout: the one place that names, creates and inspects a store's arrays.

Layout (``c`` a checkpoint in training order, ``l`` a segment)::

    zarr.json                      what the store was made for (checked on every reopen),
                                   and the inputs each stage was computed with
    features/ckpt_{c}              (N_l, k) training features, float16 by default
    features/ckpt_{c}_scale        (N_l,) float16 features only: each row's power-of-two scale
    features/ckpt_{c}_done         (n_chunks,) which row chunks are durably written
    hessians/ckpt_{c}              (k, k) float64 projected Gauss-Newton Hessian
    hessians/done                  (n_checkpoints,)
    hessians/ckpt_{c}_parts        (n_chunks, k, k) float64 sum over each row chunk, while the
                                   Hessian is being computed (deleted once it is written)
    hessians/ckpt_{c}_counts       (n_chunks,) examples in each part
    hessians/ckpt_{c}_parts_done   (n_chunks,)
    segments/seg_{l}/eigenvalues   (k,) of the segment's mean Hessian + wd·I
    segments/seg_{l}/eigenvectors  (k, k)
    segments/done                  (n_segments,)
    caches/seg_{l}                 (N_l, k) Ḡ_l W_lᵀ, float32 (float64 with float64 features)
    caches/seg_{l}_done            (n_chunks,)
    caches/{key}/seg_{l}           the caches of another counterfactual setting (e.g. key
    caches/{key}/seg_{l}_done      "same_epochs_0.5"), for the segments of its attributed data set
    query/ckpt_{c}                 the bytes of a query checkpoint's state (the last stage's)
    query/done                     (n_checkpoints,)
    preconditioner/seg_{l}_scale   (p,) float32 (as the caches) M^{1/2} of the optimizer's preconditioner over the
                                   attributed parameters (runs that have one: Adam, SGD groups
                                   with different learning rates)
    preconditioner/seg_{l}_moment  (p,) float32 (as the caches) Adam's bias-corrected second moment v̄
    preconditioner/done            (n_segments,)

Every unit of work (a row chunk, a checkpoint's Hessian, a segment's spectrum) is written
first and flagged after, so a killed job leaves each unit finished or redone. A stage's
partial results would be stored the same way: an array plus its flags.

**Stage inputs.** Beside the metadata that identifies the store (model, checkpoints,
data, projection: a change is refused), the store records the inputs of the stages that
may be recomputed in place: the spectra depend on the weight decay, the caches on the
segments' times (steps, learning rates, momentum) and sizes. When a store is reopened
with other stage inputs, :meth:`StoreLayout.reconcile` clears the flags of the stage
that changed and of every stage after it, then records the new inputs; the next
featurize recomputes exactly those. The caches of a counterfactual setting other than
same steps (:class:`~srcproj.counterfactual.Counterfactual`) record their own segment
times under ``caches/{key}``; several settings live side by side, and a change of any
stage (weight decay, features, the trajectory's times) clears every setting's caches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from .errors import StoreError
from .store import AttributionStore, metadata_differences

__all__ = ["STAGES", "StoreLayout", "decode_float16_rows", "encode_float16_rows", "features", "feature_scale",
           "features_done", "hessian", "hessian_counts", "hessian_parts", "hessian_parts_done", "HESSIANS_DONE",
           "eigenvalues",
           "eigenvectors", "SPECTRA_DONE", "cache", "cache_done", "query_checkpoint", "QUERY_DONE", "setting_stage",
           "PRECONDITIONER_DONE", "preconditioner_scale", "preconditioner_moment"]

#: The stages of featurization, in order; a stage depends on every stage before it.
STAGES = ("features", "hessians", "spectra", "caches")
#: Attribute of the store's group that holds the recorded inputs of each stage.
STAGE_INPUTS = "srcproj_stage_inputs"

HESSIANS_DONE = "hessians/done"
SPECTRA_DONE = "segments/done"
QUERY_DONE = "query/done"
_QUERY_CHUNK_BYTES = 16 << 20


def features(checkpoint: int) -> str:
    return f"features/ckpt_{checkpoint}"


def feature_scale(checkpoint: int) -> str:
    return f"features/ckpt_{checkpoint}_scale"


def features_done(checkpoint: int) -> str:
    return f"features/ckpt_{checkpoint}_done"


def hessian(checkpoint: int) -> str:
    return f"hessians/ckpt_{checkpoint}"


def hessian_parts(checkpoint: int) -> str:
    return f"hessians/ckpt_{checkpoint}_parts"


def hessian_counts(checkpoint: int) -> str:
    return f"hessians/ckpt_{checkpoint}_counts"


def hessian_parts_done(checkpoint: int) -> str:
    return f"hessians/ckpt_{checkpoint}_parts_done"


def eigenvalues(segment: int) -> str:
    return f"segments/seg_{segment}/eigenvalues"


def eigenvectors(segment: int) -> str:
    return f"segments/seg_{segment}/eigenvectors"


#: The counterfactual setting whose caches are the store's own (``caches/seg_{l}``).
DEFAULT_SETTING = "same_steps"
_SETTING_PREFIX = "caches/"


def _cache_folder(setting: str | None) -> str:
    return "caches" if setting in (None, DEFAULT_SETTING) else f"caches/{setting}"


def cache(segment: int, setting: str | None = None) -> str:
    """A segment's cache; of a counterfactual setting's key other than same steps, beside them."""
    return f"{_cache_folder(setting)}/seg_{segment}"


def cache_done(segment: int, setting: str | None = None) -> str:
    return f"{_cache_folder(setting)}/seg_{segment}_done"


def setting_stage(setting: str) -> str:
    """The stage-inputs entry that records a (non-default) setting's cache inputs."""
    return f"{_SETTING_PREFIX}{setting}"


def _is_setting_stage(name: str) -> bool:
    return name.startswith(_SETTING_PREFIX)


PRECONDITIONER_DONE = "preconditioner/done"


def preconditioner_scale(segment: int) -> str:
    return f"preconditioner/seg_{segment}_scale"


def preconditioner_moment(segment: int) -> str:
    return f"preconditioner/seg_{segment}_moment"


def query_checkpoint(checkpoint: int) -> str:
    return f"query/ckpt_{checkpoint}"


# float16 rows are stored divided by a power of two that brings their largest entry into
# [2^14, 2^15): every row keeps float16's relative precision (about 5e-4), whatever its
# magnitude, instead of sinking into float16's subnormals below 6e-5 (a well-fit example's
# gradient) or overflowing above 65504. Powers of two make the scaling itself exact.
_FLOAT16_TOP_EXPONENT = 15
_FLOAT32_EXPONENTS = (-149, 127)


def encode_float16_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(float16 rows, float32 power-of-two scales)`` with ``rows ≈ stored * scale[:, None]``.

    Raises :class:`StoreError` when a row's magnitude is beyond float32's exponents.
    """
    rows = np.asarray(rows, dtype=np.float64)
    peak = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
    _, exponent = np.frexp(peak)  # peak = f·2^exponent with f in [0.5, 1); exponent 0 for 0
    shift = np.where(peak > 0, exponent - _FLOAT16_TOP_EXPONENT, 0)
    low, high = _FLOAT32_EXPONENTS
    if np.any(shift > high) or np.any((shift < low) & (peak > 0)):
        raise StoreError("features of magnitude beyond float32's range cannot be stored; check the checkpoint "
                         "for diverged weights")
    scale = np.ldexp(np.ones_like(peak), shift).astype(np.float32)
    return (rows / scale[:, None].astype(np.float64)).astype(np.float16), scale


def decode_float16_rows(stored: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 rows that :func:`encode_float16_rows` stored."""
    return stored.astype(np.float32) * scale.astype(np.float32)[:, None]


@dataclass(frozen=True)
class _Shape:
    """What the layout needs from the metadata: sizes, chunking and dtypes."""

    proj_dim: int
    chunk_size: int
    feature_dtype: str
    segment_sizes: tuple[int, ...]
    checkpoint_segments: tuple[int, ...]

    @classmethod
    def of(cls, metadata: dict) -> _Shape:
        segments = metadata.get("segments", [])
        owners = tuple(s for s, info in enumerate(segments) for _ in info.get("checkpoints", []))
        return cls(int(metadata.get("proj_dim", 0)), int(metadata.get("chunk_size", 1024)),
                   str(metadata.get("feature_dtype", "float16")),
                   tuple(int(info.get("num_examples", 0)) for info in segments), owners)


class StoreLayout:
    """The arrays and flags of one :class:`~srcproj.store.AttributionStore`.

    Everything is derived from the store's metadata (sizes, chunking, dtypes), so a
    layout can be built for any store, also one opened without a model
    (``srcproj info``).
    """

    def __init__(self, store: AttributionStore) -> None:
        self.store = store
        self.shape = _Shape.of(store.metadata)

    # ------------------------------------------------------------------ sizes
    @property
    def proj_dim(self) -> int:
        return self.shape.proj_dim

    @property
    def num_checkpoints(self) -> int:
        return len(self.shape.checkpoint_segments)

    @property
    def num_segments(self) -> int:
        return len(self.shape.segment_sizes)

    @property
    def feature_dtype(self) -> str:
        return self.shape.feature_dtype

    @property
    def cache_dtype(self) -> str:
        return "float64" if self.shape.feature_dtype == "float64" else "float32"

    def segment_of(self, checkpoint: int) -> int:
        return self.shape.checkpoint_segments[checkpoint]

    def members(self, segment: int) -> list[int]:
        """The checkpoints saved in ``segment``."""
        return [c for c, s in enumerate(self.shape.checkpoint_segments) if s == segment]

    def rows(self, segment: int) -> int:
        return self.shape.segment_sizes[segment]

    def chunks(self, segment: int) -> list[tuple[int, int]]:
        """``(start, stop)`` of every row chunk of a segment's data: the unit of resumption."""
        rows, size = self.rows(segment), self.shape.chunk_size
        return [(s, min(s + size, rows)) for s in range(0, rows, size)]

    # ------------------------------------------------------------------ arrays
    def features(self, checkpoint: int) -> zarr.Array:
        rows, k = self.rows(self.segment_of(checkpoint)), self.proj_dim
        return self.store.array(features(checkpoint), (rows, k), self.feature_dtype,
                                chunks=(self.shape.chunk_size, k))

    @property
    def scaled_features(self) -> bool:
        """Whether features are stored as float16 rows with a per-row scale."""
        return self.feature_dtype == "float16"

    def feature_scales(self, checkpoint: int) -> zarr.Array:
        return self.store.array(feature_scale(checkpoint), (self.rows(self.segment_of(checkpoint)),), "float32",
                                chunks=(self.shape.chunk_size,))

    def write_features(self, checkpoint: int, start: int, values: np.ndarray) -> None:
        """Durably write the rows ``start..`` of a checkpoint's features (float64 ``values``)."""
        rows = slice(start, start + values.shape[0])
        if self.scaled_features:
            stored, scale = encode_float16_rows(values)
            self.store.write_durably(self.feature_scales(checkpoint), rows, scale)
            self.store.write_durably(self.features(checkpoint), rows, stored)
        else:
            self.store.write_durably(self.features(checkpoint), rows, values.astype(self.feature_dtype))

    def feature_flags(self, checkpoint: int) -> zarr.Array:
        return self.store.flags(features_done(checkpoint), len(self.chunks(self.segment_of(checkpoint))))

    def hessian(self, checkpoint: int) -> zarr.Array:
        return self.store.array(hessian(checkpoint), (self.proj_dim, self.proj_dim), "float64")

    def hessian_parts(self, checkpoint: int) -> tuple[zarr.Array, zarr.Array, zarr.Array]:
        """``(parts, counts, flags)``: the per-chunk Gauss-Newton sums of a checkpoint being computed."""
        chunks, k = len(self.chunks(self.segment_of(checkpoint))), self.proj_dim
        return (self.store.array(hessian_parts(checkpoint), (chunks, k, k), "float64", chunks=(1, k, k)),
                self.store.array(hessian_counts(checkpoint), (chunks,), "float64", chunks=(1,), compressed=False),
                self.store.flags(hessian_parts_done(checkpoint), chunks))

    def hessian_parts_done(self, checkpoint: int) -> np.ndarray:
        return self._flags(hessian_parts_done(checkpoint), len(self.chunks(self.segment_of(checkpoint))))

    def write_hessian_part(self, checkpoint: int, chunk: int, total: np.ndarray, count: int) -> None:
        """Durably store one row chunk's float64 sum of outer products, then flag it."""
        parts, counts, flags = self.hessian_parts(checkpoint)
        self.store.write_durably(parts, chunk, total[None])
        self.store.write_durably(counts, chunk, np.array([float(count)]))
        flags[chunk] = True

    def sum_hessian_parts(self, checkpoint: int) -> tuple[np.ndarray, float]:
        """The sum of every chunk's part and the number of examples in them (all must be flagged)."""
        done = self.hessian_parts_done(checkpoint)
        if not done.all():
            missing = [int(i) for i in np.flatnonzero(~done)][:5]
            raise StoreError(f"the Hessian of checkpoint {checkpoint} lacks the parts of row chunks {missing}; "
                             "run featurize() again to compute them")
        k = self.proj_dim
        total, count = np.zeros((k, k)), 0.0
        counts = self.store.read_all(hessian_counts(checkpoint))
        for chunk in range(done.size):
            total += self.store.read_rows(hessian_parts(checkpoint), chunk, chunk + 1)[0]
            count += float(counts[chunk])
        return total, count

    def drop_hessian_parts(self, checkpoint: int) -> None:
        """Delete a checkpoint's parts (its Hessian is written, or they are invalid)."""
        for name in (hessian_parts_done(checkpoint), hessian_parts(checkpoint), hessian_counts(checkpoint)):
            if self.store.has(name):
                del self.store.group[name]

    def hessian_flags(self) -> zarr.Array:
        return self.store.flags(HESSIANS_DONE, self.num_checkpoints)

    def spectrum(self, segment: int) -> tuple[zarr.Array, zarr.Array]:
        k = self.proj_dim
        return (self.store.array(eigenvalues(segment), (k,), "float64"),
                self.store.array(eigenvectors(segment), (k, k), "float64"))

    def spectrum_flags(self) -> zarr.Array:
        return self.store.flags(SPECTRA_DONE, self.num_segments)

    def cache(self, segment: int, setting: str | None = None) -> zarr.Array:
        k = self.proj_dim
        return self.store.array(cache(segment, setting), (self.rows(segment), k), self.cache_dtype,
                                chunks=(self.shape.chunk_size, k))

    def cache_flags(self, segment: int, setting: str | None = None) -> zarr.Array:
        return self.store.flags(cache_done(segment, setting), len(self.chunks(segment)))

    def query_flags(self) -> zarr.Array:
        return self.store.flags(QUERY_DONE, self.num_checkpoints)

    # ------------------------------------------------------------------ preconditioner
    @property
    def preconditioned(self) -> bool:
        return bool((self.store.metadata.get("optimizer") or {}).get("preconditioned"))

    @property
    def num_params(self) -> int:
        return int(self.store.metadata["num_params"])

    def preconditioner_flags(self) -> zarr.Array:
        return self.store.flags(PRECONDITIONER_DONE, self.num_segments)

    def preconditioner_done(self) -> np.ndarray:
        return self._flags(PRECONDITIONER_DONE, self.num_segments)

    def write_preconditioner(self, segment: int, scale: np.ndarray, moment: np.ndarray | None) -> None:
        """Write a segment's ``M^{1/2}`` (and Adam's ``v̄``), then flag it."""
        p = self.num_params
        for name, values in ((preconditioner_scale(segment), scale), (preconditioner_moment(segment), moment)):
            if values is None:
                continue
            array = self.store.array(name, (p,), self.cache_dtype, chunks=(min(p, 1 << 22),))
            self.store.write_durably(array, slice(0, p), np.asarray(values, dtype=self.cache_dtype))
        self.preconditioner_flags()[segment] = True

    def read_scale(self, segment: int) -> np.ndarray:
        return self.store.read_all(preconditioner_scale(segment))

    def read_moment(self, segment: int) -> np.ndarray | None:
        name = preconditioner_moment(segment)
        return self.store.read_all(name) if self.store.has(name) else None

    def create(self, setting: str | None = None, segments: list[int] | None = None) -> None:
        """Create every array featurize writes (in a distributed job rank 0 does, first);
        with ``setting``, also that setting's caches of ``segments``."""
        for c in range(self.num_checkpoints):
            self.features(c)
            if self.scaled_features:
                self.feature_scales(c)
            self.feature_flags(c)
            self.hessian(c)
        done = self.hessians_done()
        for c in range(self.num_checkpoints):
            if not done[c]:  # created here, by one process, before ranks write their parts
                self.hessian_parts(c)
        self.hessian_flags()
        for seg in range(self.num_segments):
            self.spectrum(seg)
            self.cache(seg)
            self.cache_flags(seg)
        if setting not in (None, DEFAULT_SETTING):
            for seg in segments if segments is not None else range(self.num_segments):
                self.cache(seg, setting)
                self.cache_flags(seg, setting)
        self.spectrum_flags()
        self.query_flags()
        if self.preconditioned:
            self.preconditioner_flags()

    # ------------------------------------------------------------------ reading
    def read_features(self, checkpoint: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start..stop-1`` of a checkpoint's features (float32 when stored as float16)."""
        stored = self.store.read_rows(features(checkpoint), start, stop)
        if not self.scaled_features:
            return stored
        return decode_float16_rows(stored, self.store.read_rows(feature_scale(checkpoint), start, stop))

    def read_hessian(self, checkpoint: int) -> np.ndarray:
        return self.store.read_all(hessian(checkpoint))

    def read_spectrum(self, segment: int) -> tuple[np.ndarray, np.ndarray]:
        return self.store.read_all(eigenvalues(segment)), self.store.read_all(eigenvectors(segment))

    def read_cache(self, segment: int, start: int, stop: int, setting: str | None = None) -> np.ndarray:
        return self.store.read_rows(cache(segment, setting), start, stop)

    def cache_names(self, segments: list[int], setting: str | None = None) -> list[str]:
        """Array names of the caches of ``segments`` (for a streamed reader over the store),
        of the counterfactual setting ``setting`` (a key; default: same steps)."""
        return [cache(s, setting) for s in segments]

    def _flags(self, name: str, count: int) -> np.ndarray:
        """Done flags of ``name``; an array never created means nothing of it is done."""
        if not self.store.has(name):
            return np.zeros(count, dtype=bool)
        flags = np.asarray(self.store.read_all(name), dtype=bool)
        return np.pad(flags[:count], (0, max(0, count - flags.shape[0])))

    def features_done(self, checkpoint: int) -> np.ndarray:
        return self._flags(features_done(checkpoint), len(self.chunks(self.segment_of(checkpoint))))

    def hessians_done(self) -> np.ndarray:
        return self._flags(HESSIANS_DONE, self.num_checkpoints)

    def spectra_done(self) -> np.ndarray:
        return self._flags(SPECTRA_DONE, self.num_segments)

    def caches_done(self, segment: int, setting: str | None = None) -> np.ndarray:
        return self._flags(cache_done(segment, setting), len(self.chunks(segment)))

    def settings(self) -> dict[str, dict]:
        """The recorded cache inputs of every counterfactual setting other than same steps, by key."""
        return {name[len(_SETTING_PREFIX):]: dict(inputs) for name, inputs in self.stage_inputs().items()
                if _is_setting_stage(name)}

    def setting_segments(self, setting: str | None = None) -> list[int]:
        """The segments a setting has caches for: every segment for same steps, else the
        recorded segments of its attributed data set (none when it was never recorded)."""
        if setting in (None, DEFAULT_SETTING):
            return list(range(self.num_segments))
        return [int(s) for s in self.settings().get(setting, {}).get("attributed", [])]

    def is_complete(self, setting: str | None = None) -> bool:
        """Whether every cache chunk of a setting (default: same steps) is in the store
        (what scoring needs)."""
        segments = self.setting_segments(setting)
        return self.num_segments > 0 and bool(segments) and all(
            bool(self.caches_done(s, setting).all()) for s in segments)

    def settings_completion(self) -> dict[str, list[int]]:
        """Per setting that has caches in the store (same steps included), ``[done, total]``
        cache chunks of the segments it covers."""
        found = {}
        for setting in [DEFAULT_SETTING, *self.settings()]:
            chunks = [0, 0]
            for seg in self.setting_segments(setting):
                done = self.caches_done(seg, setting)
                chunks[0] += int(done.sum())
                chunks[1] += done.size
            if chunks[0]:
                found[setting] = chunks
        return found

    def completion(self) -> dict:
        """Counts of finished units per stage, as ``[done, total]`` pairs."""
        feature_chunks, checkpoints_done = [0, 0], [0, 0]
        for c in range(self.num_checkpoints):
            done = self.features_done(c)
            feature_chunks[0] += int(done.sum())
            feature_chunks[1] += done.size
            checkpoints_done[0] += bool(done.all())
            checkpoints_done[1] += 1
        cache_chunks, caches_done = [0, 0], [0, 0]
        for seg in range(self.num_segments):
            done = self.caches_done(seg)
            cache_chunks[0] += int(done.sum())
            cache_chunks[1] += done.size
            caches_done[0] += bool(done.all())
            caches_done[1] += 1
        return {
            "features": {"checkpoints": checkpoints_done, "chunks": feature_chunks},
            "hessians": [int(self.hessians_done().sum()), self.num_checkpoints],
            "spectra": [int(self.spectra_done().sum()), self.num_segments],
            "caches": {"segments": caches_done, "chunks": cache_chunks},
            "settings": self.settings_completion(),
            "complete": self.is_complete(),
        }

    # ------------------------------------------------------------------ stage inputs
    def stage_inputs(self) -> dict:
        """The inputs each stage was last computed with, as recorded in the store."""
        return dict(self.store.group.attrs.get(STAGE_INPUTS, {}))

    def stale(self, wanted: dict[str, dict]) -> list[str]:
        """The stages whose results were computed with other inputs than ``wanted``:
        the first stage that differs and every stage after it, and the settings' cache
        stages of ``wanted`` (``caches/{key}``) that differ or follow a stage that does
        (nothing is changed). A setting never recorded is missing, not stale."""
        recorded = json.loads(json.dumps(self.stage_inputs()))
        if not recorded:
            return []
        wanted = json.loads(json.dumps(wanted))
        first = next((i for i, stage in enumerate(STAGES)
                      if stage in wanted and metadata_differences(recorded.get(stage, {}), wanted[stage])), None)
        invalid = [] if first is None else list(STAGES[first:])
        for name in wanted:
            if _is_setting_stage(name) and name in recorded and (invalid or recorded[name] != wanted[name]):
                invalid.append(name)
        return invalid

    def changes(self, wanted: dict[str, dict]) -> str:
        """The recorded stage inputs that differ from ``wanted``, as one line."""
        recorded = json.loads(json.dumps(self.stage_inputs()))
        recorded = {name: inputs for name, inputs in recorded.items() if not _is_setting_stage(name) or name in wanted}
        return metadata_differences(recorded, json.loads(json.dumps(wanted)))

    def reconcile(self, wanted: dict[str, dict]) -> list[str]:
        """Make the store's stages agree with ``wanted`` (stage name → its inputs).

        The first stage whose recorded inputs differ, and every stage after it, lose
        their done flags; then ``wanted`` is recorded. Returns the invalidated stages.
        A setting's caches (``caches/{key}`` in ``wanted``) lose theirs when their inputs
        differ. When any stage is invalid, the caches of every recorded setting are
        cleared and the records of those not in ``wanted`` dropped; the records of the
        other settings are kept. Clearing comes first: a job killed in between finds the
        old inputs recorded and clears again, never stale results flagged done under
        new inputs.
        """
        recorded = json.loads(json.dumps(self.stage_inputs()))
        wanted = json.loads(json.dumps(wanted))
        invalid = self.stale(wanted)
        for stage in invalid:
            self._clear(stage)
        kept = {name: inputs for name, inputs in recorded.items() if _is_setting_stage(name) and name not in wanted}
        if invalid:
            for name in kept:
                self._clear(name)
            kept = {}
        new = {**kept, **wanted}
        if recorded != new:
            self.store.group.attrs[STAGE_INPUTS] = new
        return invalid

    def _clear(self, stage: str) -> None:
        names: list[tuple[str, int]] = []
        if stage == "features":
            names = [(features_done(c), len(self.chunks(self.segment_of(c)))) for c in range(self.num_checkpoints)]
        elif stage == "hessians":
            names = [(HESSIANS_DONE, self.num_checkpoints)]
            for c in range(self.num_checkpoints):
                self.drop_hessian_parts(c)
        elif stage == "spectra":
            names = [(SPECTRA_DONE, self.num_segments)]
        elif stage == "caches":
            names = [(cache_done(s), len(self.chunks(s))) for s in range(self.num_segments)]
        elif _is_setting_stage(stage):
            setting = stage[len(_SETTING_PREFIX):]
            names = [(cache_done(s, setting), len(self.chunks(s))) for s in range(self.num_segments)]
        for name, count in names:
            if self.store.has(name):
                self.store.flags(name, count)[:] = False

    # ------------------------------------------------------------------ query checkpoints
    def save_checkpoint(self, checkpoint: int, state: dict[str, torch.Tensor], digest: str) -> None:
        """Keep a query checkpoint's tensors in the store (for scoring after a reopen)."""
        entries, parts, offset = [], [], 0
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                continue
            raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            entries.append([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset, raw.size])
            parts.append(raw)
            offset += raw.size
        data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
        name = query_checkpoint(checkpoint)
        if self.store.has(name):
            del self.store.group[name]
        array = self.store.group.create_array(name, shape=(max(1, data.size),), dtype="uint8",
                                              chunks=(min(max(1, data.size), _QUERY_CHUNK_BYTES),),
                                              compressors=self.store.compressors(), fill_value=0,
                                              config={"write_empty_chunks": True},
                                              attributes={"tensors": entries, "digest": digest})
        self.store.write_durably(array, slice(0, data.size), data)
        self.query_flags()[checkpoint] = True

    def has_checkpoint(self, checkpoint: int) -> bool:
        return bool(self._flags(QUERY_DONE, self.num_checkpoints)[checkpoint])

    def load_checkpoint(self, checkpoint: int) -> tuple[dict[str, torch.Tensor], str]:
        """A saved query checkpoint's state and the digest it was saved with."""
        if not self.has_checkpoint(checkpoint):
            raise StoreError(f"checkpoint {checkpoint} is not saved in the store {self.store.location!r}: only the "
                             "last stage's checkpoints are, once featurize() has run (the last segment's by "
                             "versions before query='last_stage'; reopen such a store with query='last_segment', "
                             "or featurize it again with the trajectory)")
        name = query_checkpoint(checkpoint)
        data = self.store.read_all(name)
        attrs = self.store.group[name].attrs
        state = {}
        for tensor_name, dtype, shape, offset, size in attrs["tensors"]:
            raw = torch.from_numpy(data[offset:offset + size].copy())
            state[tensor_name] = raw.view(getattr(torch, dtype)).reshape(shape)
        return state, str(attrs["digest"])
