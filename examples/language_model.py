"""Language model: which training passages taught a small GPT-2 to complete a prompt?

Builds a 2-layer GPT-2 from a config (random weights; ``transformers`` is the ``hf``
extra), trains it with AdamW and a decaying learning rate on passages of English prose
that ship with Python (``pydoc_data.topics``, read character by character: nothing is
downloaded), records the run with a ``TrajectoryRecorder``, featurizes the training
passages with SOURCE and prints, for a few held-out prompts, the training passages that
most raised (and lowered) the log-probability of their completions. A few minutes on
two CPU cores.

    python examples/language_model.py [--store PATH] [--run DIR] [--proj-dim K]

The examples are what a tokenizer gives (dicts of ``input_ids`` and
``attention_mask``, of different lengths); a query's ``labels`` are −100 over its
prompt, so only the completion is attributed.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from srcproj import Attributor, LanguageModelTask, Trajectory, TrajectoryRecorder
from srcproj.text_demo import completion_queries, decode, load_prose_passages, make_tiny_gpt2, passage_examples

STEPS, BATCH, PEAK_LR = 800, 16, 6e-3


def main(store: str, run: str, proj_dim: int) -> None:
    torch.manual_seed(0)
    passages = load_prose_passages(404, length=48, seed=0)
    train_texts, held_out = passages[:400], passages[400:]
    train = passage_examples(train_texts)
    model = make_tiny_gpt2(seed=0)
    task = LanguageModelTask()  # Hugging Face's loss: the mean over a batch's target tokens

    # 1. Train with AdamW (decay on the weights only), recorded as it runs: 800 steps in
    #    two segments of two checkpoints each, every step's learning rate, the data's fingerprint.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=PEAK_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - 0.9 * step / STEPS)
    recorder = TrajectoryRecorder(model, optimizer, run, batch_size=BATCH, task=task, overwrite=True)
    recorder.stage("prose", train, steps=STEPS, segments=2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(STEPS):
        pick = torch.randperm(len(train), generator=generator)[:BATCH].tolist()
        input_ids, labels = task.collate([train[i] for i in pick], "batch")  # padded on the right
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        recorder.step()
        if (step + 1) % 200 == 0:
            print(f"step {step + 1}: training loss {loss.item():.3f} per character")
    recorder.close()
    model.eval()

    # 2. Featurize once (resumable), then score prompt + completion queries.
    trajectory = Trajectory.from_manifest(run, data={"prose": train}, task=task)
    attributor = Attributor(model, task, trajectory, store=store, proj_dim=proj_dim)
    report = attributor.featurize()
    print(f"featurized {report.examples_featurized} passage x checkpoint pairs in {report.seconds:.1f} s "
          f"(k = {attributor.proj_dim}, {attributor.hessian} Gauss-Newton Hessian, "
          f"T̄ = {task.mean_target_tokens:.1f} target characters per passage)")

    queries = completion_queries(held_out, prompt_chars=16)
    top = attributor.top_k(queries, k=3)
    for q, text in enumerate(held_out):
        print(f"\nprompt {text[:16]!r} -> completion {text[16:]!r}")
        for label, indices, scores in (("helpful", top.helpful_indices[q], top.helpful_scores[q]),
                                       ("harmful", top.harmful_indices[q], top.harmful_scores[q])):
            for i, s in zip(indices, scores, strict=False):
                print(f"  {label} {s:+.4f}  #{int(i):3d} {decode(train[int(i)]['input_ids'])!r}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="store directory (default: a temporary one)")
    parser.add_argument("--run", help="where the run is recorded (default: lm-run beside the store)")
    parser.add_argument("--proj-dim", type=int, default=512, help="projected dimension k (default: 512)")
    args = parser.parse_args()
    if args.store:
        main(args.store, args.run or os.path.join(os.path.dirname(os.path.abspath(args.store)), "lm-run"),
             args.proj_dim)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(f"{tmp}/lm.zarr", args.run or f"{tmp}/lm-run", args.proj_dim)
