"""The ``srcproj`` command line.

The pipeline commands (``featurize``, ``score``, ``top-k``, ``self-influence``,
``curate``) build the run from one config file (:mod:`srcproj.config`) and write their
results as files: the store, a zarr score array, or tables (:mod:`srcproj.tables`).
They report progress on stderr and one summary line on stdout. ``demo``, ``info`` and
``verify`` need no config.

Errors srcproj raises on purpose (:class:`~srcproj.errors.SrcprojError`) are printed
as one line, ``srcproj: error: ...``, with exit status 2: they are the user's to fix
and a traceback would only hide the message. Anything else is a bug and keeps its
traceback. ``srcproj verify`` exits with 1 when it finds damage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .demo import format_bytes
from .errors import ConfigurationError, SrcprojError, StoreMismatchError

if TYPE_CHECKING:
    from .store import AttributionStore
    from .verify import VerifyReport

__all__ = ["main", "store_summary"]

_PROG = "srcproj"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Training data attribution with SOURCE in a random-projection space.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a small MLP on scikit-learn's digits and attribute its test predictions",
        description="Train a small MLP on the digits data set (bundled with scikit-learn, nothing "
        "is downloaded), featurize it with SOURCE, print the most helpful and harmful training "
        "examples of a few test digits and a timing summary. Rerunning with the same store "
        "resumes it.",
    )
    demo.add_argument("--store", default="srcproj-demo.zarr", metavar="PATH",
                      help="attribution store directory (default: %(default)s)")
    demo.add_argument("--proj-dim", type=_positive_int, default=256, metavar="K",
                      help="projected dimension k (default: %(default)s)")
    demo.add_argument("--fresh", action="store_true",
                      help="delete the store first (only a srcproj store is ever deleted)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                      help="torch CPU threads (default: torch's own choice); 1 is often faster "
                      "for this small model on a busy machine")
    demo.set_defaults(handler=_run_demo)

    info = commands.add_parser(
        "info",
        help="describe a store: its inputs, what is computed, its size",
        description="Print a store's metadata (projection, model, Hessian estimator, segments), "
        "which units of work are done, and its size on disk. Reads only.",
    )
    info.add_argument("store", metavar="STORE", help="path of the store")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(handler=_run_info)

    verify = commands.add_parser(
        "verify",
        help="read every chunk of a store and check what its done flags claim",
        description="Read and decode every chunk of every array of a store (checking each chunk's "
        "checksum), then check that every unit flagged done has its chunks in the store, finite "
        "values, and a symmetric Hessian. Reads only. Exit status: 0 when the store is sound, 1 "
        "when damage is found, 2 when STORE is not a srcproj store.",
    )
    verify.add_argument("store", metavar="STORE", help="path or URL of the store")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    verify.set_defaults(handler=_run_verify)
    _add_pipeline_commands(commands)
    _add_report_command(commands)
    return parser


# ---------------------------------------------------------------------- demo
def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import remove_store, run_demo

    if args.fresh and remove_store(args.store):
        print(f"removed the previous store {args.store}")
    # main() is the process owner here, unlike library code, so it may set torch's
    # thread count; it restores it because tests call main() in-process.
    previous = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        run_demo(args.store, proj_dim=args.proj_dim, progress=not args.no_progress)
    except StoreMismatchError as exc:
        # Training rounds differently under another torch build or thread count, and
        # the store checks checkpoints bit for bit: say how to start over.
        raise StoreMismatchError(
            f"{exc}; `srcproj demo --fresh` deletes it (a demo store resumes only with the "
            "same --proj-dim, torch build and thread count)"
        ) from exc
    finally:
        torch.set_num_threads(previous)
    return 0


# ---------------------------------------------------------------------- info
def store_summary(store: AttributionStore) -> dict:
    """Metadata and completion state of an opened :class:`~srcproj.store.AttributionStore`.

    Completion is read from the done flags (:meth:`StoreLayout.completion`), the same
    markers that :meth:`Attributor.featurize` resumes from; the optimizer settings and
    segment times are the inputs the spectra and caches were last computed with.
    """
    from .layout import StoreLayout

    layout = StoreLayout(store)
    meta = store.metadata
    inputs = layout.stage_inputs()
    caches = inputs.get("caches", {})
    times = caches.get("segments", [])
    summary_segments = []
    for seg, info in enumerate(meta.get("segments", [])):
        timing = times[seg] if seg < len(times) else {}
        summary_segments.append({
            "index": seg,
            "steps": timing.get("steps"),
            "total_lr": timing.get("total_lr"),
            "time": timing.get("time"),
            "num_examples": int(info.get("num_examples", 0)),
            "num_checkpoints": len(info.get("checkpoints", [])),
            "data_group": info.get("data_group", seg),
        })
    return {
        "location": store.location,
        "format": meta.get("format"),
        "library_version": meta.get("library_version"),
        "projector": meta.get("projector"),
        "proj_dim": meta.get("proj_dim"),
        "num_params": meta.get("num_params"),
        "param_names": meta.get("param_names", []),
        "task": meta.get("task"),
        "num_outputs": meta.get("num_outputs"),
        "hessian": meta.get("hessian"),
        "fisher_samples": meta.get("fisher_samples"),
        "feature_dtype": meta.get("feature_dtype"),
        "chunk_size": layout.shape.chunk_size,
        "momentum": caches.get("momentum"),
        "weight_decay": inputs.get("spectra", {}).get("weight_decay"),
        "optimizer": meta.get("optimizer") or {"kind": "sgd"},
        "group_weight_decays": inputs.get("spectra", {}).get("group_weight_decays") or {},
        "segments": summary_segments,
        "completion": layout.completion(),
        # A local store always holds its zarr.json, so 0 means "not a local store".
        "bytes_on_disk": store.nbytes_stored() or None,
    }


def _describe_projector(projector: Any) -> str:
    if not isinstance(projector, dict):
        return str(projector)
    kind = projector.get("kind", "?")
    details = ", ".join(f"{k} {v}" for k, v in projector.items() if k not in ("kind", "proj_dim"))
    return f"{kind} ({details})" if details else str(kind)


def _describe_optimizer(summary: dict) -> str:
    record = summary.get("optimizer") or {}
    kind = str(record.get("kind", "sgd"))
    decay = f"weight decay {summary['weight_decay']}"
    others = summary.get("group_weight_decays") or {}
    if others:
        values = sorted({float(v) for v in others.values()})
        decay += f" ({', '.join(f'{v:g}' for v in values)} for {len(others)} tensors)"
    if kind == "sgd":
        text = f"SGD, momentum {summary['momentum']}, {decay}"
        return text + (", group learning-rate ratios as a preconditioner" if record.get("preconditioned") else "")
    name = {"adam": "Adam", "adamw": "AdamW"}.get(kind, kind)
    moment = record.get("second_moment", "?")
    if moment == "estimated":
        moment = f"estimated from per-example gradients, batch size {record.get('batch_size')}"
    chaining = {"segment": "each segment's own", "shared": "one for the whole run"}.get(record.get("chaining"), "?")
    response = {"linearized": "linearized step", "fixed": "v̂ held fixed"}.get(record.get("response"), "?")
    return (f"{name}, betas {record.get('betas')}, eps {record.get('eps')}, {decay}; "
            f"preconditioner: {chaining}, from the {moment} ({response})")


def _fraction(pair: Sequence[int]) -> str:
    done, total = pair
    return f"{done}/{total}"


def _number(value: Any) -> str:
    # Stores written by another version may lack a field: show "?" rather than fail.
    return f"{value:.4g}" if isinstance(value, (int, float)) else "?"


def _print_info(summary: dict) -> None:
    task = summary["task"] or {}
    hessian = summary["hessian"]
    if hessian == "fisher" and summary.get("fisher_samples"):
        hessian = f"fisher ({summary['fisher_samples']} sampled label(s) per example)"
    rows = [
        ("store", summary["location"]),
        ("format", f"{summary['format']} (written by srcproj {summary['library_version']})"),
        ("projector", _describe_projector(summary["projector"])),
        ("k", f"{summary['proj_dim']}"),
        ("params", f"{summary['num_params']:,} in {len(summary['param_names'])} tensors"
         if isinstance(summary["num_params"], int) else str(summary["num_params"])),
        ("task", f"{task.get('class', task)}, {summary['num_outputs']} outputs"),
        ("hessian", f"{hessian} Gauss-Newton"),
        ("features", f"{summary['feature_dtype']}, chunks of {summary['chunk_size']:,} examples"),
        ("optimizer", _describe_optimizer(summary)),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")

    print(f"segments ({len(summary['segments'])})")
    print(f"  {'#':>3} {'steps':>7} {'sum lr':>9} {'time a':>9} {'examples':>9} {'checkpoints':>11}  data")
    for seg in summary["segments"]:
        data = "own" if seg["data_group"] == seg["index"] else f"same as segment {seg['data_group']}"
        print(f"  {seg['index']:>3} {_number(seg['steps']):>7} {_number(seg['total_lr']):>9} "
              f"{_number(seg['time']):>9} {seg['num_examples']:>9,} {seg['num_checkpoints']:>11}  {data}")

    done = summary["completion"]
    print("completion")
    print(f"  features  {_fraction(done['features']['checkpoints'])} checkpoints "
          f"({_fraction(done['features']['chunks'])} chunks)")
    print(f"  hessians  {_fraction(done['hessians'])} checkpoints")
    print(f"  spectra   {_fraction(done['spectra'])} segments")
    print(f"  caches    {_fraction(done['caches']['segments'])} segments "
          f"({_fraction(done['caches']['chunks'])} chunks)")
    settings = done.get("settings") or {}
    shown = ", ".join(f"{key} ({_fraction(chunks)} chunks)" for key, chunks in settings.items())
    print(f"  settings  {shown or 'none'}  (counterfactual settings with caches)")
    ready = [key for key, (have, total) in settings.items() if have == total and key != "same_steps"]
    if done["complete"]:
        state = "complete: ready to score"
    elif ready:
        state = f"ready to score with counterfactual {', '.join(ready)} only (same-steps caches incomplete)"
    else:
        state = "incomplete: run Attributor.featurize() to finish (it resumes)"
    print(f"  state     {state}")
    size = summary["bytes_on_disk"]
    print(f"on disk   {f'{format_bytes(size)} ({size:,} bytes)' if size else 'unknown (not a local store)'}")


def _run_info(args: argparse.Namespace) -> int:
    from .store import AttributionStore

    summary = store_summary(AttributionStore.read(args.store))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_info(summary)
    return 0


# ---------------------------------------------------------------------- verify
def _chunk_label(chunk: Any) -> str:
    if chunk is None:
        return "(whole array)"
    return f"chunk {tuple(chunk) if isinstance(chunk, (list, tuple)) else chunk}"


def _print_verify(report: VerifyReport) -> None:
    fmt = "?" if report.format is None else report.format
    print(f"store    {report.location} (format {fmt})")
    print(f"checked  {report.arrays_checked:,} arrays, {report.chunks_checked:,} chunks")
    if report.ok:
        print("ok: every chunk decodes and every unit flagged done is in the store and sound")
        return
    print(f"damage   {len(report.damage)} problem(s)")
    for damage in report.damage:
        print(f"  {damage.array} {_chunk_label(damage.chunk)}: {damage.problem}")
        files = [f"chunk {damage.key}"] if damage.key else []
        if damage.flag and damage.flag != damage.key:
            files.append(f"done flag {damage.flag}")
        elif damage.flag:
            files[-1] = f"done flag {damage.flag}"
        if files:
            print(f"      {'; '.join(files)}")
    if all(damage.flag for damage in report.damage):
        print("fix: delete the chunk and done flag files listed (paths inside the store), then rerun "
              "featurize() on the store: it recomputes just those units. Or featurize into a new store.")
    else:
        print("fix: featurize into a new store (some damage is outside the units featurize() recomputes); "
              "for the rest, deleting the chunk and done flag files listed and rerunning featurize() "
              "recomputes them.")


def _run_verify(args: argparse.Namespace) -> int:
    from .verify import verify_store

    report = verify_store(args.store, progress=not args.no_progress)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_verify(report)
    return 0 if report.ok else 1


# ---------------------------------------------------------------------- pipeline commands
_EXAMPLES = {
    "featurize": """example:
  srcproj featurize -c run.toml
  srcproj featurize -c run.toml --set store.proj_dim=512 --store small.zarr
  torchrun --standalone --nproc_per_node=4 -m srcproj featurize -c run.toml

