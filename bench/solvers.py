"""Solver benchmark: Unfold against SPAMS and scikit-learn on the same data, in one run.

Problem P1: a unit-norm Gaussian dictionary (n_features=8192, d_model=512), codes with 32
non-zeros uniform in [0.5, 2] with random signs, noise 0.01, float32 for Unfold. Rows:

- OMP, k=32: Unfold (Gram path), SPAMS ``spams.omp`` (float64, best of 1 and 2 threads),
  scikit-learn ``sparse_encode(algorithm="omp", gram=...)`` on a subset of rows.
- non-negative LASSO, alpha=0.05, when ``"lasso"`` is in ``solvers.METHODS``: Unfold "lasso",
  SPAMS ``spams.lasso(mode=2, pos=True, lambda1=0.05)`` given its Gram matrix, scikit-learn
  ``sparse_encode(algorithm="lasso_lars", alpha=0.05, positive=True)`` on a subset. (scikit-learn
  divides ``alpha`` by d_model and LassoLars divides the squared error by d_model, so
  ``alpha=0.05`` there is the objective ``0.5 ||x - c D||^2 + 0.05 ||c||_1`` of Unfold and SPAMS.)

SPAMS runs in float32 and in float64 (it supports both; float32 is about twice as fast).
Columns: set-up (per dictionary: Unfold's `prepare`, SPAMS's Gram, ...), time for the rows
(median of repeats), rows/s, Unfold's speed ratio to each peer's fastest row, mean relative error
``||x - c D|| / ||x||``, support-recovery F1 against the ground truth, and for the LASSO the
mean objective's relative difference to SPAMS in float64. Then the time to first result
(compilation) for new shapes, and with ``--p2`` the matrix-free problem P2 (n_features=65536,
d_model=2304, k=64, batch 256) in a subprocess, with its peak memory (VmHWM).

Problem P3 (``--p3``): a dictionary the size of a GPT-2-small SAE, 24576 unit-norm Gaussian
directions in d_model=768, codes with k=32 and with k=64 non-zeros in [0.5, 2], noise 0.01,
4096 rows (``--p3-batch``; ``--p3-k`` for other k). The codes are non-negative, as an SAE's
are: SAELens's matching-pursuit encoder only selects positive correlations and clamps values at
zero, so it could not express signed codes (Unfold's OMP is signed either way). Rows, for each
k:

- Unfold OMP at its default settings: ``solvers.unfold(x, prepared, method="omp", k=k)`` on
  ``prepared = solvers.prepare(dictionary)`` of the raw numpy dictionary, so `prepare`'s own
  choice of path runs (the Gram matrix is 2.4 GB here); set-up is that `prepare`.
- SAELens's ``MatchingPursuitSAE`` (`sae_lens.saes.matching_pursuit_sae`): its own ``encode``
  (under ``torch.no_grad()``) with ``W_dec`` = the dictionary, ``b_dec`` = 0, CPU torch,
  float32, on the first ``--p3-peer-rows`` rows (ratios are per row), in a subprocess
  without JAX (torch sharing a process with JAX ran several times slower on small batches).
  Its stopping rules are a number of iterations (``max_iterations``), a residual norm
  (``residual_threshold``) and an unchanged support (``stop_on_duplicate_support``); none
  counts distinct atoms. Matching pursuit (not orthogonal) may select an atom again, which
  adds to its value without adding to the support, so the closest to L0 = k is
  ``max_iterations=k`` with the two other rules off: k selections, L0 <= k (the table's mean
  L0 column shows how close). Its values are the correlations at selection, never re-fitted.
  With ``--p3-peer-defaults`` also a row with its default stopping rules
  (``residual_threshold=0.01``, ``max_iterations=d_model``, stopping on an unchanged support),
  run once.

Columns as P1's, with the mean L0 (non-zeros per row) in place of the LASSO objective.

A/B mode (``--against REV``): the Unfold rows alone (P1 OMP k=32 and non-negative LASSO
alpha=0.05 on a `prepare`d dictionary as in P1, P3 OMP k=32 and k=64 at default settings) for
the code at git revision REV ("old", checked out by ``git worktree add --detach`` under
/tmp/unfold-ab-<rev>, removed at the end) and for this working tree ("new"), each in its own
worker process that imports `solvers` from its tree and uses only `solvers.prepare` and
`solvers.unfold`. Both read the same data (saved once to .npy files); for each row the first
calls (compilation and run) go old then new, then ``--repeats`` turns alternate old, new.
The table gives the median rows/s of each, the ratio new/old, the first-call seconds, and the
mean relative error and L0 of each (which should agree). `prepare` is timed apart.

    python bench/solvers.py             # P1 (a few minutes)
    python bench/solvers.py --p2        # and P2 (--p2-only: P2 alone)
    python bench/solvers.py --p3        # and P3 against SAELens (--p3-only: P3 alone)
    python bench/solvers.py --quick     # small smoke run (P3: 4096 x 256, k=16 and 32)
    python bench/solvers.py --ceiling   # and a row for OMP's unavoidable work alone
    python bench/solvers.py --against HEAD~3   # A/B of Unfold's rows: HEAD~3 vs this tree
    python bench/solvers.py --devices 4        # 1 device against 4, split by rows / features

Devices mode (``--devices N``): Unfold OMP (k=32) on P1 (its default, Gram path) and P3
(matrix-free: its 2.4 GB Gram matrix replicated on every device would crowd a shared host) with
the dictionary on one device, then on N split by rows and by features
(``solvers.prepare(..., devices=N, shard=...)``): rows/s, the dictionary's bytes on each
device, and whether the answers are one device's (same indices in the same order; the largest
difference of values). Simulate devices on a CPU with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (they share its cores: there, bytes
and answers are the point, not speed).

The ceiling row (`omp_traffic_ceiling`) is not a solver: it runs the OMP solver's memory
traffic (correlations, per step the selection over all features, the gather of a Gram row and
the product with the row's stored Gram rows) without its bookkeeping, in the same chunks and
streams. OMP does all of this and more, so beyond measurement noise it cannot run faster; the
gap between the two is what the bookkeeping costs.

Unfold runs one call per core at once (its CPU plan, `solvers.plan_for`); peers get their
best thread count. SPAMS runs in subprocesses without the host's OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE, under the OpenBLAS kernel it is fastest with: the OpenBLAS bundled with
spams-bin does not recognise recent CPUs (Zen 4 falls back to the generic "Prescott" kernel,
up to 2.5x slower), so the benchmark times a sample under each of `SPAMS_CORETYPES` first and
keeps, per dtype, the fastest whose answers are right (its SkylakeX float32 kernels are not, on
Zen 4) (``--no-spams-coretypes`` to skip). The machine may be shared: read the ratios, measured
in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# `solvers` (hence JAX) is imported only where Unfold runs: with JAX imported, SPAMS's float32
# routines return all-zero codes (seen with jax 0.10 and spams-bin 2.6.14), so the SPAMS
# workers must not import it.


def make_problem(n_features, d_model, batch, n_nonzero, *, noise=0.01, seed=0, positive=False):
    """Unit-norm Gaussian dictionary (n_features, d_model) float32, codes (batch, n_features)
    with `n_nonzero` entries of magnitude in [0.5, 2], activations (batch, d_model) float32."""
    rng = np.random.default_rng(seed)
    dictionary = rng.standard_normal((n_features, d_model), dtype=np.float32)
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    codes = np.zeros((batch, n_features), np.float32)
    for row in codes:
        support = rng.choice(n_features, n_nonzero, replace=False)
        signs = 1.0 if positive else rng.choice([-1.0, 1.0], n_nonzero)
        row[support] = signs * rng.uniform(0.5, 2.0, n_nonzero)
    activations = codes @ dictionary
    activations += noise * rng.standard_normal(activations.shape, dtype=np.float32)
    return dictionary, codes, activations


def support_f1(estimate: np.ndarray, truth: np.ndarray) -> float:
    found, true = estimate != 0, truth != 0
    tp = np.sum(found & true)
    return float(2 * tp / max(np.sum(found) + np.sum(true), 1))


def relative_error(codes: np.ndarray, dictionary: np.ndarray, x: np.ndarray) -> float:
    residual = x - codes.astype(np.float64) @ dictionary
    return float(np.mean(np.linalg.norm(residual, axis=1) / np.linalg.norm(x, axis=1)))


def lasso_objective(codes, dictionary, x, alpha) -> np.ndarray:
    residual = x.astype(np.float64) - codes.astype(np.float64) @ dictionary
    return 0.5 * np.sum(residual**2, axis=1) + alpha * np.sum(np.abs(codes), axis=1)


def quality(codes: np.ndarray, dictionary, x, truth) -> dict:
    """The table's quality columns of `codes` against the true codes `truth`."""
    return dict(rel_err=relative_error(codes, dictionary, x), f1=support_f1(codes, truth))


