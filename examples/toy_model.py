"""A toy model of superposition (Elhage et al. 2022, "Toy Models of Superposition"), and what
unfolding its hidden activations recovers compared with the model's own read-out.

The model stores `N_FEATURES` sparse features in `D_HIDDEN` < `N_FEATURES` dimensions:
``h = W x``, read out as ``x' = ReLU(W^T h + b)``, trained with JAX on sparse inputs (each
feature active with probability `DENSITY`, uniform in [0, 1]). The columns of W are then the
feature directions: unfolding ``h`` over them is non-negative sparse recovery, which this
script runs with Unfold's solvers and scores against the true features, beside the ReLU
read-out.

    python examples/toy_model.py                 # train (about a minute on 2 cores), compare
    python examples/toy_model.py --save toy.safetensors  # also write the weights

The weights file holds ``W_dec = W^T`` (the feature directions), and the model's read-out as a
standard SAE encoder of ``h``: ``W_enc = W``, ``b_enc = b`` (codes ``ReLU(h W + b)``). A copy
trained with the defaults is the `toy-model` demo dictionary of `unfold serve`, where
``compare_encoder`` puts the model's own read-out beside Unfold's codes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.example_libraries import optimizers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import solvers  # noqa: E402

N_FEATURES = 80
D_HIDDEN = 20
DENSITY = 0.05
STEPS = 6000
BATCH = 1024


def sample(key, n_rows: int, density: float = DENSITY) -> jax.Array:
    """Sparse non-negative features: each active with probability `density`, uniform in [0,1]."""
    active, values = jax.random.split(key)
    mask = jax.random.uniform(active, (n_rows, N_FEATURES)) < density
    return jnp.where(mask, jax.random.uniform(values, (n_rows, N_FEATURES)), 0.0)


def read_out(params, x: jax.Array) -> jax.Array:
    w, b = params
    return jax.nn.relu((x @ w.T) @ w + b)


def train(seed: int = 0, steps: int = STEPS) -> tuple[np.ndarray, np.ndarray]:
    """W (D_HIDDEN, N_FEATURES) and b, trained to reconstruct sparse features (equal
    importance), with Adam."""
    key = jax.random.PRNGKey(seed)
    key, init = jax.random.split(key)
    params = (0.1 * jax.random.normal(init, (D_HIDDEN, N_FEATURES)), jnp.zeros(N_FEATURES))
    start, update, get = optimizers.adam(1e-3)

    def loss(params, x):
        return jnp.mean(jnp.sum((read_out(params, x) - x) ** 2, axis=1))

    @jax.jit
    def step(i, state, key):
        x = sample(key, BATCH)
        value, grads = jax.value_and_grad(loss)(get(state), x)
        return update(i, grads, state), value

    state = start(params)
    for i in range(steps):
        key, batch = jax.random.split(key)
        state, value = step(i, state, batch)
    w, b = get(state)
    print(f"trained {steps} steps: final loss {float(value):.4f}")
    return np.asarray(w), np.asarray(b)


def support_f1(found: np.ndarray, truth: np.ndarray, threshold: float = 0.05) -> float:
    """F1 of the features found active (above `threshold`) against the truly active ones."""
    found, truth = found > threshold, truth > 0
    hits = np.sum(found & truth)
    return float(2 * hits / max(1, np.sum(found) + np.sum(truth)))


def relative_error(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(found - truth) / np.linalg.norm(truth))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--rows", type=int, default=4096, help="test activations")
    parser.add_argument("--save", help="write the weights here (.safetensors)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    w, b = train(steps=args.steps)
    print(f"training took {time.perf_counter() - started:.0f} s")
    if args.save:
        save(args.save, w, b, args.steps)
        print(f"wrote {args.save}")

    scores, mean_active = compare(w, b, args.rows)
    print(
        f"\n{N_FEATURES} features in {D_HIDDEN} dimensions, {args.rows} test rows sampled "
        f"(those with an active feature scored), {mean_active:.1f} active features per row"
    )
    print(f"{'read-out':34} {'relative error':>15} {'support F1':>11} {'certified':>10}")
    for name, (error, f1, certified) in scores.items():
        shown = "" if certified is None else f"{certified:.1%}"
        print(f"{name:34} {error:15.4f} {f1:11.3f} {shown:>10}")
    return 0


def save(path: str, w: np.ndarray, b: np.ndarray, steps: int) -> None:
    """The weights as a safetensors file: W_dec = W^T, W_enc = W, b_enc = b (float32)."""
    from safetensors.numpy import save_file

    tensors = {"W_dec": np.ascontiguousarray(w.T), "W_enc": w, "b_enc": b}
    tensors = {name: np.asarray(array, np.float32) for name, array in tensors.items()}
    metadata = {"steps": str(steps), "density": str(DENSITY), "seed": "0"}
    save_file(tensors, path, metadata=metadata)


def compare(w: np.ndarray, b: np.ndarray, n_rows: int) -> tuple[dict, float]:
    """{read-out: (relative error, support F1, certified share or None)} on fresh sparse
    features, and the mean number of active features per row. The certified share is that of
    rows whose support passes Tropp's exact recovery condition (`solvers.certify`)."""
    x = np.asarray(sample(jax.random.PRNGKey(1234), n_rows))
    x = x[x.sum(axis=1) > 0]  # rows with at least one active feature
    directions = np.ascontiguousarray(w.T)
    hidden = x @ directions  # the model's hidden activations
    prepared = solvers.prepare(directions)
    relu = np.asarray(read_out((w, b), x))
    scores = {"model's ReLU read-out": (relative_error(relu, x), support_f1(relu, x), None)}
    for name, method, params in [
        ("Unfold non-negative OMP, k=8", "omp", {"k": 8, "positive": True, "tol": 1e-6}),
        ("Unfold non-negative LASSO", "lasso", {"alpha": 1e-3, "positive": True}),
    ]:
        result = solvers.unfold(hidden.astype(np.float32), prepared, method, **params)
        certified = float(np.mean(solvers.certify(result, prepared).certified))
        found = result.to_dense()
        scores[name] = (relative_error(found, x), support_f1(found, x), certified)
    return scores, float(np.mean(np.sum(x > 0, axis=1)))


if __name__ == "__main__":
    sys.exit(main())