Rerunning resumes: only the units not done yet are computed.""",
    "score": """example:
  srcproj score -c run.toml --queries test --out scores.zarr

Row q, column i of the (Q, N) float32 array is query q's score for training example i
(positive: including the example helps the query).""",
    "top-k": """example:
  srcproj top-k -c run.toml --queries test -k 10 --out top10.parquet

One row per query, direction (helpful, harmful) and rank, with the query's and the
training example's index, label and id columns, and the score.""",
    "self-influence": """example:
  srcproj self-influence -c run.toml --out self.csv

The training examples by decreasing self-influence (large: memorized, often
mislabeled), with index, label, id columns, self_influence and rank.""",
    "mislabeled": """example:
  srcproj mislabeled -c run.toml --out suspects.parquet
  srcproj mislabeled -c run.toml --detector self_influence --flag-fraction 0.05 --out suspects.csv

The training examples, most likely mislabeled first, with index, label, id columns,
suspicion (the detector's score), rank, one column per computed detector and, with
--flag-fraction, flagged. The default detector and how it was chosen: docs/mislabeled.md.""",
    "curate": """example:
  srcproj curate -c run.toml --validation val --aggregate mean --drop-fraction 0.05 --out keep.parquet
  srcproj curate -c run.toml --validation val --threshold 0 --out keep.csv

The training examples in data-set order with index, label, id columns, influence
(their aggregated score on the validation set), rank (1: the lowest) and keep.""",
}