def table_row(method: str, impl: str, codes, dictionary, x, truth, *, setup, seconds, **extra):
    """A table row for the `codes` of activations `x` (a row each) found in `seconds` after
    `setup` seconds of set-up, with their quality against `truth`; `extra`: more columns."""
    return dict(
        method=method,
        impl=impl,
        setup=setup,
        rows=len(x),
        time=seconds,
        **quality(codes, dictionary, x, truth),
        **extra,
    )


def timed(function, repeats: int):
    """(median seconds over `repeats` calls, last result)."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def peak_memory_bytes() -> int:
    """This process's peak resident memory (VmHWM), which counts XLA's allocations."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def print_table(rows: list[dict], peers: list[str], *, l0: bool = False) -> None:
    """One table of `rows`, with Unfold's speed ratio to each of `peers`; the last column is
    the LASSO objective against SPAMS, or with `l0` the mean number of non-zeros per row."""
    width = max([34] + [len(row["impl"]) for row in rows])
    head = f"{'method':10s} {'implementation':{width}s} {'set-up s':>8s} {'rows':>6s} "
    head += f"{'time s':>8s} {'rows/s':>8s} " + " ".join(f"{'x ' + p:>9s}" for p in peers)
    last = f"{'mean L0':>8s}" if l0 else f"{'obj vs SPAMS':>12s}"
    head += f" {'rel.err':>8s} {'F1':>6s} {last}"
    print(head)
    print("-" * len(head))
    for row in rows:
        line = f"{row['method']:10s} {row['impl']:{width}s} {row.get('setup', float('nan')):8.2f} "
        line += f"{row['rows']:6d} {row['time']:8.3f} {row['rows'] / row['time']:8.1f} "
        ratios = []
        for peer in peers:
            # Against the fastest row of that peer (best dtype, threads, kernel).
            same = [r for r in rows if r["method"] == row["method"] and r.get("peer") == peer]
            ref = max(same, key=lambda r: r["rows"] / r["time"], default=None)
            if row.get("peer") is None and ref is not None:
                ratios.append(f"{(row['rows'] / row['time']) / (ref['rows'] / ref['time']):9.2f}")
            else:
                ratios.append(f"{'':9s}")
        line += " ".join(ratios)
        line += f" {row['rel_err']:8.4f} {row['f1']:6.4f} "
        line += f"{row['l0']:8.2f}" if l0 else f"{row.get('obj', ''):>12s}"
        print(line)


# ------------------------------------------------------------------------------------- peers


SPAMS_CORETYPES = ("", "Haswell", "SkylakeX", "Zen")
"""OpenBLAS kernels to try for SPAMS: its bundled OpenBLAS (0.3.15) may not know a recent CPU
and fall back to a slow generic kernel ("Prescott" on Zen 4); "" is its own detection."""


def spams_worker(path: str) -> None:
    """Run one SPAMS task described by the .npz at `path` (in a process whose environment
    chose the OpenBLAS kernel) and print one JSON line."""
    import spams

    data = np.load(path)
    task, threads_list, repeats = str(data["task"]), data["threads"].tolist(), int(data["repeats"])
    dictionary, x, codes = data["dictionary"], data["x"], data["codes"]
    dtype = np.dtype(str(data["dtype"]))
    d_f = np.asfortranarray(dictionary.T, dtype=dtype)
    x_f = np.asfortranarray(x.T, dtype=dtype)
    if task == "omp":
        k = int(data["k"])
        # SPAMS builds its Gram matrix inside every call: a one-row call measures that set-up.
        setup, _ = timed(lambda: spams.omp(x_f[:, :1].copy(order="F"), d_f, L=k, numThreads=2), 1)

        def run(threads):
            return spams.omp(x_f, d_f, L=k, numThreads=threads)
    else:
        alpha = float(data["alpha"])
        started = time.perf_counter()
        gram = np.asfortranarray(d_f.T @ d_f)
        setup = time.perf_counter() - started

        def run(threads):
            q = np.asfortranarray(d_f.T @ x_f)
            return spams.lasso(
                x_f, Q=gram, q=q, lambda1=alpha, mode=2, pos=True, numThreads=threads
            )

    # Fastest thread count among the right answers (SPAMS's float32 routines sometimes return
    # all-zero codes): as accurate as the most accurate thread count.
    runs = []
    for threads in threads_list:
        seconds, out = timed(lambda t=threads: run(t), repeats)
        out = np.asarray(out.toarray().T, np.float32)
        runs.append((seconds, out, threads, relative_error(out, dictionary, x)))
    best_error = min(r[3] for r in runs)
    seconds, out, threads, error = min(r for r in runs if r[3] <= 1.01 * best_error + 1e-9)
    result = dict(
        time=seconds,
        threads=threads,
        setup=setup,
        rows=len(x),
        rel_err=error,
        f1=support_f1(out, codes),
    )
    if task == "lasso":
        result["objective"] = lasso_objective(out, dictionary, x, float(data["alpha"])).tolist()
    print(json.dumps(result))


