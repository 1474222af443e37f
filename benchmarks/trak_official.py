"""Run the official TRAK library (PyPI ``traker``, import name ``trak``) on CPU.

A baseline for the benchmarks: :func:`official_trak_scores` featurizes a training set
with TRAK's own code for an ensemble of independently trained classifiers and scores a
set of queries, returning a ``(Q, N)`` float32 matrix in srcproj's sign convention
(positive = the training example raises the query's margin) and the wall seconds.

Install (the package pins nothing we lack, but let pip not touch torch):

    pip install --no-deps traker==0.3.2     # imports only numpy, torch and tqdm

``fast_jl`` (TRAK's CUDA projector) is neither needed nor imported: we hand TRAKer its
CPU ``BasicProjector`` with a Rademacher matrix. What TRAK 0.3.2 computes, read from
its source (``trak/traker.py``, ``score_computers.py``, ``modelout_functions.py``):

* output function: the margin ``f = logit_y - logsumexp_{k != y} logit_k``, its
  per-example gradient taken with ``torch.func.vmap(grad(...))`` in ``model.eval()``;
* features: ``Phi_m = P_m^T g / sqrt(#params)``, a fresh projection per model id
  (block ``i`` of model ``m`` is seeded with ``seed + 1000 i + 100000 m``);
* per model ``Phi_m (Phi_m^T Phi_m + lambda_reg I)^{-1}`` with ``lambda_reg = 0``
  (no damping), the inverse rescaled by ``1 / mean|inverse|`` "to avoid numerical
  issues in float16", a per-model constant that also applies in float32;
* out-to-loss term ``Q = 1 - p_y`` (not ``p(1 - p)``), averaged over models *apart*
  from the kernel term:
  ``scores = mean_m[Phi_m X_m^{-1} psi_m^T / c_m] * mean_m[1 - p_{y,m}]``
  with ``c_m = mean|X_m^{-1}|``. So the ensemble is a weighted average whose
  weights ``1 / c_m`` depend on each model's kernel, and the scores' absolute scale is
  arbitrary (only their ordering and relative size mean anything).

Other 0.3.2 behaviour the adapter works around: ``load_from_save_dir=False`` never
creates ``experiments.json`` (scoring then fails), a one-block ``BasicProjector`` with a
single model id crashes in ``score()`` after ``finalize_features`` freed its matrix, and
TRAKer's own CPU default would be a *normal* (not Rademacher) projection with 100-column
blocks regenerated on every batch (about 10x slower here). ``proj_max_batch_size`` only
matters to the CUDA projector. Progress bars (tqdm in ``finalize_features`` and
``finalize_scores``) are silenced and TRAK's loggers set to ERROR.

    python benchmarks/trak_official.py [--models 2 --proj-dim 512]   # self-check, ~10 s
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import tempfile
import time

import numpy as np
import torch

__all__ = ["make_basic_projector", "official_trak_scores"]

# Largest Rademacher block BasicProjector keeps in memory (bytes of float32). Within it
# the whole matrix is one block, generated once per model id instead of once per batch.
_PROJECTOR_BLOCK_BYTES = 256 * 2**20


def _import_trak():
    try:
        import trak  # noqa: F401
        from trak import TRAKer
        from trak.projectors import BasicProjector, ProjectionType
    except ImportError as exc:
        raise ImportError(
            "the official TRAK baseline needs the 'traker' package: "
            "pip install --no-deps traker==0.3.2 (it imports only numpy, torch and tqdm)"
        ) from exc
    return TRAKer, BasicProjector, ProjectionType


def make_basic_projector(num_params: int, proj_dim: int, seed: int = 0):
    """TRAK's CPU projector: a float32 Rademacher ``BasicProjector`` for ``num_params``.

    ``block_size`` is the whole ``proj_dim`` when the ``num_params × proj_dim`` matrix
    fits in 256 MiB (then it is generated once per model id); otherwise the largest
    block that fits, which TRAK regenerates for every projected batch. The matrix
    depends on the block size, since each block has its own seed.
    """
    _, BasicProjector, ProjectionType = _import_trak()
    block_size = max(1, min(proj_dim, _PROJECTOR_BLOCK_BYTES // (4 * num_params)))
    return BasicProjector(
        grad_dim=num_params,
        proj_dim=proj_dim,
        seed=seed,
        proj_type=ProjectionType.rademacher,
        device="cpu",
        block_size=block_size,
        dtype=torch.float32,
    )


def _no_progress(iterable, *args, **kwargs):
    return iterable


@contextlib.contextmanager
def _quiet_trak():
    """Silence TRAK's tqdm bars and undo the ``logging.basicConfig()`` TRAKer runs."""
    import trak.traker

    root = logging.getLogger()
    handlers = list(root.handlers)
    saved_tqdm = trak.traker.tqdm
    trak.traker.tqdm = _no_progress  # finalize_features / finalize_scores wrap loops in tqdm
    try:
        yield
    finally:
        trak.traker.tqdm = saved_tqdm
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)