def _pipeline_parser(commands: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
    width = max(40, min(shutil.get_terminal_size().columns, 100) - 2)  # the description wrapped as argparse would
    command = commands.add_parser(name, help=help, description=textwrap.fill(description, width),
                                  epilog=_EXAMPLES[name],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_argument("-c", "--config", required=True, metavar="FILE", help="the run's TOML config file")
    command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                         help="override a config key, e.g. --set store.proj_dim=512 (repeatable; the value is "
                         "read as TOML)")
    command.add_argument("--store", metavar="PATH", help="the store directory (overrides store.path)")
    command.add_argument("--batch-size", type=_positive_int, metavar="B",
                         help=f"examples per gradient batch (overrides {name.replace('-', '_')}.batch_size)")
    command.add_argument("--no-progress", action="store_true", help="hide the progress bar and the status lines "
                         "on stderr")
    return command


def _scoring_options(command: argparse.ArgumentParser, table: bool, segments: bool = True) -> None:
    command.add_argument("--out", metavar="PATH", help="where the result is written" + (
        ": .parquet or .csv" if table else ": a zarr array path"))
    command.add_argument("--overwrite", action="store_true", help="replace what is already at --out")
    if segments:
        command.add_argument("--segments", type=_segment_list, metavar="LIST",
                             help="segments whose terms are summed, e.g. 0,1 (default: those sharing segment 0's "
                             "data)")
    if table:
        command.add_argument("--format", choices=("parquet", "csv"), help="table format (default: from the suffix)")


def _segment_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of segment indices") from None


_NORMALIZE_HELP = ("raw or normalised scores: none (raw: the predicted effect of including the example), "
                   "train (divided by the norm of the training example's row) or both (also by the query's: a "
                   "cosine); overrides {key}.normalize")


def _add_pipeline_commands(commands: Any) -> None:
    featurize = _pipeline_parser(
        commands, "featurize", "compute a run's store: features, Hessians, spectra and caches (resumes)",
        "Build the model, task, data and trajectory the config file names, and featurize the run into its store. "
        "Rerunning resumes an interrupted store; under torchrun the work is shared by the processes.")
    featurize.set_defaults(handler=_run_featurize, section="featurize")

    score = _pipeline_parser(commands, "score", "write the dense (Q, N) scores of a query set to a zarr array",
                             "Score every query of a data set against every training example into a zarr array "
                             "(float32), streamed in a memory budget.")
    score.add_argument("--queries", metavar="NAME", help="the data set of [data] to score (overrides score.queries)")
    _scoring_options(score, table=False)
    score.add_argument("--normalize", choices=("none", "train", "both"), help=_NORMALIZE_HELP.format(key="score"))
    score.set_defaults(handler=_run_score, section="score")

    top = _pipeline_parser(commands, "top-k", "write the most helpful and harmful training examples of each query",
                           "The k most helpful and k most harmful training examples of every query, as a table.")
    top.add_argument("--queries", metavar="NAME", help="the data set of [data] to score (overrides top_k.queries)")
    top.add_argument("-k", type=_positive_int, metavar="K", help="examples per query and direction (top_k.k)")
    _scoring_options(top, table=True)
    top.add_argument("--normalize", choices=("none", "train", "both"), help=_NORMALIZE_HELP.format(key="top_k"))
    top.set_defaults(handler=_run_top_k, section="top_k")

    self_influence = _pipeline_parser(
        commands, "self-influence", "write every training example's score on itself (memorised, atypical examples)",
        "Every training example's score on itself, largest first, as a table.")
    _scoring_options(self_influence, table=True)
    self_influence.set_defaults(handler=_run_self_influence, section="self_influence")

    mislabeled = _pipeline_parser(
        commands, "mislabeled", "rank the training examples by how likely their labels are wrong",
        "Score every training example with srcproj's mislabel detector (default: the training loss averaged over "
        "the checkpoints; others: loss, self_influence, tracin, influence_function, fusion) and write them, most "
        "suspicious first, as a table.")
    mislabeled.add_argument("--detector", metavar="NAME", help="the detector ranked by (overrides "
                            "mislabeled.detector; default mean_loss)")
    mislabeled.add_argument("--flag-fraction", type=float, metavar="F",
                            help="add a flagged column marking this fraction, most suspicious first")
    _scoring_options(mislabeled, table=True, segments=False)
    mislabeled.set_defaults(handler=_run_mislabeled, section="mislabeled")

    curate = _pipeline_parser(
        commands, "curate", "rank training examples by their influence on a validation set; write keep masks",
        "Combine each training example's scores on a validation set into one influence (mean, total or worst "
        "case), drop a fraction or everything below a threshold, and write the keep mask as a table.")
    curate.add_argument("--validation", metavar="NAME", help="the data set of [data] (overrides curate.validation)")
    curate.add_argument("--aggregate", choices=("mean", "total", "worst"), help="how scores combine (default: mean)")
    rule = curate.add_mutually_exclusive_group()
    rule.add_argument("--drop-fraction", type=float, metavar="F", help="drop this fraction, lowest influence first")
    rule.add_argument("--threshold", type=float, metavar="T", help="drop the examples whose influence is below T")
    _scoring_options(curate, table=True)
    curate.set_defaults(handler=_run_curate, section="curate")


def _flag_overrides(args: argparse.Namespace) -> list:
    """The command's own flags as ``(dotted key, value)`` config overrides (after --set)."""
    section = args.section
    flags = {"store": "store.path", "batch_size": f"{section}.batch_size", "out": f"{section}.out",
             "segments": f"{section}.segments", "queries": f"{section}.queries", "k": f"{section}.k",
             "validation": f"{section}.validation", "aggregate": f"{section}.aggregate",
             "drop_fraction": f"{section}.drop_fraction", "threshold": f"{section}.threshold",
             "normalize": f"{section}.normalize", "detector": f"{section}.detector",
             "flag_fraction": f"{section}.flag_fraction", "max_queries": f"{section}.max_queries"}
    pairs = [(key, getattr(args, flag)) for flag, key in flags.items() if getattr(args, flag, None) is not None]
    fraction, threshold = getattr(args, "drop_fraction", None), getattr(args, "threshold", None)
    if fraction is not None or threshold is not None:
        # A curation rule on the command line replaces the file's rule, whichever it was.
        pairs.append((f"{section}.threshold" if fraction is not None else f"{section}.drop_fraction", None))
    return pairs


def _load(args: argparse.Namespace) -> Any:
    from .config import load_config

    return load_config(args.config, [*args.overrides, *_flag_overrides(args)])


def _status(message: str, args: argparse.Namespace) -> None:
    from .distributed import get_rank

    if not args.no_progress and get_rank() == 0:
        print(f"{_PROG} {args.command}: {message}", file=sys.stderr, flush=True)


def _needed(value: Any, key: str, flag: str) -> Any:
    if value is None:
        section, name = key.split(".")
        raise ConfigurationError(f"{key} is not set; give {flag}, or {name} = ... under [{section}] in the config")
    return value


def _run_featurize(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from .distributed import get_rank, init_from_torchrun

    config = _load(args)
    started = int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized()
    if started:
        init_from_torchrun()
    try:
        _status(f"building the run from {config.path}", args)
        attributor = config.attributor()
        began = time.perf_counter()
        report = attributor.featurize(batch_size=config.featurize.batch_size, progress=not args.no_progress)
        if get_rank() == 0:
            context = attributor.context
            done = report.feature_chunks_computed + report.cache_chunks_computed + report.hessians_computed
            what = "resumed, nothing to compute" if done == 0 and report.spectra_computed == 0 else "complete"
            print(f"featurized {config.store.path}: {what}; {len(context.checkpoint_segments)} checkpoints in "
                  f"{context.num_segments} segments, k={attributor.proj_dim}, {report.hessian_estimator} Hessian, "
                  f"{time.perf_counter() - began:.1f} s")
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def _open_run(config: Any, args: argparse.Namespace) -> Any:
    """The run's Attributor over its existing, complete store (scoring commands)."""
    _status(f"building the run from {config.path}", args)
    attributor = config.attributor(existing=True)
    try:
        attributor.require_featurized()
    except SrcprojError as exc:
        raise type(exc)(f"{exc} (from the shell: srcproj featurize -c {args.config})") from None
    return attributor


def _table_target(section: Any, args: argparse.Namespace) -> tuple[str, str]:
    from .tables import check_table_target

    out = _needed(section.out, f"{args.section}.out", "--out PATH")
    return out, check_table_target(out, getattr(args, "format", None), overwrite=args.overwrite)


def _training_columns(config: Any, attributor: Any, method: Any) -> dict:
    from .tables import example_columns

    segment = method.segments[0]
    source = attributor.context.source(segment)
    name = config.segment_data_name(segment)
    ids = config.data[name].ids if name in config.data else None
    return example_columns(source.data, attributor.task, ids=ids, what=source.what, source=source)


def _query_columns(config: Any, attributor: Any, name: str, where: str) -> dict:
    from .tables import example_columns

    return example_columns(config.dataset(name, where), attributor.task, ids=config.data[name].ids,
                           what=f"the data set {name!r}")


def _write(columns: dict, out: str, fmt: str, args: argparse.Namespace) -> int:
    from .tables import write_table

    write_table(columns, out, fmt, overwrite=args.overwrite)
    return len(next(iter(columns.values())))


def _run_score(args: argparse.Namespace) -> int:
    from .scoring import check_score_target

    config = _load(args)
    section = config.score
    name = _needed(section.queries, "score.queries", "--queries NAME")
    config.data_entry(name, "score.queries")
    out = _needed(section.out, "score.out", "--out PATH")
    store = config.store.path
    try:  # the checks that need no model come before building the run
        check_score_target(out, args.overwrite, store if "://" not in store else None)
    except SrcprojError as exc:  # name the flag, not the library's argument
        raise type(exc)(str(exc).replace("pass overwrite=True", "pass --overwrite")) from None
    attributor = _open_run(config, args)
    queries = config.dataset(name, "score.queries")
    _status(f"scoring the data set {name!r}", args)
    array = attributor.score(queries, section.segments, section.batch_size,
                             score_memory_bytes=section.score_memory_bytes, out=out, overwrite=args.overwrite,
                             normalize=section.normalize)
    print(f"wrote scores of shape {tuple(array.shape)} ({name!r} x training examples) to {out}")
    return 0


def _run_top_k(args: argparse.Namespace) -> int:
    from .tables import top_k_table

    config = _load(args)
    section = config.top_k
    name = _needed(section.queries, "top_k.queries", "--queries NAME")
    config.data_entry(name, "top_k.queries")
    out, fmt = _table_target(section, args)
    attributor = _open_run(config, args)
    method = attributor.source_method(section.segments, section.score_memory_bytes)
    queries = config.dataset(name, "top_k.queries")
    # The columns first: a wrong id column is reported before the scoring, not after it.
    query_columns = _query_columns(config, attributor, name, "top_k.queries")
    train_columns = _training_columns(config, attributor, method)
    _status(f"top {section.k} of the data set {name!r}", args)
    top = method.top_k(queries, section.k, section.batch_size, score_memory_bytes=section.score_memory_bytes,
                       normalize=section.normalize)
    columns = top_k_table(top, query_columns, train_columns)
    rows = _write(columns, out, fmt, args)
    print(f"wrote the top {top.helpful_indices.shape[1]} helpful and harmful training examples of "
          f"{top.helpful_indices.shape[0]:,} queries ({rows:,} rows, {fmt}"
          f"{'' if section.normalize == 'none' else f', scores normalized: {section.normalize}'}) to {out}")
    return 0


def _run_self_influence(args: argparse.Namespace) -> int:
    from .tables import self_influence_table

    config = _load(args)
    section = config.self_influence
    out, fmt = _table_target(section, args)
    attributor = _open_run(config, args)
    method = attributor.source_method(section.segments, section.score_memory_bytes)
    train_columns = _training_columns(config, attributor, method)  # checks the id columns before the scoring
    _status("scoring every training example on itself", args)
    values = method.self_influence(section.batch_size, score_memory_bytes=section.score_memory_bytes)
    rows = _write(self_influence_table(values, train_columns), out, fmt, args)
    print(f"wrote the self-influence of {rows:,} training examples ({fmt}, largest first) to {out}")
    return 0


def _run_mislabeled(args: argparse.Namespace) -> int:
    import numpy as np

    from .detection import DETECTORS, detect_mislabeled
    from .tables import example_columns, mislabel_table

    config = _load(args)
    section = config.mislabeled
    if section.detector not in DETECTORS:
        raise ConfigurationError(f"mislabeled.detector={section.detector!r}; choose one of {', '.join(DETECTORS)} "
                                 "(--detector NAME)")
    if section.flag_fraction is not None and not 0.0 < section.flag_fraction <= 1.0:
        raise ConfigurationError(f"mislabeled.flag_fraction={section.flag_fraction!r}; give a fraction in (0, 1] "
                                 "(--flag-fraction F)")
    out, fmt = _table_target(section, args)
    attributor = _open_run(config, args)
    source = attributor.context.source(attributor.context.selection([section.data_segment])[0])
    name = config.segment_data_name(section.data_segment)
    ids = config.data[name].ids if name in config.data else None
    train_columns = example_columns(source.data, attributor.task, ids=ids, what=source.what, source=source)
    _status(f"the {section.detector} detector on every training example", args)
    suspicion = detect_mislabeled(attributor, section.detector, components=section.components,
                                  data_segment=section.data_segment, damping=section.damping,
                                  batch_size=section.batch_size)
    columns = mislabel_table(suspicion, train_columns)
    if section.flag_fraction is not None:
        flagged = suspicion.mask(fraction=section.flag_fraction)
        columns["flagged"] = flagged[np.argsort(-np.asarray(suspicion.scores, dtype=np.float64), kind="stable")]
    rows = _write(columns, out, fmt, args)
    accuracy = "" if suspicion.training_accuracy is None else f", training accuracy {suspicion.training_accuracy:.3f}"
    print(f"wrote the mislabel suspicion of {rows:,} training examples (detector {suspicion.detector!r}{accuracy}; "
          f"{fmt}, most suspicious first) to {out}")
    return 0


def _run_curate(args: argparse.Namespace) -> int:
    from .curation import check_rule, curate
    from .scoring import REDUCTIONS
    from .tables import curation_table
    from .validation import check_choice

    config = _load(args)
    section = config.curate
    name = _needed(section.validation, "curate.validation", "--validation NAME")
    config.data_entry(name, "curate.validation")
    if section.drop_fraction is None and section.threshold is None:
        raise ConfigurationError("curate has no rule; give --drop-fraction F or --threshold T (or drop_fraction or "
                                 "threshold under [curate])")
    if section.drop_fraction is not None and section.threshold is not None:
        raise ConfigurationError("curate has two rules, drop_fraction and threshold; keep one of them under "
                                 "[curate] (a --drop-fraction or --threshold flag replaces the file's rule)")
    check_rule(section.drop_fraction, section.threshold)
    check_choice(section.aggregate, "curate.aggregate", REDUCTIONS)
    out, fmt = _table_target(section, args)
    attributor = _open_run(config, args)
    method = attributor.source_method(section.segments, section.score_memory_bytes)
    validation = config.dataset(name, "curate.validation")
    train_columns = _training_columns(config, attributor, method)  # checks the id columns before the scoring
    _status(f"the {section.aggregate} influence of every training example on {name!r}", args)
    result = curate(method, validation, aggregate=section.aggregate, drop_fraction=section.drop_fraction,
                    threshold=section.threshold, batch_size=section.batch_size,
                    score_memory_bytes=section.score_memory_bytes)
    _write(curation_table(result, train_columns), out, fmt, args)
    print(f"kept {int(result.keep.sum()):,} of {len(result.keep):,} training examples (dropped {result.rule}); "
          f"wrote the keep mask ({fmt}) to {out}")
    return 0


# ---------------------------------------------------------------------- report
_EXAMPLES["report"] = """example:
  srcproj report -c run.toml --queries test --out report.html
  srcproj report -c run.toml --queries test --validation val -k 5 --max-queries 20 --out report.html

One self-contained HTML file: each of the first queries beside its most helpful and
harmful training examples (images, passages or ids, with scores and labels), the
self-influence distribution with the flagged examples, and with --validation the
curation summary. Its figures need matplotlib: pip install 'srcproj[plots]'."""


def _add_report_command(commands: Any) -> None:
    report = _pipeline_parser(
        commands, "report", "write a self-contained HTML report of a run's attributions, for a person to read",
        "Score the first queries of a data set, every training example on itself and, with --validation, every "
        "training example's influence on a validation set; write what a person looks at as one HTML file with "
        "its figures embedded (docs/report.md).")
    report.add_argument("--queries", metavar="NAME", help="the data set of [data] whose queries are shown (overrides "
                        "report.queries)")
    report.add_argument("--validation", metavar="NAME", help="a data set of [data] to curate on, for the curation "
                        "summary (overrides report.validation)")
    report.add_argument("-k", type=_positive_int, metavar="K",
                        help="helpful and harmful examples per query (report.k, default 5)")
    report.add_argument("--max-queries", type=_positive_int, metavar="Q",
                        help="how many queries are shown, the first of the set (report.max_queries, default 20)")
    report.add_argument("--flag-fraction", type=float, metavar="F", help="the fraction of the training set flagged, "
                        "most suspicious first by the default mislabel detector (report.flag_fraction, default 0.02)")
    report.add_argument("--aggregate", choices=("mean", "total", "worst"),
                        help="how the validation scores combine (report.aggregate, default mean)")
    rule = report.add_mutually_exclusive_group()
    rule.add_argument("--drop-fraction", type=float, metavar="F",
                      help="curation drops this fraction, lowest influence first (default 0.05)")
    rule.add_argument("--threshold", type=float, metavar="T",
                      help="curation drops the examples whose influence is below T")
    report.add_argument("--out", metavar="PATH", help="the HTML file written (overrides report.out)")
    report.add_argument("--overwrite", action="store_true", help="replace the file already at --out")
    report.add_argument("--segments", type=_segment_list, metavar="LIST",
                        help="segments whose terms are summed, e.g. 0,1 (default: those sharing segment 0's data)")
    report.set_defaults(handler=_run_report, section="report")


def _run_report(args: argparse.Namespace) -> int:
    from .config import load_config
    from .curation import check_rule
    from .detection import detect_mislabeled
    from .report import (
        DEFAULT_DROP_FRACTION,
        check_report_target,
        compute_report,
        example_views,
        render_report,
        require_matplotlib,
        write_report,
    )
    from .scoring import REDUCTIONS
    from .validation import check_choice

    config = load_config(args.config, [*args.overrides, *_flag_overrides(args)])
    section = config.report
    name = _needed(section.queries, "report.queries", "--queries NAME")
    config.data_entry(name, "report.queries")
    validation_name, drop_fraction = section.validation, section.drop_fraction
    if validation_name is not None:  # the curation's settings, before any work
        config.data_entry(validation_name, "report.validation")
        check_choice(section.aggregate, "report.aggregate", REDUCTIONS)
        if drop_fraction is None and section.threshold is None:
            drop_fraction = DEFAULT_DROP_FRACTION
        check_rule(drop_fraction, section.threshold)
    else:
        unused = [key for key, value in (("drop_fraction", drop_fraction), ("threshold", section.threshold),
                                         ("aggregate", None if section.aggregate == "mean" else section.aggregate))
                  if value is not None]
        if unused:
            raise ConfigurationError(f"report.{', report.'.join(unused)} set the curation, which needs a validation "
                                     "set: give --validation NAME (report.validation), or leave them out")
    out = check_report_target(_needed(section.out, "report.out", "--out PATH"), args.overwrite)
    require_matplotlib()
    attributor = _open_run(config, args)
    method = attributor.source_method(section.segments, section.score_memory_bytes)
    queries = config.dataset(name, "report.queries")
    validation = None if validation_name is None else config.dataset(validation_name, "report.validation")
    # The columns and how the examples look first: a wrong id column, image shape or text key
    # is reported before the scoring, not after it.
    query_columns = _query_columns(config, attributor, name, "report.queries")
    train_columns = _training_columns(config, attributor, method)
    source = attributor.context.source(method.segments[0])
    look = {"task": attributor.task, "image_shape": section.image_shape, "text_key": section.text_key}
    sides = {"query": {"data": queries, "columns": query_columns, "what": f"the data set {name!r}"},
             "training": {"data": source.data, "columns": train_columns, "what": source.what, "source": source}}
    try:
        for side in sides.values():
            example_views(indices=[0], **side, **look)
    except ConfigurationError as exc:  # name the config key
        message = str(exc)
        raise ConfigurationError(f"report.{message}" if message.startswith(("image_shape", "text_key"))
                                 else message) from None
    suspicion = None
    if section.flag_fraction > 0:
        _status("the default mislabel detector's suspicion of every training example", args)
        suspicion = detect_mislabeled(attributor, components="used", data_segment=method.segments[0],
                                      batch_size=section.batch_size)
    results = compute_report(method, queries, k=section.k, max_queries=section.max_queries, suspicion=suspicion,
                             flag_fraction=section.flag_fraction, validation=validation, aggregate=section.aggregate,
                             drop_fraction=drop_fraction, threshold=section.threshold,
                             batch_size=section.batch_size, score_memory_bytes=section.score_memory_bytes,
                             progress=lambda message: _status(message, args))
    _status("drawing the report", args)
    query_views = example_views(indices=results.query_indices, **sides["query"], **look)
    training_views = example_views(indices=results.training_indices(), **sides["training"], **look)
    shown, flagged = len(results.query_indices), len(results.flagged)

    def where(path: str) -> str:  # under the working directory: relative to it
        relative = path if "://" in path else os.path.relpath(path)
        return path if relative.startswith("..") else relative

    summary = {
        "run": where(config.path),
        "store": where(config.store.path),
        "projection": f"k = {attributor.proj_dim}",
        "training examples": f"{len(train_columns['index']):,}",
        "queries": f"{name}: the first {shown:,} of {len(query_columns['index']):,}",
        "top-k": f"{section.k} helpful and {section.k} harmful training examples per query",
        "flagged": results.flag_rule,
        "validation": validation_name or "none (no curation summary)",
    }
    document = render_report(results, query_views, training_views, summary=summary,
                             title=f"srcproj report: {os.path.basename(config.path)}",
                             validation_name=validation_name,
                             footer=f"srcproj {__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    size = write_report(document, out, overwrite=args.overwrite)
    curation = results.curation
    curated = "" if curation is None else (f", the curation on {validation_name!r} (kept "
                                           f"{int(curation.keep.sum()):,} of {len(curation.keep):,})")
    print(f"wrote the report of {shown:,} queries (top {section.k}), {flagged:,} flagged training examples"
          f"{curated} ({format_bytes(size)}) to {out}")
    return 0


# ---------------------------------------------------------------------- entry
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``srcproj`` command line; return the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 when ``srcproj verify`` finds damage, 2 for a usage error or an
        error srcproj reports, 130 when interrupted.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits for --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        return args.handler(args)
    except SrcprojError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{_PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # A store keeps every finished unit, so stopping is safe; say so.
        print(f"{_PROG}: interrupted (a store resumes where it stopped)", file=sys.stderr)
        return 130