def run_worker(flag: str, label: str, env=None, **arrays) -> dict | None:
    """Run this script with `flag` on `arrays` (saved to an .npz) in a subprocess; its last
    line of output is a JSON row. None (and the error printed) if it failed."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "task.npz")
        np.savez(path, **arrays)
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), flag, path],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    if done.returncode != 0:
        print(f"{label} failed: {done.stderr[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_spams(task: str, dictionary, x, codes, args, coretype: str, dtype="float64", **params):
    """Run `spams_worker` in a subprocess with OPENBLAS_CORETYPE=`coretype` ("" unset)."""
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    arrays = dict(task=task, dictionary=dictionary, x=x, codes=codes, dtype=dtype, **params)
    threads = np.array(args.threads)
    return run_worker(
        "--spams-worker", f"SPAMS {task}", env, threads=threads, repeats=args.repeats, **arrays
    )


def best_spams_coretypes(dictionary, x, codes, k, args) -> dict[str, list[str]]:
    """For each dtype, the OpenBLAS kernels under which SPAMS OMP's answers on a sample of rows
    are right (some kernels of its OpenBLAS 0.3.15 give wrong float32 results on AVX-512 CPUs),
    fastest first: as accurate as its own detection in float64."""
    sample = argparse.Namespace(threads=[2], repeats=1)
    runs = {}
    for dtype in ("float64", "float32"):
        for coretype in SPAMS_CORETYPES:
            r = run_spams("omp", dictionary, x[:256], codes[:256], sample, coretype, dtype, k=k)
            if r is not None:
                runs[dtype, coretype] = r
    reference = runs.get(("float64", ""))
    chosen = {}
    for dtype in ("float64", "float32"):
        notes = []
        good = {}
        for (dt, coretype), r in runs.items():
            if dt != dtype:
                continue
            ok = reference is None or (
                r["f1"] >= reference["f1"] - 1e-3 and r["rel_err"] <= 1.01 * reference["rel_err"]
            )
            notes.append(
                f"{coretype or 'auto'} {r['time'] - r['setup']:.2f} s{'' if ok else ' WRONG'}"
            )
            if ok:
                good[coretype] = r["time"] - r["setup"]
        print(f"SPAMS OMP {dtype} on 256 rows by OPENBLAS_CORETYPE: " + ", ".join(notes))
        if good:
            chosen[dtype] = sorted(good, key=good.get)
    return chosen


def spams_row(method: str, impl: str, peer: str, result: dict, **extra) -> dict:
    """A table row from a SPAMS worker's `result`."""
    fields = ("setup", "rows", "time", "rel_err", "f1")
    return dict(method=method, impl=impl, peer=peer, **{f: result[f] for f in fields}, **extra)


def spams_runs(task: str, dictionary, x, codes, args, wrong=None, **params):
    """SPAMS's results for `task`, float64 first, under the kernels listed for each dtype in
    `args.spams_coretype` (dtypes without any are skipped, failed runs too): yields
    (dtype, table label, result, whether `wrong(result)`). A run with wrong answers is made
    again under the next kernel (its float32 kernels that were right on the sample are not
    always right on the full run); the last one is yielded whatever its answers."""
    for dtype in ("float64", "float32"):
        kernels = args.spams_coretype.get(dtype, [])
        for tried, coretype in enumerate(kernels, 1):
            r = run_spams(task, dictionary, x, codes, args, coretype, dtype, **params)
            if r is None:
                continue
            bad = wrong is not None and wrong(r)
            kernel = coretype or "auto"
            if bad and tried < len(kernels):
                print(f"SPAMS {task} {dtype} ({kernel}): wrong answers, run again")
                continue
            yield dtype, f"SPAMS {task} {dtype} ({r['threads']} thr, {kernel})", r, bad
            break


def sklearn_row(method: str, impl: str, dictionary, x, truth, **params):
    """scikit-learn's `sparse_encode` of `x` in float64 with a precomputed Gram matrix (its
    set-up): (table row, codes)."""
    from sklearn.decomposition import sparse_encode

    d64 = dictionary.astype(np.float64)
    started = time.perf_counter()
    gram = d64 @ d64.T
    setup = time.perf_counter() - started
    seconds, out = timed(lambda: sparse_encode(x.astype(np.float64), d64, gram=gram, **params), 1)
    row = table_row(method, impl, out, dictionary, x, truth, setup=setup, seconds=seconds)
    return {**row, "peer": "sklearn"}, out


def run_peers_omp(dictionary, codes, x, k, args, rows_out):
    try:
        import spams  # noqa: F401
    except ImportError:
        print("SPAMS not installed (pip install spams-bin): skipped")
        args.spams_coretype = {}
    reference = []  # the first result (float64's) is the reference

    def wrong(r):
        if not reference:
            reference.append(r)
        return r["f1"] < reference[0]["f1"] - 1e-3 or r["rel_err"] > 1.01 * reference[0]["rel_err"]

    for dtype, label, r, wrong_answers in spams_runs("omp", dictionary, x, codes, args, wrong, k=k):
        if wrong_answers:  # shown, but no ratio is taken against wrong answers
            label = f"SPAMS omp {dtype} WRONG ANSWERS"
        peer = "SPAMS (wrong)" if wrong_answers else "SPAMS"
        rows_out.append(spams_row("omp", label, peer, r))
    n = min(args.sklearn_rows, len(x))
    impl = "scikit-learn sparse_encode omp"
    row, _ = sklearn_row(
        "omp", impl, dictionary, x[:n], codes[:n], algorithm="omp", n_nonzero_coefs=k
    )
    rows_out.append(row)