def _check_pair(name: str, pair) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise ValueError(f"{name} must be a pair (inputs, labels)")
    x, y = pair
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError(f"{name} must hold two torch tensors")
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"{name}: inputs {tuple(x.shape)} and labels {tuple(y.shape)} must be non-empty "
            "with one label per input"
        )
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be integer class indices, got {y.dtype}")
    return x.detach().to("cpu", torch.float32), y.detach().to("cpu", torch.int64)


def official_trak_scores(
    model: torch.nn.Module,
    checkpoints: list[dict],
    train: tuple[torch.Tensor, torch.Tensor],
    queries: tuple[torch.Tensor, torch.Tensor],
    proj_dim: int,
    seed: int = 0,
    batch_size: int = 64,
    save_dir: str | None = None,
) -> tuple[np.ndarray, float]:
    """Scores (Q, N) from the official TRAK library, float32 on CPU, and the wall seconds.

    checkpoints: one final state_dict per independently trained model (TRAK's ensemble:
    it averages over them).

    Parameters
    ----------
    model : torch.nn.Module
        A classifier of the checkpoints' architecture (logits out). It is deep-copied;
        the caller's module is left as it was.
    checkpoints : list of dict
        State dicts, model id ``i`` for ``checkpoints[i]``.
    train, queries : (inputs, labels)
        Training set (N examples) and queries (Q examples); labels are class indices.
    proj_dim : int
        TRAK's projection dimension; it must be below N (and at most the number of
        parameters), or TRAK's kernel ``Phi^T Phi`` is singular.
    seed : int
        Seed of TRAK's ``BasicProjector`` (model id ``m`` uses its own derived seeds).
    batch_size : int
        Examples per featurize / score call.
    save_dir : str, optional
        Where TRAK keeps its memory-mapped arrays; it must be absent or empty, and is
        kept. By default a temporary directory, removed afterwards.

    Returns
    -------
    scores : numpy.ndarray
        ``(Q, N)`` float32; positive means the training example raises the query's
        margin (TRAK's own sign, transposed from its ``(N, Q)``).
    seconds : float
        Wall time of TRAKer construction, featurizing, finalizing and scoring.
    """
    TRAKer, _, _ = _import_trak()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(checkpoints, (list, tuple)) or len(checkpoints) == 0:
        raise ValueError("checkpoints must be a non-empty list of state_dicts")
    if not all(isinstance(c, dict) for c in checkpoints):
        raise ValueError("every checkpoint must be a state_dict (dict)")
    x_train, y_train = _check_pair("train", train)
    x_query, y_query = _check_pair("queries", queries)
    for name, value in (("proj_dim", proj_dim), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; it must be a positive integer")
    n_train, n_query = int(x_train.shape[0]), int(x_query.shape[0])

    net = copy.deepcopy(model).to("cpu", torch.float32)
    num_params = sum(p.numel() for p in net.parameters())
    if proj_dim >= n_train:
        raise ValueError(
            f"proj_dim={proj_dim} must be smaller than the number of training examples "
            f"({n_train}): TRAK inverts Phi^T Phi ({proj_dim}x{proj_dim}) of the {n_train} "
            "projected training gradients, which is singular when proj_dim >= N"
        )
    if proj_dim > num_params:
        raise ValueError(
            f"proj_dim={proj_dim} exceeds the model's {num_params} parameters: "
            "TRAK's kernel Phi^T Phi would be singular"
        )

    if save_dir is None:
        workdir, cleanup = tempfile.mkdtemp(prefix="trak_official_"), True
    else:
        if os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
            raise ValueError(
                f"save_dir={save_dir!r} must be absent or an empty directory "
                "(TRAK would reuse or refuse the model ids it finds there)"
            )
        workdir, cleanup = save_dir, False

    exp_name = "queries"
    try:
        with _quiet_trak():
            start = time.perf_counter()
            traker = TRAKer(
                model=net,
                task="image_classification",
                train_set_size=n_train,
                save_dir=workdir,
                # load_from_save_dir=False is broken in 0.3.2 (experiments.json is never
                # created, so start_scoring_checkpoint fails); the directory is empty anyway.
                load_from_save_dir=True,
                device="cpu",
                projector=make_basic_projector(num_params, proj_dim, seed),
                use_half_precision=False,
                logging_level=logging.ERROR,
            )
            for model_id, state in enumerate(checkpoints):
                traker.load_checkpoint(state, model_id=model_id)
                for lo in range(0, n_train, batch_size):
                    batch = (x_train[lo:lo + batch_size], y_train[lo:lo + batch_size])
                    traker.featurize(batch=batch, num_samples=len(batch[0]))
            traker.finalize_features()
            # finalize_features frees the projector's matrix; a one-block BasicProjector
            # only rebuilds it when the model id changes, so with a single checkpoint
            # score() would hit the deleted matrix (TRAK 0.3.2 bug). Rebuild it here.
            projector = traker.projector
            if getattr(projector, "num_blocks", 0) == 1 and not projector.proj_matrix_available:
                projector.generate_sketch_matrix(projector.generator_states[0])
            for model_id, state in enumerate(checkpoints):
                traker.start_scoring_checkpoint(exp_name, state, model_id=model_id, num_targets=n_query)
                for lo in range(0, n_query, batch_size):
                    batch = (x_query[lo:lo + batch_size], y_query[lo:lo + batch_size])
                    traker.score(batch=batch, num_samples=len(batch[0]))
            scores = traker.finalize_scores(exp_name=exp_name)  # (N, Q) memmap
            seconds = time.perf_counter() - start
            result = np.ascontiguousarray(np.asarray(scores, dtype=np.float32).T)
            del scores, traker
    finally:
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)
    if not np.all(np.isfinite(result)):
        raise FloatingPointError("TRAK returned non-finite scores (ill-conditioned kernel?)")
    return result, seconds


