"""How well each projection preserves inner products of real per-example gradients.

For each model, 256 per-example loss gradients g_i (synthetic inputs, seeded weights, as
in ``benchmarks/featurize.py``; plus the 8-64-3 MLP of the tests and, with ``digits``, the
trained 64-64-10 MLP of the LDS benchmark's ``converged`` scenario on its first training
digits) are projected with
srcproj's dense ``RademacherProjector``, its factored ``KroneckerProjector`` (version 2,
the default, and version 1: equal shares, random factors on both sides) and, on a GPU
with fast-jl installed, ``FastJLProjector`` (128 feature tiles, and TRAK's choice:
the GPU's multiprocessor count). Printed per projection:

* ``gram error``: ‖P̂ − G‖_F / ‖G‖_F, where G is the exact float64 Gram matrix
  ⟨g_i, g_j⟩ and P̂ the projected one; and its ratio to the dense projection's (same k);
* ``cosine error``: the mean absolute error of the pairwise cosine similarities;
* ``distinct columns``: among the first 16 parameters of every fast-jl feature tile
  (the parameters whose columns fast-jl draws from the first words of its generators),
  how many have a column of the k×p matrix that no other sampled parameter shares.

    python benchmarks/projection_quality.py                 # CPU: dense and factored only
    python benchmarks/projection_quality.py --proj-dim 1024  # on a GPU: fast-jl too
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# After the path set-up: featurize is the sibling benchmark module.
import torch  # noqa: E402
from featurize import _data, _model  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 3))


def _digits(examples: int):
    """The LDS benchmark's converged model (the report split's first, seed 1000) and its first training digits."""
    import scenarios

    from srcproj.demo import make_mlp

    scenario = scenarios.make_scenario("converged")
    final, _ = scenarios.attributed_run(scenario, 1000)
    model = make_mlp(scenarios.HIDDEN)
    model.load_state_dict(final)
    return model, scenario.target.X[:examples], scenario.target.y[:examples]


def _gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact per-example gradients with plain torch.func, independent of srcproj's own."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([per_example[name].reshape(len(x), -1) for name in params], 1)


def _project(projector, model: nn.Module, grads: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if projector.factored:  # laid out over the model's layers before it maps rows
        names = [name for name, _ in model.named_parameters()]
        projector.bind(model, names, params=dict(model.state_dict()), example=x[:4])
    return projector.project(grads)


def _distinct_columns(projector, num_params: int, tiles: int, device: torch.device) -> tuple[int, int]:
    size = (num_params - 1) // min(tiles, num_params) + 1
    features = sorted({t * size + r for t in range(tiles) for r in range(16) if t * size + r < num_params})
    parts = []
    for start in range(0, len(features), 256):
        chunk = features[start:start + 256]
        rows = torch.zeros(len(chunk), num_params, device=device)
        rows[torch.arange(len(chunk)), torch.tensor(chunk)] = 1.0
        parts.append(projector.project(rows))
    columns = torch.cat(parts)
    _, inverse, counts = torch.unique(columns.sign(), dim=0, return_inverse=True, return_counts=True)
    return int((counts[inverse] == 1).sum()), len(features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--models", nargs="+", default=["tiny", "cnn", "mlp"],
                        choices=["tiny", "cnn", "mlp", "digits"])
    args = parser.parse_args()
    from srcproj import FastJLProjector, KroneckerProjector, RademacherProjector

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fast_jl = device.type == "cuda" and importlib.util.find_spec("fast_jl") is not None
    k = args.proj_dim
    print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
          f"k = {k}, {args.examples} gradients per model, fast-jl {'used' if fast_jl else 'not available'}")
    torch.backends.cuda.matmul.allow_tf32 = False
    for name in args.models:
        if name == "digits":
            model, x, y = _digits(args.examples)
        elif name == "tiny":
            model = _tiny()
            generator = torch.Generator().manual_seed(1)
            x, y = torch.randn(args.examples, 8, generator=generator), torch.randint(0, 3, (args.examples,),
                                                                                   generator=generator)
        else:
            model = _model(name)
            x, y = _data(name, args.examples)
        model, x, y = model.to(device), x.to(device), y.to(device)
        grads = _gradients(model, x, y)
        p = grads.shape[1]
        exact = grads.double() @ grads.double().T
        norms = exact.diagonal().sqrt()
        projectors = {"dense": RademacherProjector(k, seed=0), "factored": KroneckerProjector(k, seed=0),
                      "factored, version 1": KroneckerProjector(k, seed=0, version=1)}
        if fast_jl:
            projectors["fast-jl, 128 tiles"] = FastJLProjector(k, seed=0)
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            projectors[f"fast-jl, {sms} tiles (TRAK)"] = FastJLProjector(k, seed=0, num_feature_tiles=sms)
        print(f"\n{name}: {p:,} parameters")
        print(f"  {'projection':26} {'gram error':>10} {'vs dense':>8} {'cosine error':>12} {'distinct columns':>18}")
        reference = None
        for label, projector in projectors.items():
            features = _project(projector, model, grads, x).double()
            approx = features @ features.T
            error = float(torch.linalg.norm(approx - exact) / torch.linalg.norm(exact))
            reference = error if reference is None else reference
            off = ~torch.eye(len(x), dtype=torch.bool, device=device)
            approx_norms = approx.diagonal().clamp_min(1e-300).sqrt()
            cosine = float(((approx / approx_norms[:, None] / approx_norms[None])
                            - (exact / norms[:, None] / norms[None]))[off].abs().mean())
            distinct = ""
            if not projector.factored:
                tiles = getattr(projector, "num_feature_tiles", 128)
                unique, sampled = _distinct_columns(projector, p, tiles, device)
                distinct = f"{unique:,} / {sampled:,}"
            print(f"  {label:26} {error:10.4f} {error / reference:7.2f}x {cosine:12.4f} {distinct:>18}", flush=True)


if __name__ == "__main__":
    main()