def run_peers_lasso(dictionary, codes, x, alpha, args, rows_out):
    spams_objective = None
    # float64 first: its objective is the reference of the last column.
    for _, label, r, _ in spams_runs("lasso", dictionary, x, codes, args, alpha=alpha):
        objective = np.array(r["objective"])
        obj = "0"
        if spams_objective is None:
            spams_objective = objective
        else:
            obj = f"{np.mean((objective - spams_objective) / spams_objective):+.2e}"
        rows_out.append(spams_row("nn-lasso", label, "SPAMS", r, obj=obj))
    n = min(args.sklearn_lasso_rows, len(x))
    impl = "scikit-learn sparse_encode lasso_lars"
    row, out = sklearn_row(
        "nn-lasso",
        impl,
        dictionary,
        x[:n],
        codes[:n],
        algorithm="lasso_lars",
        alpha=alpha,
        positive=True,
    )
    obj = ""
    if spams_objective is not None:
        mine = lasso_objective(out, dictionary, x[:n], alpha)
        obj = f"{np.mean((mine - spams_objective[:n]) / spams_objective[:n]):+.2e}"
    rows_out.append({**row, "obj": obj})
    return spams_objective


# ------------------------------------------------------------------------------------- ceiling


def omp_traffic_ceiling(k: int):
    """Settings for `solvers._api.run` that do Batch-OMP's unavoidable work alone, for
    ``--ceiling``: the correlations ``x @ atoms.T``, then per step the selection of the best
    atom, the gather of its Gram row into the row's store and the product with the store, in
    the OMP solver's own segments, chunks and streams; but none of its k x k bookkeeping (the
    inverse Cholesky factor, the codes, the stopping rules): the product uses fixed weights.
    Not a solver (its codes are zero): its speed bounds what OMP can reach in this design,
    whatever its bookkeeping costs. Gram path only (P1's dictionary has its Gram matrix)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from solvers import _omp
    from solvers._result import ChunkSolution

    @dataclasses.dataclass(frozen=True)
    class Ceiling:
        k: int
        uses_correlations = True

        def solve(self, dictionary, x, correlations, plan=None):
            batch, dtype = x.shape[0], x.dtype
            shifts = jnp.asarray(
                np.random.default_rng(0).permutation(dictionary.n_features)[: self.k]
            )
            indices = jnp.zeros((batch, self.k), jnp.int32)
            state = (correlations, correlations[:, None, :], indices)
            for start, width in _omp.segments(self.k):
                c, stored, indices = state
                zeros = jnp.zeros((batch, width, dictionary.n_features), dtype)
                stored = jnp.concatenate([stored, zeros], axis=1)

                def step(u, s, start=start):
                    c, stored, indices = s
                    t = start + u
                    best, _ = _omp.select(c, None, False)
                    # A new atom each step, as in OMP (where a selected atom's correlation
                    # becomes zero), still found from the correlations.
                    j = (best + shifts[t]) % dictionary.n_features
                    stored = jax.lax.dynamic_update_slice_in_dim(
                        stored, dictionary.gram[j][:, None, :], 1 + t, axis=1
                    )
                    indices = indices.at[:, t].set(j)
                    weights = jnp.full(stored.shape[:2], -1e-3, dtype).at[:, 0].set(1.0)
                    return jnp.einsum("bk,bkn->bn", weights, stored), stored, indices

                state = jax.lax.fori_loop(0, width, step, (c, stored, indices))
            indices = state[2]
            return ChunkSolution(
                indices=indices,
                values=jnp.zeros(indices.shape, dtype),
                n_iter=jnp.full((batch,), self.k, jnp.int32),
                status=jnp.zeros((batch,), jnp.int32),
                duality_gap=jnp.full((batch,), jnp.nan, dtype),
            )

    jax.tree_util.register_dataclass(Ceiling, data_fields=[], meta_fields=["k"])
    return Ceiling(k)


# ------------------------------------------------------------------------------------- runs


def run_p1(args) -> None:
    import solvers

    n_features, d_model, batch, k = args.n_features, args.d_model, args.batch, args.k
    print(
        f"P1: n_features={n_features} d_model={d_model} batch={batch} k={k} noise=0.01, "
        f"Unfold in float32 on {len(os.sched_getaffinity(0))} cores"
    )
    dictionary, codes, x = make_problem(n_features, d_model, batch, k, seed=0)
    rows: list[dict] = []

    started = time.perf_counter()
    prepared = solvers.prepare(dictionary)
    prepared.gram.block_until_ready()
    setup = time.perf_counter() - started
    compile_notes = []
    if not args.no_omp:
        started = time.perf_counter()
        solvers.unfold(x, prepared, method="omp", k=k)
        first = time.perf_counter() - started
        seconds, result = timed(
            lambda: solvers.unfold(x, prepared, method="omp", k=k), args.repeats
        )
        dense = result.to_dense()
        impl = "Unfold omp float32 (Gram path)"
        rows.append(
            table_row("omp", impl, dense, dictionary, x, codes, setup=setup, seconds=seconds)
        )
        compile_notes.append(
            f"omp k={k}, first call on {batch} rows: {first:.1f} s "
            f"(of which compile about {first - seconds:.1f} s)"
        )
        if args.ceiling:
            ceiling = omp_traffic_ceiling(k)
            # OMP's own plan: its chunks, streams and padding.
            plan = solvers.plan_for(solvers.make_settings("omp", prepared, k=k), prepared)
            solvers._api.run(ceiling, prepared, x, plan)  # compile
            seconds, _ = timed(lambda: solvers._api.run(ceiling, prepared, x, plan), args.repeats)
            unknown = float("nan")  # not a solver: no codes to judge
            row = dict(method="omp", impl="ceiling: OMP's traffic alone", setup=setup, rows=batch)
            rows.append({**row, "time": seconds, "rel_err": unknown, "f1": unknown})
    args.spams_coretype = {"float64": [""], "float32": [""]}
    if args.spams_coretypes:
        args.spams_coretype = best_spams_coretypes(dictionary, x, codes, k, args)
    if not args.no_omp:
        run_peers_omp(dictionary, codes, x, k, args, rows)

    if "lasso" in solvers.METHODS and not args.no_lasso:
        alpha = 0.05
        # Same dictionary (same seed), non-negative codes.
        pos_dictionary, pos_codes, pos_x = make_problem(
            n_features, d_model, batch, k, seed=0, positive=True
        )
        lasso_batch = min(batch, args.lasso_batch)
        pos_codes, pos_x = pos_codes[:lasso_batch], pos_x[:lasso_batch]
        started = time.perf_counter()
        solvers.unfold(pos_x, prepared, method="lasso", alpha=alpha, positive=True)
        first = time.perf_counter() - started
        seconds, result = timed(
            lambda: solvers.unfold(pos_x, prepared, method="lasso", alpha=alpha, positive=True),
            args.repeats,
        )
        dense = result.to_dense()
        unfold_objective = lasso_objective(dense, pos_dictionary, pos_x, alpha)
        lasso_rows: list[dict] = []
        spams_objective = run_peers_lasso(pos_dictionary, pos_codes, pos_x, alpha, args, lasso_rows)
        obj = ""
        if spams_objective is not None:
            excess = (unfold_objective - spams_objective) / spams_objective
            obj = f"{np.mean(excess):+.2e}"
            compile_notes.append(
                f"lasso objective against SPAMS float64, relative: mean {np.mean(excess):+.2e}, "
                f"max {np.max(excess):+.2e}, rows above 1e-4: {int(np.sum(excess > 1e-4))}"
            )
        impl = "Unfold lasso float32 (positive)"
        rows.append(
            table_row(
                "nn-lasso",
                impl,
                dense,
                pos_dictionary,
                pos_x,
                pos_codes,
                setup=setup,
                seconds=seconds,
                obj=obj,
            )
        )
        rows.extend(lasso_rows)
        compile_notes.append(
            f"lasso, first call on {lasso_batch} rows: {first:.1f} s "
            f"(of which compile about {first - seconds:.1f} s)"
        )

    print()
    print_table(rows, ["SPAMS", "sklearn"])
    print()
    print("Notes (time to first result includes compilation):")
    for note in compile_notes:
        print("  " + note)
    for new_k, new_rows in args.compile_shapes:
        new_x = x[:new_rows]
        started = time.perf_counter()
        solvers.unfold(new_x, prepared, method="omp", k=new_k)
        first = time.perf_counter() - started
        again, _ = timed(
            lambda nk=new_k, nx=new_x: solvers.unfold(nx, prepared, method="omp", k=nk), 1
        )
        print(
            f"  omp k={new_k} on a new shape of {new_rows} rows: {first:.1f} s "
            f"(then {again:.2f} s per call)"
        )


def p2_worker(args) -> None:
    """Run P2 in this (fresh) process and print one JSON line."""
    import solvers

    n_features, d_model, batch, k = args.p2_shape
    dictionary, codes, x = make_problem(n_features, d_model, batch, k, seed=2)
    base = peak_memory_bytes()
    started = time.perf_counter()
    # At 65536 features the Gram matrix (17 GB) is over the budget: prepare picks matrix-free.
    prepared = solvers.prepare(dictionary, gram=False)
    setup = time.perf_counter() - started
    del dictionary
    started = time.perf_counter()
    solvers.unfold(x, prepared, method="omp", k=k)
    first = time.perf_counter() - started
    seconds, result = timed(lambda: solvers.unfold(x, prepared, method="omp", k=k), args.repeats)
    dense = result.to_dense()
    atoms = np.asarray(prepared.atoms)
    out = dict(
        rows=batch,
        time=seconds,
        setup=setup,
        first=first,
        **quality(dense, atoms, x, codes),
        peak=peak_memory_bytes(),
        problem_bytes=base,
    )
    if args.p2_sklearn_rows:
        from sklearn.linear_model import orthogonal_mp

        n = args.p2_sklearn_rows
        d64 = atoms.astype(np.float64)
        sk_seconds, sk = timed(
            lambda: (
                orthogonal_mp(
                    d64.T, x[:n].T.astype(np.float64), n_nonzero_coefs=k, precompute=False
                ).T
            ),
            1,
        )
        out.update(
            sk_rows=n,
            sk_time=sk_seconds,
            **{"sk_" + name: value for name, value in quality(sk, atoms, x[:n], codes[:n]).items()},
        )
    print(json.dumps(out))


def run_p2(args) -> None:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--p2-worker",
        "--repeats",
        str(args.repeats),
        "--p2-batch",
        str(args.p2_batch),
        "--p2-sklearn-rows",
        str(args.p2_sklearn_rows),
    ] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print("P2 failed:\n" + done.stderr[-3000:])
        return
    r = json.loads(done.stdout.strip().splitlines()[-1])
    print()
    n_features, d_model, _, k = args.p2_shape
    print(
        f"P2 (matrix-free): n_features={n_features} d_model={d_model} k={k} "
        f"batch={r['rows']} float32"
    )
    print(
        f"  Unfold omp: {r['time']:.2f} s, {r['rows'] / r['time']:.1f} rows/s, "
        f"rel.err {r['rel_err']:.4f}, F1 {r['f1']:.4f}; prepare {r['setup']:.1f} s, "
        f"first call (compile) {r['first']:.1f} s"
    )
    print(
        f"  peak memory of the process (VmHWM): {r['peak'] / 2**30:.2f} GiB "
        f"(the problem's own arrays before solving: {r['problem_bytes'] / 2**30:.2f} GiB)"
    )
    if "sk_rows" in r:
        rate = r["sk_rows"] / r["sk_time"]
        print(
            f"  scikit-learn orthogonal_mp (precompute=False, float64) on {r['sk_rows']} rows: "
            f"{rate:.2f} rows/s, rel.err {r['sk_rel_err']:.4f}, F1 {r['sk_f1']:.4f}; "
            f"Unfold x{(r['rows'] / r['time']) / rate:.1f}"
        )
    print(
        f"  SPAMS omp builds the {n_features}^2 float64 Gram matrix "
        f"({n_features**2 * 8 / 1e9:.0f} GB at full size): not run."
    )


# ------------------------------------------------------------------------------------- P3


def mean_l0(codes: np.ndarray) -> float:
    """Mean number of non-zeros per row of `codes` of shape (batch, n_features)."""
    return float(np.mean(np.count_nonzero(codes, axis=1)))


def saelens_mp_encoder(dictionary: np.ndarray, **stopping):
    """SAELens's `MatchingPursuitSAE` with decoder `W_dec` = `dictionary` of shape
    (n_features, d_model), ``b_dec`` = 0, float32 on the CPU, and the stopping rules of
    `stopping` (``residual_threshold``, ``max_iterations``, ``stop_on_duplicate_support``;
    SAELens's defaults for those not given): (encoder, set-up seconds)."""
    import torch
    from sae_lens import MatchingPursuitSAE, MatchingPursuitSAEConfig

    started = time.perf_counter()
    n_features, d_model = dictionary.shape
    config = MatchingPursuitSAEConfig(
        d_in=d_model, d_sae=n_features, dtype="float32", device="cpu", **stopping
    )
    sae = MatchingPursuitSAE(config)
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(dictionary))
        sae.b_dec.zero_()
    return sae, time.perf_counter() - started