# ---------------------------------------------------------------- self-check -------

def _mlp_layers(state: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """W1 (H, 64), b1, W2 (10, H), b2 of a ``srcproj.demo.make_mlp`` state_dict."""
    return tuple(state[k].detach().cpu().double().numpy() for k in ("0.weight", "0.bias", "2.weight", "2.bias"))


def _margin_grads(state: dict, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example gradients of the margin at ``state`` (rows in TRAK's parameter order:
    0.weight, 0.bias, 2.weight, 2.bias, each row-major) and the probabilities p_y."""
    W1, b1, W2, b2 = _mlp_layers(state)
    n = x.shape[0]
    a = x @ W1.T + b1
    h = np.maximum(a, 0.0)
    z = h @ W2.T + b2
    rows = np.arange(n)
    others = z.copy()
    others[rows, y] = -np.inf
    q = np.exp(others - others.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)                      # softmax over k != y (q_y = 0)
    dz = -q
    dz[rows, y] += 1.0                                 # d margin / d logits = e_y - q
    dh = dz @ W2
    da = dh * (a > 0)
    grads = np.concatenate([
        (da[:, :, None] * x[:, None, :]).reshape(n, -1),   # 0.weight
        da,                                                # 0.bias
        (dz[:, :, None] * h[:, None, :]).reshape(n, -1),   # 2.weight
        dz,                                                # 2.bias
    ], axis=1)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return grads, p[rows, y]


def _check_grads_against_autograd(model: torch.nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest relative error of :func:`_margin_grads` against torch autograd (a few rows)."""
    net = copy.deepcopy(model).double()
    net.load_state_dict(state)
    mine, _ = _margin_grads(state, x.double().numpy(), y.numpy())
    worst = 0.0
    for i in range(x.shape[0]):
        logits = net(x[i:i + 1].double())[0]
        other = logits.clone()
        other[y[i]] = -math.inf
        margin = logits[y[i]] - torch.logsumexp(other, 0)
        ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(margin, list(net.parameters()))]).numpy()
        worst = max(worst, float(np.abs(mine[i] - ref).max() / np.abs(ref).max()))
    return worst


