"""The ``srcproj`` command line: ``srcproj demo``, ``srcproj info STORE`` and ``srcproj verify STORE``.

Errors srcproj raises on purpose (:class:`~srcproj.errors.SrcprojError`) are printed
as one line, ``srcproj: error: ...``, with exit status 2: they are the user's to fix
and a traceback would only hide the message. Anything else is a bug and keeps its
traceback. ``srcproj verify`` exits with 1 when it finds damage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .demo import format_bytes
from .errors import SrcprojError, StoreMismatchError

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
