"""Featurization speed on one CUDA GPU: srcproj's projections against official TRAK.

The models and inputs of ``benchmarks/featurize.py`` (an MLP of 1,068,810 parameters
and a CNN of 421,642), k = 1024, one checkpoint, all in one process:

* srcproj ``Attributor.checkpoint_features(0, kind="loss", batch_size=B)`` (per-example
  gradients and their projection for every example, rows copied back to the host) with

  - ``RademacherProjector`` with its default 1 GiB tile cache (past it, tiles are
    regenerated on the CPU for every batch) and with a cache that holds the whole
    matrix (``cache_bytes=16 GiB``);
  - ``FastJLProjector`` (fast-jl, 128 feature tiles);
  - ``KroneckerProjector`` (factored);

* official TRAK 0.3.2 (``traker``) with its GPU default projector (``CudaProjector``,
  fast-jl), in float32 (``use_half_precision=False``, like srcproj) and in its
  float16 default; the timed part is the ``TRAKer.featurize`` loop.

Each configuration runs twice on the same objects: "first" includes generating and
caching the matrix (srcproj) and every allocation; "again" is a second pass, what every
further checkpoint costs. Throughput is examples × checkpoints per second; peak GPU
memory is ``torch.cuda.max_memory_allocated`` over both passes. The GEMM line times the
bare ``(B × p) @ (p × k)`` float32 product on random data: no dense projection can beat it.

    python benchmarks/featurize_gpu.py                  # a few minutes on one H100/H200
    python benchmarks/featurize_gpu.py --examples 1024 --models cnn
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402 - after the sys.path set-up above
from featurize import _data, _model  # noqa: E402


def _sync() -> None:
    torch.cuda.synchronize()


def _srcproj(name: str, x, y, k: int, batch: int, projection: str) -> dict:
    from srcproj import (
        Attributor,
        ClassificationTask,
        FastJLProjector,
        KroneckerProjector,
        RademacherProjector,
        Segment,
        Trajectory,
    )

    model = _model(name).cuda()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    projector = {
        "dense, 1 GiB cache": lambda: RademacherProjector(k, seed=0),
        "dense, full cache": lambda: RademacherProjector(k, seed=0, cache_bytes=16 << 30),
        "fast-jl": lambda: FastJLProjector(k, seed=0),
        "factored": lambda: KroneckerProjector(k, seed=0),
    }[projection]()
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        traj = Trajectory([Segment([state], steps=1, lr=0.1, data=(x, y))])
        attr = Attributor(model, ClassificationTask(), traj, os.path.join(tmp, "s.zarr"), proj_dim=k, seed=0,
                          projector=projector, hessian="empirical", feature_dtype="float32", chunk_size=4096,
                          device="cuda")
        for _ in range(2):
            _sync()
            start = time.perf_counter()
            rows = attr.checkpoint_features(0, kind="loss", batch_size=batch)
            _sync()
            times.append(time.perf_counter() - start)
        assert rows.shape == (len(x), k) and bool(abs(rows).sum() > 0)
    return {"seconds": times}


def _trak(name: str, x, y, k: int, batch: int, half: bool) -> dict:
    from trak import TRAKer
    from trak_official import _quiet_trak

    model = _model(name).cuda()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    xs, ys = x.cuda(), y.cuda()
    times = []
    with tempfile.TemporaryDirectory() as tmp, _quiet_trak():
        traker = TRAKer(model=model, task="image_classification", train_set_size=2 * len(x), save_dir=tmp,
                        load_from_save_dir=True, device="cuda", proj_dim=k, use_half_precision=half,
                        logging_level=logging.ERROR)
        traker.load_checkpoint(state, model_id=0)
        for _ in range(2):
            _sync()
            start = time.perf_counter()
            for lo in range(0, len(x), batch):
                traker.featurize(batch=(xs[lo:lo + batch], ys[lo:lo + batch]), num_samples=len(xs[lo:lo + batch]))
            _sync()
            times.append(time.perf_counter() - start)
        projector = type(traker.projector).__name__
    return {"seconds": times, "projector": projector}


def _gemm_rate(p: int, k: int, batch: int) -> float:
    """Seconds per example of the bare float32 (B × p) @ (p × k) product."""
    a = torch.randn(batch, p, device="cuda")
    b = torch.randn(p, k, device="cuda") / k ** 0.5
    for _ in range(3):
        a @ b
    _sync()
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    _sync()
    return (time.perf_counter() - start) / reps / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--slow-examples", type=int, default=1024,
                        help="examples for the dense run with the default 1 GiB cache (CPU-bound past it)")
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("featurize_gpu.py needs a CUDA GPU; benchmarks/featurize.py is the CPU benchmark")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32, for both tools
    torch.backends.cudnn.allow_tf32 = False
    have_fast_jl = importlib.util.find_spec("fast_jl") is not None
    have_trak = importlib.util.find_spec("trak") is not None
    k = args.proj_dim
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, k = {k}, "
          f"fast-jl {'installed' if have_fast_jl else 'missing'}, traker {'installed' if have_trak else 'missing'}")
    results = []
    for name in args.models:
        p = sum(t.numel() for t in _model(name).parameters())
        configs = []
        for batch in args.batches:
            configs += [("srcproj", "dense, full cache", batch), ("srcproj", "fast-jl", batch),
                        ("srcproj", "factored", batch), ("TRAK", "fast-jl float32", batch),
                        ("TRAK", "fast-jl float16", batch)]
        configs.append(("srcproj", "dense, 1 GiB cache", max(args.batches)))
        print(f"\n{name}: {p:,} parameters; bare float32 GEMM (B × p) @ (p × k): "
              + ", ".join(f"B={b}: {1 / _gemm_rate(p, k, b):,.0f} ex/s" for b in args.batches))
        print(f"{'tool':8} {'projection':22} {'batch':>5} {'first ex/s':>11} {'again ex/s':>11} {'peak GPU':>10}")
        for tool, projection, batch in configs:
            if ("fast-jl" in projection and not have_fast_jl) or (tool == "TRAK" and not have_trak):
                continue
            n = args.slow_examples if projection == "dense, 1 GiB cache" else args.examples
            x, y = _data(name, n)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                if tool == "srcproj":
                    out = _srcproj(name, x, y, k, batch, projection)
                else:
                    out = _trak(name, x, y, k, batch, half="float16" in projection)
            except Exception as exc:  # noqa: BLE001 -- report and go on with the other configurations
                print(f"{tool:8} {projection:22} {batch:5d} failed: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            out.update(model=name, params=p, tool=tool, projection=projection, batch=batch, examples=n,
                       peak_gpu=torch.cuda.max_memory_allocated(),
                       rates=[n / s for s in out["seconds"]])
            results.append(out)
            print(f"{tool:8} {projection:22} {batch:5d} {out['rates'][0]:11,.0f} {out['rates'][1]:11,.0f} "
                  f"{out['peak_gpu'] / 2**20:8,.0f} MiB" + (f"  ({out['projector']})" if "projector" in out else ""),
                  flush=True)
        print("ratios, second pass, srcproj / TRAK float32 at the same batch:")
        for batch in args.batches:
            trak = [r for r in results if r["model"] == name and r["tool"] == "TRAK" and r["batch"] == batch
                    and r["projection"] == "fast-jl float32"]
            if not trak:
                continue
            for r in results:
                if r["model"] == name and r["tool"] == "srcproj" and r["batch"] == batch:
                    print(f"  batch {batch:4d} {r['projection']:22} {r['rates'][1] / trak[0]['rates'][1]:6.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