def _reference_scores(checkpoints, x_train, y_train, x_query, y_query, proj_dim, seed, projections=None):
    """Direct numpy TRAK in float64. Returns (textbook, trak_style), both (Q, N):

    textbook   = mean_m  Psi_m (Phi_m^T Phi_m)^{-1} Phi_m^T diag(1 - p_m)
    trak_style = [mean_m Psi_m (Phi_m^T Phi_m)^{-1} Phi_m^T / c_m] diag(mean_m (1 - p_m)),
                 c_m = mean|(Phi_m^T Phi_m)^{-1}|, with Phi scaled by 1/sqrt(#params)
                 as TRAK does (only c_m's common factor depends on that scale).

    ``projections``: a function (model_id, grads) -> projected grads; by default our own
    Rademacher matrix, one per model, from ``numpy.random.default_rng``.
    """
    xt, yt = x_train.double().numpy(), y_train.numpy()
    xq, yq = x_query.double().numpy(), y_query.numpy()
    textbook, kernel_sum, q_sum = 0.0, 0.0, 0.0
    for m, state in enumerate(checkpoints):
        g_train, p_train = _margin_grads(state, xt, yt)
        g_query, _ = _margin_grads(state, xq, yq)
        d = g_train.shape[1]
        if projections is None:
            P = np.random.default_rng([seed, 7919, m]).integers(0, 2, size=(d, proj_dim)).astype(np.float64) * 2 - 1
            phi, psi = g_train @ P, g_query @ P
        else:
            phi, psi = projections(m, g_train), projections(m, g_query)
        phi /= math.sqrt(d)
        psi /= math.sqrt(d)
        xtx_inv = np.linalg.inv(phi.T @ phi)
        kernel = psi @ xtx_inv @ phi.T                      # (Q, N)
        textbook = textbook + kernel * (1.0 - p_train)[None, :]
        kernel_sum = kernel_sum + kernel / np.abs(xtx_inv).mean()
        q_sum = q_sum + (1.0 - p_train)
    M = len(checkpoints)
    return textbook / M, (kernel_sum / M) * (q_sum / M)[None, :]


