"""Featurize speed and memory on a GPT-2-small-sized language model (the featurize stage, defaults).

    python benchmarks/lm_featurize.py                       # N = 16 and 32, dense and factored
    python benchmarks/lm_featurize.py --sizes 16 32 64 --projections dense

A GPT-2 with GPT-2 small's config (12 layers, width 768, vocabulary 50,257, about
124 M parameters, tied embeddings; random initial weights: nothing is downloaded),
sequences of ``--length`` (128) random token ids, one segment of ``--checkpoints`` (2)
checkpoints. Each (projection, N) runs in a fresh subprocess, which builds the
Attributor and runs ``featurize()`` with its defaults (k = 2048, the ``fisher``
Gauss-Newton Hessian) and reports the wall time of the featurize stage (building the
Attributor, which reads and hashes every checkpoint, plus every step of featurize;
scoring is not timed), throughput in
sequences × checkpoints per second, and the process's peak resident memory
(``ru_maxrss``), which should stay flat as N grows: features stream to the store chunk
by chunk.

- ``dense``: the default ``RademacherProjector`` on an AdamW run (checkpoints carry the
  optimizer's state; the preconditioner is applied exactly).
- ``factored``: ``KroneckerProjector`` (Conv1D layers through their input and output
  factors). The factored projection cannot apply Adam's elementwise preconditioner, so
  this run is described as SGD (the optimizer state is not read): it measures the
  projection's own speed, not an AdamW attribution.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time


def child(projection: str, count: int, length: int, checkpoints: int, batch: int, folder: str,
          tiny: bool = False) -> dict:
    import torch
    import transformers

    from srcproj import SGD, Attributor, KroneckerProjector, LanguageModelTask, Segment, Trajectory

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = (transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=256) if tiny
              else transformers.GPT2Config())  # GPT-2 small's: 12 layers, width 768, vocabulary 50,257
    model = transformers.GPT2LMHeadModel(config).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (count, length), generator=torch.Generator().manual_seed(1))
    data = (ids, ids.clone())
    saved = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    for c in range(checkpoints):  # real optimizer steps, so the state is Adam's own
        optimizer.zero_grad()
        model(input_ids=ids[:2], labels=ids[:2]).loss.backward()
        optimizer.step()
        path = os.path.join(folder, f"checkpoint{c}.pt")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        saved.append(path)
    del optimizer
    model.zero_grad(set_to_none=True)
    task = LanguageModelTask()
    if projection == "dense":
        trajectory = Trajectory([Segment(saved, 100, 1e-4, data)], optimizer=torch.optim.AdamW(
            model.parameters(), lr=1e-4, weight_decay=0.01))
        kwargs = {}
    else:
        trajectory = Trajectory([Segment([torch.load(p, weights_only=True)["model"] for p in saved], 100, 1e-4,
                                         data)], optimizer=SGD(weight_decay=0.01))
        kwargs = {"projector": KroneckerProjector(2048, seed=0)}
    began = time.perf_counter()
    attributor = Attributor(model, task, trajectory, os.path.join(folder, "store.zarr"), **kwargs)
    built = time.perf_counter() - began
    report = attributor.featurize(batch_size=batch, progress=False)
    seconds = time.perf_counter() - began
    return {"projection": projection, "sequences": count, "length": length, "checkpoints": checkpoints,
            "parameters": params, "proj_dim": attributor.proj_dim, "hessian": attributor.hessian,
            "seconds": seconds, "build_seconds": built, "featurize_seconds": report.seconds,
            "throughput": count * checkpoints / seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--projections", nargs="+", default=["dense", "factored"], choices=("dense", "factored"))
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer toy config: checks the script in seconds")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        projection, count = args.child.split(":")
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(child(projection, int(count), args.length, args.checkpoints, args.batch, folder,
                                   args.tiny)))
        return
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows = []
    for projection in args.projections:
        for count in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--child", f"{projection}:{count}", "--length",
                                  str(args.length), "--checkpoints", str(args.checkpoints), "--batch", str(args.batch),
                                  *(["--tiny"] if args.tiny else [])],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{projection:<9} N={count:<4} {row['seconds']:8.1f} s  {row['throughput']:6.2f} seq×ckpt/s  "
                  f"peak {row['peak_rss_gib']:.2f} GiB  (k = {row['proj_dim']}, {row['hessian']}, "
                  f"{row['parameters'] / 1e6:.0f} M parameters; building {row['build_seconds']:.1f} s)", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
