"""OMP on whatever JAX runs on (a GPU, a TPU, or the CPU at small sizes), against the device's
own product throughput, with the bfloat16 scan's selections checked against strict float32.

For each problem (unit-norm Gaussian dictionary, codes with k non-zeros of magnitude in
[0.5, 2] and random signs, noise 0.01) and each path (Gram; matrix-free with a strict float32
scan; matrix-free with the bfloat16 scan and float32 re-scoring), it prints: the set-up time
(`prepare`), the first call (compilation plus one run), steady rows/s (median of repeats),
the share of the device's measured product throughput the matrix-free scan's products reach
(``2 n_features d_model k`` flops per row, against a product of the same shape and precision),
the rows whose selected atoms equal those of the strict float32 scan (must be 100%), the mean
relative error and the support F1 against the planted codes.

    python bench/accelerator.py             # P1, P3 (k=32, 64), P2 at full size on an accelerator
    python bench/accelerator.py --small     # the same table at CPU-friendly sizes
    bash bench/accelerator.sh               # installs the gpu extra where JAX sees no GPU

Sizes: P1 8192 x 512 (k=32), P3 24576 x 768 (k=32, 64), P2 65536 x 2304 (k=64), 4096 rows.
On a CPU the default is `--small` (each problem shrunk 4x in both dimensions, 256 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import solvers  # noqa: E402
from solvers import _scan  # noqa: E402
from solvers._products import matmul  # noqa: E402

PROBLEMS = [("P1", 8192, 512, 32), ("P3", 24576, 768, 32), ("P3", 24576, 768, 64)]
P2 = ("P2", 65536, 2304, 64)


def make_problem(n_features: int, d_model: int, batch: int, k: int, seed: int = 0):
    """(dictionary, indices, values, activations) on the device, float32."""
    key = jax.random.PRNGKey(seed)
    k_dict, k_idx, k_val, k_sign, k_noise = jax.random.split(key, 5)
    dictionary = jax.random.normal(k_dict, (n_features, d_model), jnp.float32)
    dictionary = dictionary / jnp.linalg.norm(dictionary, axis=1, keepdims=True)
    scores = jax.random.uniform(k_idx, (batch, n_features))
    indices = jax.lax.top_k(scores, k)[1]  # k distinct features per row
    values = jax.random.uniform(k_val, (batch, k), minval=0.5, maxval=2.0)
    values = values * jax.random.choice(k_sign, jnp.array([-1.0, 1.0]), (batch, k))
    x = jnp.einsum("bk,bkd->bd", values, dictionary[indices], precision="highest")
    x = x + 0.01 * jax.random.normal(k_noise, x.shape, jnp.float32)
    return dictionary, np.asarray(indices), np.asarray(values), np.asarray(x)


def product_tflops(batch: int, d_model: int, n_features: int, dtype, repeats: int = 5) -> float:
    """Measured TFLOP/s of ``(batch, d_model) @ (d_model, n_features)`` in `dtype` (float32 at
    HIGHEST precision; bfloat16 accumulated in float32)."""
    a = jnp.ones((batch, d_model), dtype)
    b = jnp.ones((n_features, d_model), dtype)

    @jax.jit
    def product(a, b):
        return jax.lax.dot_general(
            a,
            b,
            (((1,), (1,)), ((), ())),
            precision="highest" if dtype == jnp.float32 else None,
            preferred_element_type=jnp.float32,
        )

    product(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        product(a, b).block_until_ready()
        times.append(time.perf_counter() - started)
    return 2 * batch * d_model * n_features / statistics.median(times) / 1e12


@jax.jit
def _selections(residual, prepared):
    """(strict float32 argmax, the scan's selection, settled) of each row of `residual`."""
    inv_norms = 1.0 / prepared.norms
    strict = jnp.abs(matmul(residual, prepared.atoms.T)) * inv_norms
    scores, bound = _scan.scan(residual, prepared.scan_atoms, prepared.scan_error, inv_norms)
    chosen, settled = _scan.exact_select(scores, bound, residual, prepared.atoms, inv_norms)
    return jnp.argmax(strict, axis=1), chosen, settled


def scan_check(prepared, batch: int, batches: int = 8) -> dict:
    """The scan's selection logic alone, on residuals both scans see identically: random
    sparse sums plus noise, and pure noise (near-equal scores). Counts the selections that
    differ from the strict float32 argmax and, for those, which one float64 says is larger."""
    atoms64 = np.asarray(prepared.atoms, np.float64)
    norms64 = np.linalg.norm(atoms64, axis=1)
    counts = dict(selections=0, unsettled=0, differ=0, float64_sides_with_scan=0)
    for turn in range(batches):
        keys = jax.random.split(jax.random.PRNGKey(turn), 3)
        residual = 0.01 * jax.random.normal(keys[0], (batch, prepared.d_model))
        if turn % 2 == 0:
            picks = jax.random.randint(keys[1], (batch, 8), 0, prepared.n_features)
            weights = jax.random.normal(keys[2], (batch, 8))
            residual = residual + jnp.einsum(
                "bk,bkd->bd", weights, prepared.atoms[picks], precision="highest"
            )
        strict, chosen, settled = map(np.asarray, _selections(residual, prepared))
        differ = np.flatnonzero((strict != chosen) & settled)
        rows = np.asarray(residual, np.float64)[differ]
        scan_score = (
            np.abs(np.sum(rows * atoms64[chosen[differ]], axis=1)) / norms64[chosen[differ]]
        )
        strict_score = (
            np.abs(np.sum(rows * atoms64[strict[differ]], axis=1)) / norms64[strict[differ]]
        )
        counts["selections"] += batch
        counts["unsettled"] += int(np.sum(~settled))
        counts["differ"] += len(differ)
        counts["float64_sides_with_scan"] += int(np.sum(scan_score > strict_score))
    return counts


def f1(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth, strict=True))
    return 2 * hits / max((found >= 0).sum() + truth.size, 1)