def saelens_worker(path: str) -> None:
    """Time SAELens's matching-pursuit `encode` as described by the .npz at `path` (in a
    process without JAX) and print one JSON line: a table row without its labels."""
    import torch

    data = np.load(path)
    dictionary, x, truth = data["dictionary"], data["x"], data["truth"]
    sae, setup = saelens_mp_encoder(dictionary, **json.loads(str(data["stopping"])))
    activations = torch.from_numpy(x)

    def encode():
        with torch.no_grad():
            return sae.encode(activations).numpy()

    seconds, codes = timed(encode, int(data["repeats"]))
    row = table_row("", "", codes, dictionary, x, truth, setup=setup, seconds=seconds)
    print(json.dumps({**row, "l0": mean_l0(codes), "threads": torch.get_num_threads()}))


def saelens_mp_row(method, impl, dictionary, x, truth, repeats, **stopping) -> dict | None:
    """A table row for SAELens's matching-pursuit `encode` of activations `x` (a row each)
    with true codes `truth`, timed over `repeats` calls in a subprocess (`saelens_worker`),
    so that neither JAX's threads nor its memory share the process; None if it failed."""
    arrays = dict(dictionary=dictionary, x=x, truth=truth, repeats=repeats)
    row = run_worker("--saelens-worker", f"SAELens {impl}", stopping=json.dumps(stopping), **arrays)
    if row is None:
        return None
    return {**row, "method": method, "impl": impl, "peer": "SAELens"}


