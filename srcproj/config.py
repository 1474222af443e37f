"""A run described in one TOML file: what the ``srcproj`` pipeline commands build.

The file names the user's own code as entry points (``"module:function"``) for the
model, the task and each data set; the trajectory as a recorded manifest, inline
segments or an entry point; the store and its settings; and one table per command.
docs/cli.md documents every key with a complete example. A minimal file::

    [model]
    entry = "digits_entry:build_model"     # returns the nn.Module (its weights are unused)

    [task]
    entry = "srcproj:ClassificationTask"

    [data]
    train = "digits_entry:train_data"      # returns a data set as the Attributor takes it
    test = "digits_entry:test_data"

    [trajectory]
    manifest = "run"                       # what a TrajectoryRecorder wrote

    [store]
    path = "digits.zarr"

Relative paths in the file are relative to the file's directory, and a module that is
not installed is imported from there; paths given on the command line are relative to
the working directory. :func:`load_config` applies ``KEY=VALUE`` overrides
(``--set store.proj_dim=512``) before validating, so an override is checked like a key
of the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigurationError, StoreError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["EntryPoint", "RunConfig", "load_config", "parse_override"]

# Keys whose values are paths: relative to the config file's directory when written in
# it, to the working directory when given on the command line.
PATH_KEYS = ("store.path", "trajectory.manifest", "score.out", "top_k.out", "self_influence.out", "mislabeled.out",
             "curate.out", "report.out")


def _kind(value: Any) -> str:
    """"a list", "an int": the type of ``value`` with its article."""
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _problem(where: str, message: str) -> ConfigurationError:
    return ConfigurationError(f"{where}: {message}")


def _table(value: Any, where: str) -> dict:
    if not isinstance(value, Mapping):
        raise _problem(where, f"it is {_kind(value)}, not a table; write it as [{where}] with keys")
    return dict(value)


def _check_keys(table: Mapping, known: Sequence[str], where: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean {where}.{close[0]}? " if close else ""
            raise _problem(f"{where}.{key}", f"unknown key; {hint}the keys of [{where}] are {', '.join(known)}")


def _section(cls: type, table: Any, where: str, **extra: Any) -> Any:
    """``cls(**table)`` after refusing keys it does not have."""
    table = _table({} if table is None else table, where)
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in extra and not f.name.startswith("_")]
    known = [f.name for f in fields]
    _check_keys(table, known, where)
    missing = [f.name for f in fields if f.name not in table
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise _problem(where, f"it has no {', '.join(missing)}; give {' and '.join(missing)} (the keys of "
                       f"[{where}] are {', '.join(known)})")
    return cls(**table, **extra, _where=where)


def _expect(value: Any, types: type | tuple[type, ...], where: str, wanted: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _problem(where, f"{value!r}; it must be {wanted}")
    if not isinstance(value, types):
        raise _problem(where, f"{value!r} ({type(value).__name__}); it must be {wanted}")
    return value


def _natural(text: str) -> list:
    """A sort key that orders the numbers inside names by value."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _positive(value: Any, where: str, wanted: str) -> int:
    _expect(value, int, where, wanted)
    if value < 1:
        raise _problem(where, f"{value!r}; it must be {wanted}")
    return value


def _resolve_path(base: str, value: str) -> str:
    if "://" in value:
        return value  # a zarr store URL
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, os.path.expanduser(value)))


# ---------------------------------------------------------------------------- entry points
# Modules loaded from .py paths, by absolute path.
_FILE_MODULES: dict[str, Any] = {}