def _label_agreement(scores: np.ndarray, y_train: np.ndarray, y_query: np.ndarray,
                     top: int = 10) -> tuple[float, float]:
    """Fraction of each query's ``top`` highest- and lowest-scored training examples
    that share its label, averaged over queries."""
    order = np.argsort(-scores, axis=1)
    high = (y_train[order[:, :top]] == y_query[:, None]).mean()
    low = (y_train[order[:, -top:]] == y_query[:, None]).mean()
    return float(high), float(low)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def _main() -> None:
    import argparse

    from scipy.stats import spearmanr

    from srcproj.demo import load_digits_split, make_mlp, train_sgd

    parser = argparse.ArgumentParser(description="Self-check of the official TRAK adapter on digits")
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    proj_dim = args.proj_dim

    x_train, y_train, x_test, y_test = load_digits_split()
    x_query, y_query = x_test[:args.queries], y_test[:args.queries]
    yt, yq = y_train.numpy(), y_query.numpy()
    checkpoints = []
    for m in range(args.models):
        net = make_mlp(seed=m)
        checkpoints += train_sgd(net, x_train, y_train, steps=args.steps, lr=args.lr, seed=m,
                                 checkpoint_at=[args.steps])
        with torch.no_grad():
            acc = float((net(x_test).argmax(1) == y_test).float().mean())
        print(f"model {m}: test accuracy {acc:.3f}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; N={len(x_train)}, Q={len(x_query)}, "
          f"proj_dim={proj_dim}, {len(checkpoints)} models")

    err = _check_grads_against_autograd(make_mlp(), checkpoints[0], x_train[:5], y_train[:5])
    print(f"numpy margin gradients vs autograd: max relative error {err:.1e}")

    scores, seconds = official_trak_scores(make_mlp(), checkpoints, (x_train, y_train), (x_query, y_query),
                                           proj_dim=proj_dim, seed=0)
    print(f"official TRAK: scores {scores.shape} {scores.dtype}, wall {seconds:.2f} s")

    # Sign: the kernel term psi (Phi^T Phi)^{-1} phi_i carries the sign (TRAK multiplies it
    # by the positive mean of 1 - p_i); its top examples should share the query's label.
    q_mean = np.mean([1.0 - _margin_grads(c, x_train.double().numpy(), yt)[1] for c in checkpoints], axis=0)
    high, low = _label_agreement(scores, yt, yq)
    k_high, k_low = _label_agreement(scores / q_mean[None, :], yt, yq)
    print(f"sign check, share of the query's label (chance ~0.10): top-10 {high:.3f}, bottom-10 {low:.3f}; "
          f"kernel term alone (scores / mean(1-p)) top-10 {k_high:.3f}, bottom-10 {k_low:.3f}")

    t0 = time.perf_counter()
    textbook, trak_style = _reference_scores(checkpoints, x_train, y_train, x_query, y_query, proj_dim, seed=0)
    print(f"numpy reference (own Rademacher projection): Pearson vs official "
          f"textbook {_pearson(scores, textbook):.4f}, TRAK-style ensemble {_pearson(scores, trak_style):.4f}; "
          f"Spearman textbook {spearmanr(scores.ravel(), textbook.ravel())[0]:.4f}; "
          f"textbook top-10 label agreement {_label_agreement(textbook, yt, yq)[0]:.3f}")

    # The same formulas with TRAK's own projection matrices: should reproduce the
    # official scores up to float32 round-off, which pins down what TRAK computes.
    d = sum(p.numel() for p in make_mlp().parameters())
    trak_projector = make_basic_projector(d, proj_dim, seed=0)

    def with_trak_projection(model_id, grads):
        out = trak_projector.project(torch.from_numpy(grads).float(), model_id=model_id)
        return out.double().numpy()

    textbook_same, trak_same = _reference_scores(checkpoints, x_train, y_train, x_query, y_query, proj_dim,
                                                 seed=0, projections=with_trak_projection)
    rel = np.abs(scores - trak_same).max() / np.abs(trak_same).max()
    print(f"numpy with TRAK's projection: Pearson vs official TRAK-style {_pearson(scores, trak_same):.6f} "
          f"(max rel. error {rel:.1e}), textbook {_pearson(scores, textbook_same):.6f}")
    print(f"(reference computations took {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    _main()
