"""Streamed scoring against this machine's plain float32 matrix-multiply rate.

Synthetic float32 cache rows (N × k) are written once into a real srcproj store (a
zarr v3 group with srcproj metadata, the store's codecs: blosc zstd + crc32c, chunks of
``--chunk`` rows), then, in the same run:

(a) ``matmul``: plain torch float32 ``(-Ψ) Tᵀ`` on the same shapes held in memory, in
    the same blocks of rows that srcproj uses, into a reused output buffer;
(b) ``top-k``: srcproj's streamed top-k (helpful and harmful) over the store, as
    ``Attributor.top_k`` runs it, and, with ``--compare-prefetch``, also with the
    reader thread that decompresses the next block during the matmul (``prefetch``);
(c) ``zarr``: with ``--zarr-out``, all scores written to a zarr array.

Each prints its wall time, GFLOP/s (2·Q·N·k flops) and the ratio to (a). (a) and (b)
alternate ``--repeat`` times, so both see the same machine load; the ratio uses the
best time of each. The issue's goal: (b) at ≥ 70% of (a).

    python benchmarks/score.py                      # 10,000 × 100,000 × k=1024 (~400 MB store)
    python benchmarks/score.py --train 20000        # a smaller run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import zarr

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from srcproj import layout as names
from srcproj.scoring import (
    DEFAULT_MEMORY_BYTES,
    Queries,
    plan_top_k,
    read_only,
    score_to_array,
    store_cache,
    top_k,
)
from srcproj.store import AttributionStore, compressors

ARRAY = names.cache(0)


def make_store(path: str, num_rows: int, dim: int, chunk: int, seed: int) -> float:
    """A srcproj-like store holding synthetic float32 cache rows; seconds spent (0 if reused)."""
    meta = {"format": 1, "synthetic": True, "rows": num_rows, "proj_dim": dim, "chunk_size": chunk, "seed": seed}
    if os.path.exists(os.path.join(path, "zarr.json")):
        group = zarr.open_group(path, mode="r")
        if dict(group.attrs.get("srcproj", {})) == meta and ARRAY in group:
            return 0.0
        shutil.rmtree(path)
    began = time.perf_counter()
    group = zarr.open_group(path, mode="w", zarr_format=3)
    array = group.create_array(ARRAY, shape=(num_rows, dim), chunks=(chunk, dim), dtype="float32",
                               compressors=compressors(), fill_value=0)
    rng = np.random.default_rng(seed)
    step = max(chunk, (64 << 20) // (dim * 4) // chunk * chunk)
    for start in range(0, num_rows, step):
        stop = min(start + step, num_rows)
        # Cache rows shrink like 1/N; the scale does not change the speed.
        array[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32) * 1e-3
    group.attrs["srcproj"] = meta  # written last: a store interrupted while filling is rebuilt
    return time.perf_counter() - began


def matmul_rate(psi: torch.Tensor, table: torch.Tensor, block_rows: int) -> float:
    """Seconds for ``(-Ψ) Tᵀ`` in blocks of ``block_rows`` rows, held in memory."""
    negated = psi.neg()
    q = psi.shape[0]
    buffer = torch.empty(q * block_rows, dtype=psi.dtype)
    began = time.perf_counter()
    for start in range(0, table.shape[0], block_rows):
        block = table[start:start + block_rows]
        torch.mm(negated, block.T, out=buffer[: q * block.shape[0]].view(q, block.shape[0]))
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--train", type=int, default=100_000, help="training rows N")
    parser.add_argument("--dim", type=int, default=1024, help="projected dimension k")
    parser.add_argument("--chunk", type=int, default=1024, help="store chunk rows")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--memory-bytes", type=int, default=DEFAULT_MEMORY_BYTES)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--repeat", type=int, default=2, help="alternations of (a) and (b)")
    parser.add_argument("--store", default=None, help="where to keep the synthetic store (reused when it "
                        "matches); default: a temporary directory, deleted afterwards")
    parser.add_argument("--zarr-out", action="store_true", help="also time (c), scores into a zarr array")
    parser.add_argument("--compare-prefetch", action="store_true", help="also time (b) with the reader thread")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"Q={args.queries:,} N={args.train:,} k={args.dim} chunk={args.chunk} top-k={args.topk} "
          f"budget={args.memory_bytes:,} bytes")
    workdir = tempfile.mkdtemp(prefix="srcproj-score-")
    path = args.store or os.path.join(workdir, "store.zarr")
    try:
        built = make_store(path, args.train, args.dim, args.chunk, seed=0)
        store = AttributionStore.read(path)
        print(f"store: {path} ({f'built in {built:.1f} s' if built else 'reused'}, "
              f"{store.nbytes_stored() / 1e6:,.0f} MB on disk, {args.train * args.dim * 4 / 1e6:,.0f} MB raw)")
        cache = store_cache(read_only(store), [ARRAY], "float32")
        rng = np.random.default_rng(1)
        psi = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
        queries = Queries.of(psi)
        flops = 2.0 * args.queries * args.train * args.dim

        # The blocks srcproj's top-k uses, so that (a) multiplies the same shapes.
        plan = plan_top_k(args.queries, cache, args.topk, args.memory_bytes)
        print(f"blocks: {plan.query_rows:,} queries × {plan.block_rows:,} rows "
              f"({len(plan.query_batches())} × {len(plan.row_blocks())})")
        table = torch.from_numpy(cache.read(0, args.train))
        psi_t = torch.from_numpy(psi)

        figures: dict = {"threads": torch.get_num_threads(), "queries": args.queries, "train": args.train,
                         "dim": args.dim, "chunk": args.chunk, "topk": args.topk,
                         "memory_bytes": args.memory_bytes, "block_rows": plan.block_rows,
                         "query_rows": plan.query_rows, "runs": []}

        def record(label: str, seconds: float) -> None:
            figures["runs"].append({"what": label, "seconds": seconds, "gflops": flops / seconds / 1e9})
            print(f"  {label:<22} {seconds:8.2f} s  {flops / seconds / 1e9:7.1f} GFLOP/s", flush=True)

        variants = [("top-k", False)] + ([("top-k, prefetch", True)] if args.compare_prefetch else [])
        result = None
        for repeat in range(args.repeat):
            record("(a) matmul", matmul_rate(psi_t, table, plan.block_rows))
            for label, prefetch in variants[::-1] if repeat % 2 else variants:  # no order bias
                began = time.perf_counter()
                result = top_k(queries, cache, args.topk, args.memory_bytes, prefetch=prefetch)
                record(f"(b) {label}", time.perf_counter() - began)
        del table
        if args.zarr_out:
            out = os.path.join(workdir, "scores.zarr")
            began = time.perf_counter()
            written = score_to_array(queries, cache, out, args.memory_bytes, overwrite=True,
                                     local_root=os.path.abspath(out))
            record("(c) zarr scores", time.perf_counter() - began)
            figures["zarr_bytes"] = sum(os.path.getsize(os.path.join(r, f))
                                        for r, _, files in os.walk(out) for f in files)
            assert written.attrs["srcproj_scores"]["complete"]
            shutil.rmtree(out)

        # A spot check: query 0's best row against a direct computation.
        direct = -(psi[0].astype(np.float64) @ cache.read(0, args.train).astype(np.float64).T)
        assert int(result.helpful_indices[0, 0]) == int(np.argmax(direct)), "top-k disagrees with a direct argmax"

        best = {}
        for run in figures["runs"]:
            best[run["what"]] = min(best.get(run["what"], np.inf), run["seconds"])
        base = best["(a) matmul"]
        print("best of each, ratio of its rate to (a):")
        for what, seconds in best.items():
            print(f"  {what:<22} {seconds:8.2f} s  {flops / seconds / 1e9:7.1f} GFLOP/s  {base / seconds:6.1%}")
        figures["best_seconds"] = best
        figures["ratio_topk"] = base / best["(b) top-k"]
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(figures, handle, indent=2)
        return figures
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
