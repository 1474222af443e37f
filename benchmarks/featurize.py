"""Featurization speed and memory: srcproj against the official TRAK library, on CPU.

Same model, same k, same examples, one checkpoint, in one run:

* models: an MLP 784-1024-256-10 (1,068,810 parameters) on synthetic 784-dim inputs,
  and a small CNN (conv 1→32 3×3, pool, conv 32→64 3×3, pool, linear 3136→128→10;
  421,642 parameters) on synthetic 1×28×28 inputs; the weights are their seeded
  initialisation (the speed does not depend on training);
* srcproj, dense projection (``RademacherProjector``, the default, 1 GiB tile cache) at
  batch 64 (``featurize``'s default) and 256, and factored projection
  (``KroneckerProjector``) at batch 256; the timed part is the public
  ``Attributor.checkpoint_features(0, kind="loss", batch_size=B)`` on a fresh store:
  per-example training-loss gradients and their projection for every example, streamed
  in batches, nothing else (no Hessian, no store writes);
* official TRAK 0.3.2 (``traker``) with its own CPU default projector
  (``TRAKer(projector=None)``: a normal matrix in blocks of 100 columns, regenerated for
  every batch), ``use_half_precision=False`` (float32 like srcproj; TRAK's float16 path
  is not usable on CPU); the timed part is the ``TRAKer.featurize`` loop (margin
  gradients, projection, out-to-loss terms, writes to its memory-mapped store). TRAK
  has no default batch size of its own: "default" is 64, what
  ``benchmarks/trak_official.py`` and srcproj's ``featurize`` use. "max batch" is the
  largest batch whose predicted peak memory fits srcproj's larger dense run (batch
  256): TRAK's peak RSS is measured at two batch sizes (one batch each) and
  extrapolated linearly.
* the bare float32 product ``(B × p) @ (p × k)`` on random data at the larger batch: the
  floor of any dense projection (both tools compute it); every rate is also printed as a
  share of it;
* srcproj's peak memory of a whole ``Attributor.featurize()`` (``hessian="empirical"``,
  float16 store, chunks of 1,024 rows) at two training-set sizes, for the factored and
  the dense projection: apart from the training set that this script holds in memory
  (printed), it does not grow with N.

Every configuration runs in its own subprocess; its peak memory is the child's VmHWM
(peak resident set) from /proc/self/status, read at its end. Throughput is examples ×
checkpoints per second of the timed part.

    python benchmarks/featurize.py                      # about 15-25 min on 2 cores
    python benchmarks/featurize.py --examples 128 --models cnn --skip-trak-max   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing


# ---------------------------------------------------------------------------- child side
def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _model(name: str):
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "mlp":
            return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10))
        if name == "cnn":
            return nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
            )
    raise ValueError(name)


def _data(name: str, n: int):
    import torch

    generator = torch.Generator().manual_seed(1)
    shape = (n, 784) if name == "mlp" else (n, 1, 28, 28)
    return torch.randn(*shape, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def _child(config: dict) -> dict:
    import torch

    torch.manual_seed(0)
    model = _model(config["model"])
    x, y = _data(config["model"], config["examples"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    k, batch = config["proj_dim"], config["batch"]
    result = {"threads": torch.get_num_threads()}
    if config["tool"] == "gemm":
        # The floor of any dense projection: the bare float32 (B × p) @ (p × k) product.
        p = sum(t.numel() for t in model.parameters())
        a, b = torch.randn(batch, p), torch.randn(p, k)
        a @ b
        reps = max(2, len(x) // batch)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        result["seconds"] = (time.perf_counter() - start) * len(x) / (reps * batch)
    elif config["tool"] == "srcproj":
        from srcproj import Attributor, ClassificationTask, KroneckerProjector, Segment, Trajectory

        projector = KroneckerProjector(k, seed=0) if config["projection"] == "factored" else None
        with tempfile.TemporaryDirectory() as tmp:
            traj = Trajectory([Segment([state], steps=1, lr=0.1, data=(x, y))])
            attr = Attributor(model, ClassificationTask(), traj, os.path.join(tmp, "s.zarr"), proj_dim=k,
                              seed=0, projector=projector, hessian="empirical",
                              feature_dtype=config.get("feature_dtype", "float32"), chunk_size=1024)
            start = time.perf_counter()
            if config["what"] == "features":
                rows = attr.checkpoint_features(0, kind="loss", batch_size=batch)
                assert rows.shape == (len(x), k) and bool(abs(rows).sum() > 0)
            else:  # the whole pipeline into the store
                attr.featurize(batch_size=batch, progress=False)
            result["seconds"] = time.perf_counter() - start
            if projector is not None:
                result["layout"] = [(e["module"], e["k_out"], e["k_in"]) for e in projector.describe()["layers"]]
    else:
        import logging

        from trak import TRAKer
        sys.path.insert(0, HERE)
        from trak_official import _quiet_trak

        with tempfile.TemporaryDirectory() as tmp, _quiet_trak():
            traker = TRAKer(model=model, task="image_classification", train_set_size=len(x), save_dir=tmp,
                            load_from_save_dir=True, device="cpu", proj_dim=k, use_half_precision=False,
                            logging_level=logging.ERROR)
            traker.load_checkpoint(state, model_id=0)
            start = time.perf_counter()
            for lo in range(0, len(x), batch):
                traker.featurize(batch=(x[lo:lo + batch], y[lo:lo + batch]), num_samples=len(x[lo:lo + batch]))
            result["seconds"] = time.perf_counter() - start
            result["projector"] = f"{type(traker.projector).__name__}({traker.projector.proj_type}, " \
                                  f"block_size={traker.projector.block_size})"
    result["peak_rss"] = _peak_rss()
    result["data_bytes"] = x.numel() * x.element_size() + y.numel() * y.element_size()  # held by this script
    result["rate"] = len(x) / result["seconds"]
    return result


# ---------------------------------------------------------------------------- parent side
def _run(config: dict, timeout: float) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)],
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{config}: child failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1024, help="training examples featurized per run")
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--batch", type=int, default=64, help="srcproj's default batch and TRAK's default batch")
    parser.add_argument("--large-batch", type=int, default=256,
                        help="srcproj's larger batch (dense and factored); TRAK's max batch fits its memory")
    parser.add_argument("--sizes", type=int, nargs=2, default=[2000, 16000],
                        help="training-set sizes of srcproj's memory runs (factored projection)")
    parser.add_argument("--dense-sizes", type=int, nargs=2, default=[256, 1024],
                        help="training-set sizes of srcproj's memory runs with the dense projection")
    parser.add_argument("--memory-only", action="store_true", help="only srcproj's memory against N")
    parser.add_argument("--skip-trak-max", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {platform.python_version()}; load average {_loadavg()}")
    print(f"k = {args.proj_dim}, {args.examples} training examples, 1 checkpoint; rates are examples x "
          "checkpoints per second of the timed part; memory is each subprocess's peak RSS\n")
    summary = []
    for name in ([] if args.memory_only else args.models):
        base = {"model": name, "examples": args.examples, "proj_dim": args.proj_dim, "what": "features"}
        params = sum(p.numel() for p in _model(name).parameters())
        print(f"== {name}: {params:,} parameters")
        runs = {}
        for b in sorted({args.batch, args.large_batch}):
            runs[f"srcproj dense, batch {b}"] = _run({**base, "tool": "srcproj", "projection": "dense", "batch": b},
                                                     args.timeout)
        runs[f"srcproj factored, batch {args.large_batch}"] = _run(
            {**base, "tool": "srcproj", "projection": "factored", "batch": args.large_batch}, args.timeout)
        runs[f"TRAK default, batch {args.batch}"] = _run({**base, "tool": "trak", "batch": args.batch}, args.timeout)
        if not args.skip_trak_max:
            # TRAK's peak memory at two batch sizes (one batch each), extrapolated linearly.
            small, large = 16, 128
            probes = [_run({**base, "examples": b, "tool": "trak", "batch": b}, args.timeout)["peak_rss"]
                      for b in (small, large)]
            per_example = max((probes[1] - probes[0]) / (large - small), 1.0)
            budget = max(r["peak_rss"] for n, r in runs.items() if n.startswith("srcproj dense"))
            fit = int((budget - probes[0]) / per_example) + small
            best = max(1, min(args.examples, fit))
            print(f"   TRAK peak RSS {_mib(probes[0])} at batch {small}, {_mib(probes[1])} at {large}: "
                  f"{per_example / 2**20:.2f} MiB per example; srcproj dense peaked at {_mib(budget)} (its larger) "
                  f"-> batch {best}{' (capped at the number of examples)' if fit > args.examples else ''}")
            runs[f"TRAK max batch, {best}"] = _run({**base, "tool": "trak", "batch": best}, args.timeout)
        runs[f"bare GEMM, batch {args.large_batch}"] = _run(
            {**base, "tool": "gemm", "batch": args.large_batch}, args.timeout)
        trak = runs[f"TRAK default, batch {args.batch}"]["rate"]
        gemm = runs[f"bare GEMM, batch {args.large_batch}"]["rate"]
        trak_max = next((r["rate"] for n, r in runs.items() if n.startswith("TRAK max")), None)
        for label, r in runs.items():
            ratios = f"{r['rate'] / gemm:6.0%} of GEMM, {r['rate'] / trak:7.2f}x TRAK default"
            if trak_max is not None:
                ratios += f", {r['rate'] / trak_max:7.2f}x TRAK max batch"
            extra = r.get("projector") or (f"layout (module, k_out, k_in): {r['layout']}" if "layout" in r else "")
            print(f"   {label:<27} {r['rate']:10.1f} ex/s  {r['seconds']:8.1f} s  peak {_mib(r['peak_rss']):>10}  "
                  f"{ratios}  {extra}")
            summary.append({"model": name, "config": label, **r})
        print()
    # Memory against N: the whole featurize pipeline (store writes, empirical Hessian,
    # eigendecomposition, caches) streams in chunks, so peak memory is set by the batch and k.
    # The training set itself is held in memory by this script (a user's Dataset need not be).
    name = args.models[0]
    print(f"== srcproj peak memory of a whole featurize() against N ({name}, k = {args.proj_dim}, float16 store, "
          "hessian='empirical', chunk_size 1024); 'data' is the training set this script holds in memory")
    runs = (("factored", args.sizes, args.large_batch), ("dense", args.dense_sizes, args.batch))
    for projection, sizes, batch in runs:
        for n in sizes:
            r = _run({"model": name, "examples": n, "proj_dim": args.proj_dim, "what": "featurize",
                      "tool": "srcproj", "projection": projection, "batch": batch,
                      "feature_dtype": "float16"}, args.timeout)
            print(f"   {projection:<8} batch {batch:>4}, N = {n:>7,}: peak {_mib(r['peak_rss']):>10}, data "
                  f"{_mib(r['data_bytes']):>8}, peak - data {_mib(r['peak_rss'] - r['data_bytes']):>10}; "
                  f"featurize() {r['seconds']:.1f} s")
            summary.append({"model": name, "config": f"featurize {projection} N={n}", **r})
    print(f"\nload average at the end: {_loadavg()}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