def run_variant(name, dictionary_np, x, k, *, gram, scan, repeats, truth):
    started = time.perf_counter()
    prepared = solvers.prepare(dictionary_np, gram=gram, scan=scan)
    jax.block_until_ready(prepared)
    setup = time.perf_counter() - started
    settings = solvers.make_settings("omp", prepared, k=k)
    plan = solvers.plan_for(settings, prepared)
    started = time.perf_counter()
    result = solvers.unfold(x, prepared, settings, plan=plan)
    first = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = solvers.unfold(x, prepared, settings, plan=plan)
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    check = scan_check(prepared, len(x)) if plan.scan == "bfloat16" else None
    del prepared
    return dict(
        variant=name,
        path="gram" if gram else "matrix-free",
        scan=plan.scan,
        rows_per_call=plan.block_rows,
        setup_s=setup,
        first_s=first,
        rows_per_s=len(x) / seconds,
        indices=result.indices,
        rel_err=float(np.mean(result.relative_error)),
        f1=f1(result.indices, truth),
        scan_check=check,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    backend = jax.default_backend()
    parser.add_argument("--small", action="store_true", default=backend == "cpu")
    parser.add_argument("--full", dest="small", action="store_false", help="full sizes on CPU")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-p2", action="store_true")
    parser.add_argument("--no-gram", action="store_true", help="skip the Gram path")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    shrink = 4 if args.small else 1
    batch = args.batch or (256 if args.small else 4096)
    problems = PROBLEMS + ([] if args.no_p2 else [P2])
    problems = [
        (n, f // shrink, d // shrink, k // (2 if args.small else 1)) for n, f, d, k in problems
    ]

    device = jax.devices()[0]
    print(
        f"jax {jax.__version__}, backend {backend}, device {device.device_kind}, "
        f"{len(jax.devices())} device(s), free memory {solvers.available_bytes() / 1e9:.1f} GB"
    )
    largest = max(problems, key=lambda p: p[1] * p[2])
    peak = {
        "float32": product_tflops(batch, largest[2], largest[1], jnp.float32),
        "bfloat16": product_tflops(batch, largest[2], largest[1], jnp.bfloat16),
    }
    print(
        f"product ({batch} x {largest[2]}) @ ({largest[2]} x {largest[1]}): "
        f"float32 (HIGHEST) {peak['float32']:.1f} TFLOP/s, "
        f"bfloat16 (float32 accumulation) {peak['bfloat16']:.1f} TFLOP/s"
    )
    header = (
        f"{'problem':<22} {'variant':<16} {'rows/call':>9} {'setup s':>8} {'first s':>8} "
        f"{'rows/s':>9} {'% peak':>7} {'= f32':>7} {'rel err':>8} {'F1':>6}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for label, n_features, d_model, k in problems:
        dictionary, truth, _, x = make_problem(n_features, d_model, batch, k)
        dictionary = np.asarray(dictionary)
        fits = solvers.choose_path(n_features).gram
        variants = [("matrix-free f32", False, "float32"), ("matrix-free bf16", False, "bfloat16")]
        if fits and not args.no_gram:
            variants.append(("gram f32", True, "float32"))
        strict = None
        for name, gram, scan in variants:
            try:
                row = run_variant(
                    name, dictionary, x, k, gram=gram, scan=scan, repeats=args.repeats, truth=truth
                )
            except Exception as error:  # report and go on: one run should say as much as it can
                traceback.print_exc()
                print(f"{label} {name}: failed: {error!r}", flush=True)
                continue
            if name == "matrix-free f32":
                strict = row["indices"]
            same = (
                float(np.mean(np.all(row["indices"] == strict, axis=1)))
                if strict is not None
                else float("nan")
            )
            flops = 2 * n_features * d_model * k * row["rows_per_s"] / 1e12
            share = 100 * flops / peak[scan] if not gram else float("nan")
            problem = f"{label} {n_features}x{d_model} k={k}"
            print(
                f"{problem:<22} {name:<16} {row['rows_per_call']:>9} {row['setup_s']:>8.2f} "
                f"{row['first_s']:>8.2f} {row['rows_per_s']:>9.0f} {share:>7.1f} "
                f"{100 * same:>6.1f}% {row['rel_err']:>8.4f} {row['f1']:>6.3f}",
                flush=True,
            )
            if row["scan_check"] is not None:
                print(f"{'':<22} scan alone: {row['scan_check']}", flush=True)
            rows.append(
                {
                    **{key: v for key, v in row.items() if key != "indices"},
                    "problem": problem,
                    "same_as_f32": same,
                    "peak_share": share,
                }
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(peak_tflops=peak, backend=backend, rows=rows), out, indent=1)


if __name__ == "__main__":
    main()