@dataclass
class EntryPoint:
    """The user's code a run is built from: ``"module:attribute"`` and keyword arguments.

    The module is an importable name (``mypackage.models``), imported with the config
    file's directory on ``sys.path``, or a ``.py`` file path relative to that
    directory. A callable attribute is called with ``kwargs``; anything else is used as
    it is.
    """

    entry: str
    kwargs: dict = field(default_factory=dict)
    _where: str = "entry"

    def __post_init__(self) -> None:
        where = f"{self._where}.entry"
        _expect(self.entry, str, where, 'a "module:attribute" string, e.g. "mypackage.models:build_model"')
        module, _, attribute = self.entry.rpartition(":")
        if not module or not attribute or not attribute.replace(".", "_").isidentifier():
            raise _problem(where, f"{self.entry!r} is not \"module:attribute\"; write e.g. "
                           "\"mypackage.models:build_model\" or \"entry.py:build_model\"")
        self.kwargs = _table(self.kwargs, f"{self._where}.kwargs")

    @classmethod
    def parse(cls, value: Any, where: str, extra_keys: Sequence[str] = ()) -> tuple[EntryPoint, dict]:
        """From ``"module:attr"`` or ``{entry = ..., kwargs = {...}, ...}``; returns the entry
        point and the table's ``extra_keys``."""
        if isinstance(value, str):
            return cls(value, _where=where), {}
        table = _table(value, where)
        _check_keys(table, ["entry", "kwargs", *extra_keys], where)
        if "entry" not in table:
            raise _problem(where, 'it has no entry; give entry = "module:attribute"')
        extras = {key: table.pop(key) for key in extra_keys if key in table}
        return cls(**table, _where=where), extras

    def resolve(self, base_dir: str) -> Any:
        """The attribute the entry point names."""
        module_name, _, attribute = self.entry.rpartition(":")
        where = f"{self._where}.entry = {self.entry!r}"
        if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
            path = _resolve_path(base_dir, module_name)
            if not os.path.isfile(path):
                raise _problem(where, f"no file {path!r}; give a path relative to the config file, or a module name")
            module = _FILE_MODULES.get(path)
            if module is None:  # run each file once: the entries of one file share its module state
                spec = importlib.util.spec_from_file_location(f"_srcproj_entry_{len(_FILE_MODULES)}", path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
                _FILE_MODULES[path] = module
        else:
            if base_dir not in sys.path:
                sys.path.insert(0, base_dir)
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name is None or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
                    raise  # the user's module imports something missing: its own traceback says what
                raise _problem(where, f"no module named {exc.name!r} (looked in the installed packages and in "
                               f"{base_dir!r}); install it, put it beside the config file, or give a .py "
                               "path") from None
        value: Any = module
        for part in attribute.split("."):
            if not hasattr(value, part):
                raise _problem(where, f"{module_name!r} has no attribute {part!r}; name a function or class it "
                               "defines")
            value = getattr(value, part)
        return value

    def load(self, base_dir: str) -> Any:
        """Call the entry point with its kwargs (or return it, when it is not callable)."""
        value = self.resolve(base_dir)
        if callable(value):
            try:
                signature = inspect.signature(value)
            except ValueError:  # a builtin without a signature: its own call reports a mismatch
                signature = None
            try:
                if signature is not None:
                    signature.bind(**self.kwargs)
            except TypeError as exc:  # the kwargs do not fit: the config's mistake, not the user's code
                if "missing" in str(exc):
                    raise _problem(f"{self._where}.kwargs", f"{self.entry!r} needs more arguments ({exc}); give "
                                   f"them under {self._where}.kwargs, e.g. kwargs = {{ name = value }}") from None
                raise _problem(f"{self._where}.kwargs", f"{self.entry!r} does not take {self.kwargs!r} ({exc}); "
                               "give only the keyword arguments it takes") from None
            return value(**self.kwargs)
        if self.kwargs:
            raise _problem(f"{self._where}.kwargs", f"{self.entry!r} is not callable, so it takes no kwargs")
        return value


@dataclass
class DataEntry:
    """A named data set: its entry point and the id fields of its examples."""

    entry: EntryPoint
    ids: list[str] | None = None

    @classmethod
    def parse(cls, value: Any, where: str) -> DataEntry:
        entry, extras = EntryPoint.parse(value, where, extra_keys=("ids",))
        ids = extras.get("ids")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise _problem(f"{where}.ids", f"{ids!r}; give a list of key names, e.g. [\"id\"] ([] for none)")
        return cls(entry, ids)


# ---------------------------------------------------------------------------- sections
@dataclass
class SegmentEntry:
    """One inline segment: checkpoint files, steps, learning rate(s), data set name."""

    checkpoints: Any
    steps: int
    lr: Any
    data: str
    _where: str = "trajectory.segments"

    def __post_init__(self) -> None:
        _expect(self.checkpoints, (list, str), f"{self._where}.checkpoints",
                "a list of checkpoint files, or one glob pattern (\"ckpt/seg0-*.pt\")")
        _expect(self.steps, int, f"{self._where}.steps", "a whole number of optimizer steps")
        _expect(self.lr, (int, float, list), f"{self._where}.lr", "a learning rate, or one per step")
        _expect(self.data, str, f"{self._where}.data", "the name of a data set of [data]")

    def files(self, base_dir: str) -> list[str]:
        if isinstance(self.checkpoints, str):
            pattern = _resolve_path(base_dir, self.checkpoints)
            found = sorted(glob.glob(pattern), key=_natural)  # step9 before step10
            if not found:
                raise _problem(f"{self._where}.checkpoints", f"the pattern {pattern!r} matches no file")
            return found
        return [_resolve_path(base_dir, _expect(c, str, f"{self._where}.checkpoints", "a file path"))
                for c in self.checkpoints]


_OPTIMIZER_KINDS = ("sgd", "adam", "adamw")


@dataclass
class TrajectorySettings:
    """``[trajectory]``: exactly one of ``manifest``, ``entry`` and ``segments``."""

    manifest: str | None = None
    stages: dict = field(default_factory=dict)
    verify: bool = True
    entry: Any = None
    segments: list | None = None
    optimizer: dict | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    dampening: float = 0.0
    batch_size: int | None = None
    _where: str = "trajectory"

    def __post_init__(self) -> None:
        given = [name for name in ("manifest", "entry", "segments") if getattr(self, name) is not None]
        if len(given) != 1:
            gives = " and ".join(given) if given else "none of manifest, entry and segments"
            raise _problem("trajectory", f"it gives {gives}; give exactly one: manifest = \"run\" (a "
                           "TrajectoryRecorder's directory), "
                           "segments = [...] (inline), or entry = \"module:function\" (returns a Trajectory)")
        if self.manifest is not None:
            _expect(self.manifest, str, "trajectory.manifest", "the path of a recorded run's manifest or directory")
        self.stages = _table(self.stages, "trajectory.stages")
        for stage, name in self.stages.items():
            _expect(name, str, f"trajectory.stages.{stage}", "the name of a data set of [data]")
        _expect(self.verify, bool, "trajectory.verify", "true or false")
        if self.entry is not None:
            self.entry, _ = EntryPoint.parse(self.entry, "trajectory.entry")
        if self.segments is not None:
            _expect(self.segments, list, "trajectory.segments", "an array of tables, [[trajectory.segments]]")
            if not self.segments:
                raise _problem("trajectory.segments", "it is empty; give at least one [[trajectory.segments]]")
            self.segments = [_section(SegmentEntry, s, f"trajectory.segments[{i}]")
                             for i, s in enumerate(self.segments)]
        if self.optimizer is not None:
            optimizer = _table(self.optimizer, "trajectory.optimizer")
            kind = optimizer.get("kind")
            if kind not in _OPTIMIZER_KINDS:
                raise _problem("trajectory.optimizer.kind", f"{kind!r}; choose one of {', '.join(_OPTIMIZER_KINDS)} "
                               "and give its settings beside it (momentum, betas, eps, weight_decay...)")
        if self.optimizer is not None:
            both = [n for n in ("momentum", "weight_decay", "nesterov", "dampening")
                    if getattr(self, n) not in (0.0, False)]
            if both:
                raise _problem("trajectory", f"it gives optimizer and also {', '.join(both)}; the optimizer carries "
                               "its own settings: give them inside optimizer = { kind = ..., ... } only")
        if self.manifest is not None or self.entry is not None:
            inline = [n for n in ("optimizer", "momentum", "weight_decay", "nesterov", "dampening", "batch_size")
                      if getattr(self, n) not in (None, 0.0, False)]
            if inline:
                raise _problem("trajectory", f"{', '.join(inline)} describe inline segments only; a recorded "
                               "manifest (or an entry point's Trajectory) carries its own optimizer")


@dataclass
class StoreSettings:
    """``[store]``: where the store is and the Attributor's settings."""

    path: str | None = None
    proj_dim: int = 2048
    seed: int = 0
    projector: str = "rademacher"
    modules: list | None = None
    hessian: str = "auto"
    fisher_samples: int = 1
    hessian_sample: int | None = None
    feature_dtype: str = "float16"
    chunk_size: int = 1024
    device: str | None = None
    query: str = "last_stage"
    preconditioner: str = "shared"
    adam_response: str = "linearized"
    unroll: str = "stages"
    counterfactual: Any = "same_steps"
    _where: str = "store"

    def __post_init__(self) -> None:
        if self.path is None:
            raise _problem("store.path", "missing; give the store's directory, e.g. path = \"run.zarr\" (or --store)")
        _expect(self.path, str, "store.path", "a directory path or a zarr store URL")
        for name in ("proj_dim", "seed", "chunk_size", "fisher_samples"):
            _expect(getattr(self, name), int, f"store.{name}", "a whole number")
        _expect(self.hessian_sample, int, "store.hessian_sample", "a whole number of examples", optional=True)
        if self.projector not in ("rademacher", "kronecker"):
            raise _problem("store.projector", f"{self.projector!r}; choose \"rademacher\" (dense, the default) or "
                           "\"kronecker\" (factored layers)")
        if self.modules is not None:
            _expect(self.modules, list, "store.modules", "a list of module names or patterns")
        _expect(self.device, str, "store.device", "a torch device, e.g. \"cuda:0\"", optional=True)
        value = self.counterfactual
        if not (value == "same_steps" or (isinstance(value, Mapping) and "same_epochs" in value)):
            raise _problem("store.counterfactual", f"{value!r}; give \"same_steps\" or {{ same_epochs = 0.5 }} "
                           "(optionally with data_segment = 0)")
        if isinstance(value, Mapping):
            _check_keys(value, ["same_epochs", "data_segment"], "store.counterfactual")

    def counterfactual_setting(self) -> Any:
        from .counterfactual import Counterfactual

        if self.counterfactual == "same_steps":
            return "same_steps"
        return Counterfactual.same_epochs(self.counterfactual["same_epochs"],
                                          self.counterfactual.get("data_segment", 0))


def _optional_data_name(value: Any, where: str) -> str | None:
    return _expect(value, str, where, "the name of a data set of [data]", optional=True)


def _optional_out(value: Any, where: str) -> str | None:
    return _expect(value, str, where, "an output path", optional=True)


@dataclass
class FeaturizeSettings:
    """``[featurize]``."""

    batch_size: int = 64
    _where: str = "featurize"

    def __post_init__(self) -> None:
        _positive(self.batch_size, "featurize.batch_size", "a whole number of examples, at least 1")


@dataclass
class _Scoring:
    batch_size: int = 64
    score_memory_bytes: int = 1 << 30
    segments: list | None = None
    out: str | None = None
    _where: str = ""

    def __post_init__(self) -> None:
        _positive(self.batch_size, f"{self._where}.batch_size", "a whole number of examples, at least 1")
        _positive(self.score_memory_bytes, f"{self._where}.score_memory_bytes", "a whole number of bytes, at least 1")
        if self.segments is not None:
            _expect(self.segments, list, f"{self._where}.segments", "a list of segment indices")
        _optional_out(self.out, f"{self._where}.out")


def _normalize(value: Any, where: str) -> str:
    """A ``normalize`` key: "none", "train" or "both" (srcproj.normalization)."""
    choices = ("none", "train", "both")
    if not isinstance(value, str) or value not in choices:
        raise _problem(where, f"{value!r}; it must be one of {', '.join(map(repr, choices))}: 'none' for raw scores "
                       "(the predicted effect of removal), 'train' or 'both' for normalised ones (explanation by "
                       "example)")
    return value


@dataclass
class ScoreSettings(_Scoring):
    """``[score]``: dense scores of ``queries`` to a zarr array at ``out``; ``normalize``: "none",
    "train" or "both" (srcproj.normalization)."""

    queries: str | None = None
    normalize: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        _optional_data_name(self.queries, "score.queries")
        _normalize(self.normalize, "score.normalize")


@dataclass
class TopKSettings(_Scoring):
    """``[top_k]``: the ``k`` most helpful and harmful training examples of each query, ranked by
    raw or normalised scores (``normalize``: "none", "train" or "both")."""

    queries: str | None = None
    k: int = 10
    normalize: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        _optional_data_name(self.queries, "top_k.queries")
        _positive(self.k, "top_k.k", "a whole number of examples, at least 1")
        _normalize(self.normalize, "top_k.normalize")


@dataclass
class SelfInfluenceSettings(_Scoring):
    """``[self_influence]``: every training example's score on itself."""


@dataclass
class MislabeledSettings:
    """``[mislabeled]``: every training example's suspicion of a wrong label."""

    detector: str = "mean_loss"
    components: Any = "all"
    damping: float | None = None
    data_segment: int = 0
    flag_fraction: float | None = None
    batch_size: int = 64
    out: str | None = None
    _where: str = "mislabeled"

    def __post_init__(self) -> None:
        _expect(self.detector, str, "mislabeled.detector", "the name of a detector, e.g. \"mean_loss\"")
        _expect(self.components, (str, list), "mislabeled.components", "\"all\", \"used\" or a list of detectors")
        _expect(self.damping, (int, float), "mislabeled.damping", "a number > 0", optional=True)
        _expect(self.data_segment, int, "mislabeled.data_segment", "a segment index")
        _expect(self.flag_fraction, (int, float), "mislabeled.flag_fraction", "a fraction in (0, 1]", optional=True)
        _positive(self.batch_size, "mislabeled.batch_size", "a whole number of examples, at least 1")
        _optional_out(self.out, "mislabeled.out")


@dataclass
class CurateSettings(_Scoring):
    """``[curate]``: the training examples ranked by their influence on ``validation``."""

    validation: str | None = None
    aggregate: str = "mean"
    drop_fraction: float | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _optional_data_name(self.validation, "curate.validation")


@dataclass
class ReportSettings(_Scoring):
    """``[report]``: the HTML report (``srcproj report``) of ``queries``, with the curation on
    ``validation`` when it is set.

    ``k`` helpful and harmful examples for each of the first ``max_queries`` queries; the
    ``flag_fraction`` of the training set that the default mislabel detector suspects most
    flagged; the
    curation's ``aggregate`` and rule (``drop_fraction`` or ``threshold``; 0.05 of the
    set dropped when neither is set); ``image_shape`` (e.g. ``[8, 8]``) shows each input
    as an image of that shape, ``text_key`` names the id field holding each example's text.
    """

    queries: str | None = None
    validation: str | None = None
    k: int = 5
    max_queries: int = 20
    flag_fraction: float = 0.02
    aggregate: str = "mean"
    drop_fraction: float | None = None
    threshold: float | None = None
    image_shape: list | None = None
    text_key: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _optional_data_name(self.queries, "report.queries")
        _optional_data_name(self.validation, "report.validation")
        for name, wanted in (("k", "a whole number of examples, at least 1"),
                             ("max_queries", "a whole number of queries, at least 1")):
            value = _expect(getattr(self, name), int, f"report.{name}", wanted)
            if value < 1:
                raise _problem(f"report.{name}", f"{value!r}; it must be {wanted}")
        fraction = _expect(self.flag_fraction, (int, float), "report.flag_fraction", "a fraction in [0, 1), e.g. 0.02")
        if not 0 <= fraction < 1:
            raise _problem("report.flag_fraction", f"{fraction!r}; it must be a fraction in [0, 1), e.g. 0.02 (0 "
                           "flags none)")
        _expect(self.drop_fraction, (int, float), "report.drop_fraction", "a fraction in [0, 1)", optional=True)
        _expect(self.threshold, (int, float), "report.threshold", "a number", optional=True)
        if self.drop_fraction is not None and self.threshold is not None:
            raise _problem("report", "it has two curation rules, drop_fraction and threshold; keep one of them (a "
                           "--drop-fraction or --threshold flag replaces the file's rule)")
        _expect(self.image_shape, list, "report.image_shape", "a list of sizes, e.g. [8, 8] or [3, 32, 32]",
                optional=True)
        _expect(self.text_key, str, "report.text_key", "the name of an id field holding text, e.g. \"text\"",
                optional=True)


_SECTIONS = {
    "model": None, "task": None, "data": None, "trajectory": TrajectorySettings, "store": StoreSettings,
    "featurize": FeaturizeSettings, "score": ScoreSettings, "top_k": TopKSettings,
    "self_influence": SelfInfluenceSettings, "mislabeled": MislabeledSettings, "curate": CurateSettings,
    "report": ReportSettings,
}


# ---------------------------------------------------------------------------- the run
@dataclass
class RunConfig:
    """A validated config file: the run's parts as entry points and settings.

    Build the parts with :meth:`build_model`, :meth:`build_task`, :meth:`dataset`,
    :meth:`build_trajectory` and :meth:`attributor`.
    """

    path: str
    base_dir: str
    model: EntryPoint
    task: EntryPoint
    data: dict[str, DataEntry]
    trajectory: TrajectorySettings
    store: StoreSettings
    featurize: FeaturizeSettings
    score: ScoreSettings
    top_k: TopKSettings
    self_influence: SelfInfluenceSettings
    mislabeled: MislabeledSettings
    curate: CurateSettings
    report: ReportSettings
    _built: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ parts
    def _once(self, key: str, make: Any) -> Any:
        if key not in self._built:
            self._built[key] = make()
        return self._built[key]

    def build_model(self) -> Any:
        from torch import nn

        def make() -> Any:
            model = self.model.load(self.base_dir)
            if not isinstance(model, nn.Module):
                raise _problem("model.entry", f"{self.model.entry!r} returned {_kind(model)}; it must "
                               "return the torch nn.Module (the architecture; weights come from the checkpoints)")
            return model

        return self._once("model", make)

    def build_task(self) -> Any:
        from .tasks import Task

        def make() -> Any:
            task = self.task.load(self.base_dir)
            if not isinstance(task, Task):
                raise _problem("task.entry", f"{self.task.entry!r} gave {_kind(task)}; it must give a "
                               "srcproj Task, e.g. \"srcproj:ClassificationTask\" or a subclass of srcproj.Task")
            return task

        return self._once("task", make)

    def data_entry(self, name: Any, where: str) -> DataEntry:
        if not isinstance(name, str) or name not in self.data:
            have = ", ".join(self.data) or "none"
            raise _problem(where, f"{name!r} is not a data set of [data] (it has: {have}); add it under [data], "
                           "or name one of those")
        return self.data[name]

    def dataset(self, name: str, where: str = "data") -> Any:
        """The data set ``name`` of ``[data]``, loaded once."""
        entry = self.data_entry(name, where)
        return self._once(f"data:{name}", lambda: entry.entry.load(self.base_dir))

    def segment_data_name(self, segment: int) -> str | None:
        """The ``[data]`` name of a segment's data set (``None`` for an entry point's trajectory)."""
        names = self._built.get("segment_data", [])
        return names[segment] if segment < len(names) else None

    def build_trajectory(self) -> Any:
        from .recorder import read_manifest
        from .trajectory import Segment, Trajectory

        settings = self.trajectory
        if settings.entry is not None:
            trajectory = settings.entry.load(self.base_dir)
            if not isinstance(trajectory, Trajectory):
                raise _problem("trajectory.entry", f"{settings.entry.entry!r} returned {_kind(trajectory)}; "
                               "it must return a srcproj.Trajectory")
            return trajectory
        if settings.manifest is not None:
            manifest_path, manifest = read_manifest(settings.manifest)
            recorded = list(dict.fromkeys(str(s.get("stage")) for s in manifest.get("segments", [])))
            unknown = [stage for stage in settings.stages if stage not in recorded]
            if unknown:
                raise _problem("trajectory.stages", f"{unknown} are not stages of the recorded run "
                               f"{manifest_path!r} (its stages with segments: {recorded})")
            data = {stage: self.dataset(settings.stages.get(stage, stage),
                                        f"trajectory.stages.{stage}" if stage in settings.stages
                                        else f"the recorded stage {stage!r} (name its data set [data] {stage} = "
                                        f"..., or map it: [trajectory.stages] {stage} = \"<data name>\")")
                    for stage in recorded}
            self._built["segment_data"] = [settings.stages.get(str(s.get("stage")), str(s.get("stage")))
                                           for s in manifest.get("segments", [])]
            return Trajectory.from_manifest(manifest_path, data, verify=settings.verify, task=self.build_task())
        segments = [Segment(s.files(self.base_dir), steps=s.steps, lr=s.lr,
                            data=self.dataset(s.data, f"trajectory.segments[{i}].data"))
                    for i, s in enumerate(settings.segments)]
        self._built["segment_data"] = [s.data for s in settings.segments]
        if settings.optimizer is not None:
            return Trajectory(segments, optimizer=_optimizer(settings.optimizer), batch_size=settings.batch_size)
        return Trajectory(segments, momentum=settings.momentum, weight_decay=settings.weight_decay,
                          nesterov=settings.nesterov, dampening=settings.dampening, batch_size=settings.batch_size)

    def attributor(self, *, existing: bool = False, counterfactual: Any = None) -> Any:
        """The run's :class:`~srcproj.Attributor` over ``[store]``.

        ``existing``: the store must be there already (scoring commands); it is then
        checked against the run like any reopened store, and never created.
        """
        from .attributor import Attributor
        from .projection import KroneckerProjector
        from .store import AttributionStore

        store = self.store
        if existing:
            try:
                AttributionStore.read(store.path)  # refuses a missing path or a non-srcproj directory
            except StoreError as exc:
                raise StoreError(f"{exc}; the scoring commands read the store `srcproj featurize -c "
                                 f"{os.path.basename(self.path)}` makes: featurize first, or point --store "
                                 "(store.path) at that store") from None
        projector = KroneckerProjector(store.proj_dim, store.seed) if store.projector == "kronecker" else None
        return Attributor(
            self.build_model(), self.build_task(), self.build_trajectory(), store.path, store.proj_dim, store.seed,
            projector=projector, modules=store.modules, hessian=store.hessian, fisher_samples=store.fisher_samples,
            hessian_sample=store.hessian_sample, feature_dtype=store.feature_dtype, chunk_size=store.chunk_size,
            device=store.device, query=store.query, preconditioner=store.preconditioner,
            adam_response=store.adam_response, unroll=store.unroll,
            counterfactual=store.counterfactual_setting() if counterfactual is None else counterfactual)


def _optimizer(table: Mapping) -> Any:
    from .optimizer import SGD, Adam, AdamW

    settings = {k: v for k, v in table.items() if k != "kind"}
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    build = {"sgd": SGD, "adam": Adam, "adamw": AdamW}[table["kind"]]
    try:
        return build(**settings)
    except TypeError as exc:
        raise _problem("trajectory.optimizer", f"{exc}; give the settings of srcproj.{build.__name__}") from None


# ---------------------------------------------------------------------------- loading
def parse_override(text: str) -> tuple[list[str], Any]:
    """``"store.proj_dim=512"`` → ``(["store", "proj_dim"], 512)``.

    The value is read as a TOML value (numbers, ``true``, ``[1, 2]``, ``"text"``,
    ``{same_epochs = 0.5}``); anything that is not one is taken as a string.
    """
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigurationError(f"--set {text!r}: write KEY=VALUE with a dotted key, e.g. --set store.proj_dim=512")
    try:
        parsed = tomllib.loads(f"value = {value.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return parts, parsed


def _apply(raw: dict, parts: list[str], value: Any, shown: str) -> None:
    table = raw
    for depth, part in enumerate(parts[:-1]):
        inner = table.setdefault(part, {})
        if not isinstance(inner, dict):
            raise ConfigurationError(f"--set {shown}: {'.'.join(parts[:depth + 1])} is not a table, so it has no "
                                     "keys to set; set it whole")
        table = inner
    table[parts[-1]] = value


def load_config(path: str | os.PathLike, overrides: Sequence[str | tuple[str, Any]] = ()) -> RunConfig:
    """Read, override and validate a run's config file.

    Parameters
    ----------
    path : path
        The TOML file.
    overrides : sequence
        ``"section.key=value"`` strings (``--set``) or ``(dotted key, value)`` pairs
        (the commands' own flags), applied in order over the file's values.

    Returns
    -------
    RunConfig
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise ConfigurationError(f"no config file at {path!r}; give the path of a TOML file (docs/cli.md shows one)")
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None
    base_dir = os.path.dirname(path)
    for key in PATH_KEYS:  # the file's paths are relative to the file
        section, name = key.split(".")
        if isinstance(raw.get(section), dict) and isinstance(raw[section].get(name), str):
            raw[section][name] = _resolve_path(base_dir, raw[section][name])
    for override in overrides:
        if isinstance(override, str):
            parts, value = parse_override(override)
            shown = override
        else:
            parts, value = override[0].split("."), override[1]
            shown = f"{override[0]}={value!r}"
        if ".".join(parts) in PATH_KEYS and isinstance(value, str):
            value = _resolve_path(os.getcwd(), value)
        _apply(raw, parts, value, shown)
    for key in raw:
        if key not in _SECTIONS:
            owners = [f"{name}.{key}" for name, cls in _SECTIONS.items()
                      if cls is not None and key in {f.name for f in dataclasses.fields(cls)}]
            close = owners or [f"[{name}]" for name in difflib.get_close_matches(str(key), list(_SECTIONS), n=1)]
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ConfigurationError(f"{key}: unknown section or top-level key; {hint}the sections are "
                                     f"{', '.join(f'[{name}]' for name in _SECTIONS)}")
    for name in ("model", "task"):
        if name not in raw:
            raise _problem(name, f"missing; give [{name}] entry = \"module:function\"")
    if "trajectory" not in raw:
        raise _problem("trajectory", "missing; give [trajectory] manifest = \"<recorded run>\", segments or entry")
    model, _ = EntryPoint.parse(raw["model"], "model")
    task, _ = EntryPoint.parse(raw["task"], "task")
    data = {str(name): DataEntry.parse(value, f"data.{name}")
            for name, value in _table(raw.get("data", {}), "data").items()}
    sections = {name: _section(cls, raw.get(name), name) for name, cls in _SECTIONS.items() if cls is not None}
    return RunConfig(path=path, base_dir=base_dir, model=model, task=task, data=data, **sections)