def gram_choice_note(dictionary) -> str:
    """Why `prepare` takes the path it takes for `dictionary`, where this tree says."""
    from solvers import _dictionary

    choose_path = getattr(_dictionary, "choose_path", None)
    if choose_path is None:
        return ""
    try:
        return choose_path(dictionary.shape[0], dictionary.dtype).reason
    except Exception:  # a private helper: its signature may change
        return ""


def run_p3(args) -> None:
    import jax

    import solvers

    n_features, d_model = args.p3_shape
    batch, n_peer = args.p3_batch, min(args.p3_peer_rows, args.p3_batch)
    print()
    print(
        f"P3: n_features={n_features} d_model={d_model} batch={batch} k={list(args.p3_ks)} "
        f"noise=0.01, non-negative codes; Unfold in float32 at default settings on "
        f"{len(os.sched_getaffinity(0))} cores; SAELens on {n_peer} rows"
    )
    from importlib import metadata

    try:
        versions = f"SAELens {metadata.version('sae-lens')}, torch {metadata.version('torch')}"
        print(f"  {versions}, in a subprocess without JAX")
        with_peer = True
    except metadata.PackageNotFoundError:
        print("  sae-lens not installed (pip install sae-lens, after a CPU torch): skipped")
        with_peer = False
    rows: list[dict] = []
    notes = []
    prepared = None
    for k in args.p3_ks:
        # One seed: the same dictionary for every k (drawn first), other codes.
        dictionary, codes, x = make_problem(n_features, d_model, batch, k, seed=3, positive=True)
        if prepared is None:
            started = time.perf_counter()
            prepared = solvers.prepare(dictionary)
            jax.block_until_ready(prepared)
            setup = time.perf_counter() - started
            path = "matrix-free" if prepared.gram is None else "gram"
            reason = gram_choice_note(dictionary)
            why = f" ({reason})" if reason else ""
            notes.append(f"prepare: {setup:.1f} s, {path} path{why}")
        started = time.perf_counter()
        solvers.unfold(x, prepared, method="omp", k=k)
        first = time.perf_counter() - started
        seconds, result = timed(
            lambda x=x, k=k, p=prepared: solvers.unfold(x, p, method="omp", k=k), args.repeats
        )
        dense = result.to_dense()
        impl = f"Unfold omp float32 ({path}, default)"
        row = table_row(f"k={k}", impl, dense, dictionary, x, codes, setup=setup, seconds=seconds)
        rows.append({**row, "l0": mean_l0(dense)})
        del dense, result
        notes.append(
            f"Unfold omp k={k}, first call on {batch} rows: {first:.1f} s "
            f"(of which compile about {first - seconds:.1f} s)"
        )
        if with_peer:
            sub_x, sub_codes = x[:n_peer], codes[:n_peer]
            impl = f"SAELens MatchingPursuitSAE (max_iterations={k})"
            stopping = dict(max_iterations=k, residual_threshold=0.0)
            row = saelens_mp_row(
                f"k={k}",
                impl,
                dictionary,
                sub_x,
                sub_codes,
                args.repeats,
                stop_on_duplicate_support=False,
                **stopping,
            )
            rows.extend([row] if row else [])
            if args.p3_peer_defaults:
                impl = "SAELens MatchingPursuitSAE (defaults)"
                row = saelens_mp_row(f"k={k}", impl, dictionary, sub_x, sub_codes, 1)
                # No ratio against this row: another L0.
                rows.extend([{**row, "peer": "SAELens defaults"}] if row else [])
        del codes, x
    print()
    print_table(rows, ["SAELens"], l0=True)
    print()
    print("Notes (time to first result includes compilation):")
    for note in notes:
        print("  " + note)


# ------------------------------------------------------------------------------------- A/B


def ab_cases(args) -> list[dict]:
    """The Unfold rows of the A/B mode: P1 OMP and non-negative LASSO on P1's prepared
    dictionary, P3 OMP for each of its k at default settings."""
    k, p3_k = args.k, args.p3_ks
    cases = [
        dict(problem="P1", method="omp", params=dict(k=k), label=f"omp k={k}"),
        dict(
            problem="P1",
            method="lasso",
            params=dict(alpha=0.05, positive=True),
            label="nn-lasso a=0.05",
            positive=True,
        ),
    ]
    cases += [dict(problem="P3", method="omp", params=dict(k=k), label=f"omp k={k}") for k in p3_k]
    for case in cases:
        case["name"] = f"{case['problem']} {case['label']}"
    return cases


def write_ab_data(args, directory: str) -> list[dict]:
    """Save the dictionaries and activations of `ab_cases` (as their sections make them) as
    .npy files under `directory`, with a ``cases.json`` that says which file is which."""
    cases = ab_cases(args)
    files = {}
    for case in cases:
        if case["problem"] == "P1":
            shape, batch, seed, k = (args.n_features, args.d_model), args.batch, 0, args.k
            positive = case.get("positive", False)
            if positive:
                batch = min(batch, args.lasso_batch)
        else:
            shape, batch, seed, k = args.p3_shape, args.p3_batch, 3, case["params"]["k"]
            positive = True
        dictionary, _, x = make_problem(*shape, batch, k, seed=seed, positive=positive)
        files.setdefault(case["problem"], f"{case['problem']}_dictionary.npy")
        np.save(os.path.join(directory, files[case["problem"]]), dictionary)
        case["x"] = f"{case['name'].replace(' ', '_').replace('=', '')}_x.npy"
        case["rows"] = len(x)
        np.save(os.path.join(directory, case["x"]), x)
    with open(os.path.join(directory, "cases.json"), "w") as out:
        json.dump(dict(dictionaries=files, cases=cases), out)
    return cases


AB_PREFIX = "AB-RESULT "
"""Marks the A/B worker's answers on its stdout (anything else printed there is ignored)."""


def ab_worker(tree: str, directory: str) -> None:
    """Serve the A/B cases of `directory` with the `solvers` of the code tree `tree`: read a
    case name a line from stdin, run it once, answer a JSON line (after `AB_PREFIX`) with its
    seconds, mean relative error and L0, and the first time a dictionary is used, its
    `prepare` seconds and path. Uses only `solvers.prepare` and `solvers.unfold`."""
    sys.path.insert(0, os.path.abspath(tree))
    import jax

    import solvers

    where = os.path.abspath(solvers.__file__)
    if not where.startswith(os.path.abspath(tree) + os.sep):
        raise RuntimeError(f"solvers imported from {where}, not from {tree}")
    with open(os.path.join(directory, "cases.json")) as spec:
        spec = json.load(spec)
    cases = {case["name"]: case for case in spec["cases"]}
    prepared, activations = {}, {}

    def answer(**fields):
        print(AB_PREFIX + json.dumps(fields), flush=True)

    answer(solvers=where)
    for line in sys.stdin:
        case = cases[line.strip()]
        out = {}
        problem = case["problem"]
        if problem not in prepared:
            dictionary = np.load(os.path.join(directory, spec["dictionaries"][problem]))
            started = time.perf_counter()
            prepared[problem] = solvers.prepare(dictionary)
            jax.block_until_ready(prepared[problem])
            out["prepare"] = time.perf_counter() - started
        dictionary = prepared[problem]
        out["path"] = "matrix-free" if dictionary.gram is None else "gram"
        if case["method"] not in solvers.METHODS:
            answer(**out, missing=True)
            continue
        if case["x"] not in activations:
            activations[case["x"]] = np.load(os.path.join(directory, case["x"]))
        x = activations[case["x"]]
        started = time.perf_counter()
        result = solvers.unfold(x, dictionary, method=case["method"], **case["params"])
        seconds = time.perf_counter() - started
        # Fields of the result that a tree may lack are reported as NaN.
        nan = np.full(len(x), np.nan)
        answer(
            **out,
            time=seconds,
            rel_err=float(np.mean(getattr(result, "relative_error", nan))),
            l0=float(np.mean(getattr(result, "l0", nan))),
        )


class ABWorker:
    """An `ab_worker` process for the code tree `tree`, run one case at a time."""

    def __init__(self, tree: str, directory: str):
        # Its stderr, kept for the worker's life (closed by `close`).
        log = os.path.join(directory, f"worker-{len(os.listdir(directory))}.log")
        self.log = open(log, "w+")  # noqa: SIM115
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.abspath(tree)] + [p for p in [env.get("PYTHONPATH")] if p]
        )
        script = os.path.abspath(__file__)
        self.process = subprocess.Popen(
            [sys.executable, script, "--ab-worker", os.path.abspath(tree), directory],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.solvers = self.receive()["solvers"]

    def receive(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(AB_PREFIX):
                return json.loads(line[len(AB_PREFIX) :])
        self.log.seek(0)
        raise RuntimeError("A/B worker failed:\n" + self.log.read()[-3000:])

    def run(self, name: str) -> dict:
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def git(*command: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        ["git", "-C", root, *command], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def run_ab(args) -> None:
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = git("rev-parse", "--verify", f"{args.against}^{{commit}}")
    worktree = f"/tmp/unfold-ab-{commit[:12]}"
    if os.path.exists(worktree):  # left over from an interrupted run
        git("worktree", "remove", "--force", worktree)
    git("worktree", "add", "--detach", worktree, commit)
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--", "solvers") else ""
    subject = git("log", "-1", "--format=%s", commit)[:60]
    print(
        f"A/B: old = {args.against} ({commit[:12]}, {subject}), new = the working tree{dirty}; "
        f"{args.repeats} alternating turns after the first calls"
    )
    print(
        f"  P1: {args.n_features} x {args.d_model}, {args.batch} rows; P3: "
        f"{args.p3_shape[0]} x {args.p3_shape[1]}, {args.p3_batch} rows; "
        f"{len(os.sched_getaffinity(0))} cores"
    )
    workers: dict[str, ABWorker] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="unfold-ab-data-") as directory:
            cases = write_ab_data(args, directory)
            workers["old"] = ABWorker(worktree, directory)
            workers["new"] = ABWorker(root, directory)
            for side, worker in workers.items():
                print(f"  {side}: solvers from {worker.solvers}")
            results = []
            for case in cases:
                runs = {"old": [], "new": []}
                first = {}
                for turn in range(1 + args.repeats):
                    for side in ("old", "new"):
                        r = workers[side].run(case["name"])
                        if "prepare" in r:
                            print(
                                f"  {side} prepare {case['problem']}: {r['prepare']:.1f} s, "
                                f"{r['path']} path"
                            )
                        if turn == 0:
                            first[side] = r
                        elif "time" in r:
                            runs[side].append(r["time"])
                results.append((case, first, runs))
    finally:
        for worker in workers.values():
            worker.close()
        git("worktree", "remove", "--force", worktree)
    print()
    print_ab_table(results)


def print_ab_table(results) -> None:
    """The A/B table: per case, each side's median rows/s, the ratio new/old, first calls."""
    head = f"{'problem':7s} {'method':16s} {'rows':>5s} {'path old/new':>23s} "
    head += f"{'old rows/s':>10s} {'new rows/s':>10s} {'new/old':>7s} "
    head += f"{'1st old s':>9s} {'1st new s':>9s} {'rel.err old/new':>15s} {'L0 old/new':>11s}"
    print(head)
    print("-" * len(head))
    for case, first, runs in results:
        line = f"{case['problem']:7s} {case['label']:16s} {case['rows']:5d} "
        line += f"{first['old']['path'] + '/' + first['new']['path']:>23s} "
        if not runs["old"] or not runs["new"]:
            missing = " ".join(side for side in ("old", "new") if not runs[side])
            print(line + f"(no {case['method']} in the {missing} tree)")
            continue
        old, new = (case["rows"] / statistics.median(runs[side]) for side in ("old", "new"))
        line += f"{old:10.1f} {new:10.1f} {new / old:7.2f} "
        line += f"{first['old']['time']:9.2f} {first['new']['time']:9.2f} "
        line += f"{first['old']['rel_err']:7.4f}/{first['new']['rel_err']:7.4f} "
        line += f"{first['old']['l0']:5.1f}/{first['new']['l0']:5.1f}"
        print(line)


def run_devices(args) -> None:
    import jax

    import solvers

    problems = [("P1", args.n_features, args.d_model, None), ("P3", *args.p3_shape, False)]
    placements = [(1, None), (args.devices, "rows"), (args.devices, "features")]
    backend = f"{len(jax.devices())} {jax.default_backend()} device(s)"
    print(f"OMP k={args.k}, {args.batch} rows, on {backend}: 1 device against {args.devices}")
    header = (
        f"{'problem':<20} {'devices':>7} {'shard':>8} {'path':>11} {'prepare s':>9} "
        f"{'rows/s':>9} {'bytes/device':>13} {'identical':>9} {'max |diff|':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, n_features, d_model, gram in problems:
        dictionary, _, x = make_problem(n_features, d_model, args.batch, args.k)
        reference = None
        for devices, shard in placements:
            start = time.perf_counter()
            prepared = solvers.prepare(dictionary, gram=gram, devices=devices, shard=shard)
            jax.block_until_ready(prepared)
            setup = time.perf_counter() - start
            solvers.unfold(x[: min(len(x), 64)], prepared, method="omp", k=args.k)  # compile
            seconds, result = timed(
                lambda p=prepared, x=x: solvers.unfold(x, p, method="omp", k=args.k), args.repeats
            )
            if reference is None:
                reference = result
            same = np.array_equal(result.indices, reference.indices)
            difference = float(np.max(np.abs(result.values - reference.values)))
            print(
                f"{name + f' {n_features}x{d_model}':<20} {devices:>7} {shard or '-':>8} "
                f"{prepared.path:>11} {setup:>9.2f} {len(x) / seconds:>9.0f} "
                f"{prepared.device_bytes:>13,} {'yes' if same else 'NO':>9} {difference:>10.1e}"
            )
            del prepared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument(
        "--repeats", type=int, help="timed calls (median); default 3, 1 with --quick, A/B: 5"
    )
    parser.add_argument("--quick", action="store_true", help="small problem, one repeat")
    parser.add_argument("--p2", action="store_true", help="also the matrix-free problem P2")
    parser.add_argument("--p2-only", action="store_true", help="only P2")
    parser.add_argument("--no-lasso", action="store_true")
    parser.add_argument("--no-omp", action="store_true", help="only the LASSO rows of P1")
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also time OMP's unavoidable work alone (see omp_traffic_ceiling)",
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sklearn-rows", type=int, default=64)
    parser.add_argument("--sklearn-lasso-rows", type=int, default=16)
    parser.add_argument("--lasso-batch", type=int, default=4096)
    parser.add_argument("--p2-batch", type=int, default=256)
    parser.add_argument("--p2-sklearn-rows", type=int, default=4)
    parser.add_argument(
        "--no-spams-coretypes",
        dest="spams_coretypes",
        action="store_false",
        help="let SPAMS's OpenBLAS detect the CPU instead of trying kernels",
    )
    parser.add_argument("--p3", action="store_true", help="also P3 against SAELens")
    parser.add_argument("--p3-only", action="store_true", help="only P3")
    parser.add_argument("--p3-batch", type=int, default=4096)
    parser.add_argument(
        "--p3-k", type=int, nargs="+", help="P3's k (default 32 and 64; --quick: 16 and 32)"
    )
    parser.add_argument(
        "--p3-peer-rows", type=int, default=1024, help="rows SAELens's encoder runs on"
    )
    parser.add_argument(
        "--p3-peer-defaults",
        action="store_true",
        help="also SAELens's encoder with its default stopping rules (run once)",
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        help="A/B of Unfold's rows: the code at git revision REV against this working tree",
    )
    parser.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="only Unfold OMP on P1 and P3 on 1 device against N (split by rows, by features)",
    )
    parser.add_argument("--p2-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ab-worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--saelens-worker", help=argparse.SUPPRESS)
    parser.add_argument("--spams-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.n_features, args.d_model, args.k = 8192, 512, 32
    args.compile_shapes = [(32, 100), (64, 100)]
    args.p2_shape = (65536, 2304, args.p2_batch, 64)
    args.p3_shape, args.p3_ks = (24576, 768), (32, 64)
    if args.repeats is None:
        args.repeats = 5 if args.against else 1 if args.quick else 3
    if args.quick:
        args.n_features, args.d_model, args.k = 2048, 256, 16
        args.batch = min(args.batch, 512)
        args.sklearn_rows, args.sklearn_lasso_rows = 16, 4
        args.lasso_batch = min(args.lasso_batch, 256)
        args.compile_shapes = [(16, 100)]
        args.p2_batch, args.p2_sklearn_rows = min(args.p2_batch, 32), 1
        args.p2_shape = (16384, 768, args.p2_batch, 32)
        args.p3_shape, args.p3_ks = (4096, 256), (16, 32)
        args.p3_batch = min(args.p3_batch, 512)
        args.p3_peer_rows = min(args.p3_peer_rows, 64)
    args.p3_ks = tuple(args.p3_k or args.p3_ks)
    if args.spams_worker:
        spams_worker(args.spams_worker)
        return
    if args.p2_worker:
        p2_worker(args)
        return
    if args.saelens_worker:
        saelens_worker(args.saelens_worker)
        return
    if args.ab_worker:
        ab_worker(*args.ab_worker)
        return
    if args.against:
        run_ab(args)
        return
    if args.devices:
        run_devices(args)
        return
    if not (args.p2_only or args.p3_only):
        run_p1(args)
    if args.p2 or args.p2_only:
        run_p2(args)
    if args.p3 or args.p3_only:
        run_p3(args)


if __name__ == "__main__":
    main()
