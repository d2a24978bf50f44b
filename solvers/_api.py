"""The public entry points: `unfold` (numpy in and out, any batch size) and `solve` (pure JAX,
jittable), and the host-side running of a batch as padded calls on threads."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import MutableMapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._dictionary import Dictionary, precision, prepare
from ._driver import Cancelled, cancellation, registered
from ._lasso import FISTA, ISTA, Lasso
from ._omp import OMP
from ._plan import Plan, plan_for
from ._products import einsum, matmul
from ._result import ChunkSolution, Solution, UnfoldResult
from ._sharding import mesh_of, over_rows, replicated, split
from ._validation import check_activations, check_positive_int

METHODS: dict[str, type] = {"omp": OMP, "ista": ISTA, "fista": FISTA, "lasso": Lasso}
"""Solver settings class of each method name."""

RUN_ALONE = threading.Lock()
"""Held by the calls of plans whose ``run_alone`` is true, in every thread of the process:
XLA's CPU runtime is shared by the whole process, and such programs deadlock when two run at
once."""


def make_settings(method: str, dictionary: Dictionary, **params):
    """Validated, hashable settings of `method` for `dictionary`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    try:
        return METHODS[method].from_params(dictionary, **params)
    except TypeError as error:  # an unknown keyword
        raise ValueError(f"bad parameters for method {method!r}: {error}") from None


def unfold(
    activations,
    dictionary,
    method="omp",
    *,
    bias=None,
    dtype: str | None = None,
    plan: Plan | None = None,
    chunk_rows: int | None = None,
    block_rows: int | None = None,
    streams: int | None = None,
    scan: str | None = None,
    cancel: threading.Event | None = None,
    executables: MutableMapping[int, Any] | None = None,
    **params,
) -> UnfoldResult:
    """Sparse codes of `activations` over the feature directions of `dictionary`.

    Args:
        activations: of shape (batch, d_model), or a single vector of shape (d_model,).
        dictionary: feature directions of shape (n_features, d_model), or a `Dictionary`
            from `prepare` (which holds the per-dictionary precomputation: reuse it).
        method: one of `METHODS` ("omp", ...), or settings from `make_settings` for this
            dictionary (then no `params`): callers that solve many batches with the same
            settings validate them once.
        bias: optional decoder bias of shape (d_model,) (only with a raw dictionary).
        dtype: "float32" or "float64"; None: a prepared dictionary's own, else "float32".
        plan: how to run (`Plan`); None: `plan_for` the backend, with `chunk_rows` (rows
            solved together), `block_rows` (rows per compiled call), `streams` (calls at
            once, each from its own thread) and `scan` (OMP's scan precision) overriding it.
        cancel: an event another thread may set to stop the solve: no new call starts, and
            the running ones end within a few iterations (the LASSO methods' rounds, OMP's
            steps past k = 64; OMP with k <= 64 finishes its call); `Cancelled` is raised.
        executables: where to keep the programs compiled for these settings' calls (by their
            padded rows; pass the same mapping with the same settings structure, plan and
            dictionary shape each time): a caller that holds it decides when they are freed.
            None: jit's own cache keeps them for the life of the process.
        **params: the method's settings, e.g. ``k`` and ``tol`` for "omp".

    Returns:
        An `UnfoldResult` of numpy arrays, codes in the dictionary's own units.

    Raises:
        ValueError: naming the bad shape, value or parameter.
        Cancelled: `cancel` was set before the solve finished.
    """
    dictionary = prepare(dictionary, bias, dtype=dtype)
    if isinstance(method, str):
        settings = make_settings(method, dictionary, **params)
    elif isinstance(method, tuple(METHODS.values())) and not params:
        settings = method
    else:
        raise ValueError(
            "method must be a name in METHODS (with its parameters), or settings from "
            f"make_settings (alone), got {method!r} with parameters {sorted(params)}"
        )
    x, single = check_activations(activations, dictionary.d_model, dictionary.dtype)
    overrides = dict(chunk_rows=chunk_rows, block_rows=block_rows, streams=streams)
    for name, value in overrides.items():
        if value is not None:
            check_positive_int(name, value)
    if plan is None:
        plan = _plan_of(settings, dictionary, scan=scan, **overrides)
    elif not isinstance(plan, Plan) or any(v is not None for v in (*overrides.values(), scan)):
        raise ValueError("pass either a Plan or its overrides (chunk_rows, ...), not both")
    with precision(dictionary.dtype):  # float64: JAX's 64-bit mode for this call only
        result = run(settings, dictionary, x, plan, cancel, executables)
    if single:
        fields = result._asdict().items()
        return result._replace(**{f: v[0] for f, v in fields if f != "n_features"})
    return result


def _plan_of(settings, dictionary: Dictionary, **overrides) -> Plan:
    """`plan_for`, remembered for what it depends on (the settings' static fields, the
    dictionary's shape, dtype, path, scan and device): a server asks for the same plan batch
    after batch, and an accelerator's plan stays the same as its free memory moves (so no new
    program compiles)."""
    key = (
        jax.tree_util.tree_structure(settings),  # its class and static fields, not alpha or tol
        dictionary.atoms.shape,
        dictionary.dtype,
        dictionary.path,
        dictionary.scan_atoms is None,
        dictionary.atoms.sharding,
        tuple(sorted(overrides.items())),
    )
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = plan_for(settings, dictionary, **overrides)
    return plan


_PLANS: dict = {}
MAX_PLANS = 1024
"""Plans remembered by `_plan_of` (all forgotten when full)."""


def run(
    settings,
    dictionary: Dictionary,
    x: np.ndarray,
    plan: Plan,
    cancel: threading.Event | None = None,
    executables: MutableMapping[int, Any] | None = None,
) -> UnfoldResult:
    """Run validated `settings` on validated activations `x` of shape (batch, d_model).

    The batch is cut into calls, each padded so that any batch size reuses a handful of
    compiled programs (`Plan.calls`); ``plan.streams`` calls run at once, each from its own
    thread (`run_in_lanes`; JAX releases the GIL while a call runs). On several devices a
    call's rows are split between them (``shard="rows"``) or given to each
    (``shard="features"``). Setting `cancel` stops the solve (`Cancelled`): no call starts
    after it, and the running ones stop at their loops' next question (`cancellation`).
    With `executables`, each call's program is compiled ahead of time into it (`unfold`).
    """
    program, place = _solve_jit, jnp.asarray
    if dictionary.shard is not None:
        program, place = _program_on(dictionary, plan)

    def call(piece: tuple[range, int]) -> list[np.ndarray]:
        if cancel is not None and cancel.is_set():
            raise Cancelled("the solve was cancelled")
        rows, n_padded = piece
        padded = np.zeros((n_padded, x.shape[1]), x.dtype)
        padded[: len(rows)] = x[rows.start : rows.stop]
        with precision(dictionary.dtype):  # thread-local: entered by each thread
            args = (settings, dictionary, place(padded))
            if executables is None:
                out = program(*args, plan, jnp.int32(token))
            else:
                executable = executables.get(n_padded)
                if executable is None:
                    lowered = program.lower(*args, plan, jnp.int32(0))
                    executable = executables[n_padded] = lowered.compile()
                out = executable(*args, jnp.int32(token))
            out = [np.asarray(field)[: len(rows)] for field in out]
        if cancel is not None and cancel.is_set():  # maybe stopped midway
            raise Cancelled("the solve was cancelled")
        return out

    calls = plan.calls(x.shape[0])
    # One call at a time, and none of another such program alongside, for plans that run alone.
    with (
        registered(cancel) as token,
        RUN_ALONE if plan.run_alone else contextlib.nullcontext(),
    ):
        parts = run_in_lanes(call, calls, min(plan.streams, len(calls)))
    fields = [np.concatenate([part[i] for part in parts]) for i in range(len(parts[0]))]
    return UnfoldResult(*fields, n_features=dictionary.n_features)


def run_in_lanes(function, items: list, lanes: int) -> list:
    """``[function(item) for item in items]``, with up to `lanes` items in progress at once:
    this thread and ``lanes - 1`` threads of a pool kept for the process (`_LANE_POOL`), each
    taking the next item when done with one. After an error no lane takes a new item, and the
    error is raised once every lane has stopped.

    Threads are reused rather than started per call: starting and joining a thread hands the
    GIL over, and a caller whose process keeps the GIL busy (a server's event loop) waits up to
    a switch interval (5 ms) at each hand-over.
    """
    if lanes <= 1:
        return [function(item) for item in items]
    results = [None] * len(items)
    pending = iter(enumerate(items))
    lock = threading.Lock()
    failed = threading.Event()  # once a lane fails, the others take no new item

    def lane() -> None:
        while not failed.is_set():
            with lock:
                index, item = next(pending, (None, None))
            if index is None:
                return
            try:
                results[index] = function(item)
            except BaseException:
                failed.set()
                raise

    helpers = [_LANE_POOL.submit(lane) for _ in range(lanes - 1)]
    try:
        lane()
    finally:
        for helper in helpers:  # wait for every lane (and raise its error) before returning
            helper.result()
    return results


_LANE_POOL = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="unfold-stream")
"""The process's helper threads for `run_in_lanes` (a pool starts its threads on first use)."""


def solve(
    settings,
    dictionary: Dictionary,
    x: jax.Array,
    plan: Plan | None = None,
    cancel: jax.Array | None = None,
) -> Solution:
    """Sparse codes of activations `x` of shape (batch, d_model): pure JAX, usable inside
    jitted code (``jax.jit(solvers.solve, static_argnames="plan")``).

    Args:
        settings: from `make_settings` (a pytree: its numbers, `tol`, `alpha` and
            `max_iter`, are traced, the rest is static, so one program serves every penalty,
            tolerance and budget).
        dictionary: from `prepare`.
        x: of shape (batch, d_model), in the dictionary's dtype.
        plan: how to run (static); None: `plan_for` the dictionary's backend. Rows are solved
            ``plan.chunk_rows`` at a time (`lax.map` over chunks; a partial chunk is padded).
        cancel: None, or an int32 scalar: the token of an event (`unfold` passes its own)
            that the loops ask about now and then, ending early once it is set. Programs
            that ask are not kept in JAX's persistent compilation cache.

    Returns:
        A `Solution` of device arrays, each of shape (batch, ...).
    """
    if plan is None:
        plan = plan_for(settings, dictionary)
    dictionary = dictionary.unpadded()
    batch, d_model = x.shape
    if d_model != dictionary.d_model:
        raise ValueError(f"x has shape {x.shape}; it needs (batch, {dictionary.d_model})")
    chunk_rows = max(1, min(plan.chunk_rows, batch))
    n_chunks = -(-batch // chunk_rows)
    centred = x - dictionary.bias
    if n_chunks * chunk_rows != batch:  # zero rows stop at once (EXACT)
        centred = jnp.pad(centred, ((0, n_chunks * chunk_rows - batch), (0, 0)))
    with_correlations = dictionary.gram is not None and getattr(
        settings, "uses_correlations", False
    )

    def solve_chunk(args):
        chunk, correlations = args
        with cancellation(cancel):
            if with_correlations:
                sol = settings.solve(dictionary, chunk, correlations=correlations, plan=plan)
            else:
                sol = settings.solve(dictionary, chunk, plan=plan)
        checks = diagnostics(dictionary, chunk, sol)
        return (*sol[:2], *checks, sol.n_iter, sol.status, sol.duality_gap)

    chunks = centred.reshape(n_chunks, chunk_rows, d_model)
    if with_correlations:  # one product for all the rows
        correlations = matmul(centred, dictionary.atoms.T)
        correlations = correlations.reshape(n_chunks, chunk_rows, dictionary.n_features)
    else:
        correlations = jnp.zeros((n_chunks, 0), centred.dtype)
    if n_chunks == 1:
        out = jax.tree_util.tree_map(lambda a: a[None], solve_chunk((chunks[0], correlations[0])))
    else:
        out = jax.lax.map(solve_chunk, (chunks, correlations))
    # Each output is (chunks, chunk_rows, ...): back to (batch, ...).
    return Solution(*(field.reshape(-1, *field.shape[2:])[:batch] for field in out))


_solve_jit = jax.jit(solve, static_argnames="plan")


def _program_on(dictionary: Dictionary, plan: Plan):
    """(program, placement of a call's padded rows) for a dictionary on several devices."""
    mesh = mesh_of(dictionary.devices)
    if dictionary.shard == "features":
        return _solve_jit, lambda rows: jax.device_put(rows, replicated(mesh))
    if plan.shard != "rows" or plan.devices != mesh.size:
        raise ValueError(
            f"the dictionary's rows are split across {mesh.size} devices: use a plan from "
            "plan_for for it"
        )
    return over_rows(solve, mesh), lambda rows: jax.device_put(rows, split(mesh))


GATHER_WIDTH = 64
"""Reconstruct codes at most this wide from gathered atoms (batch, width, d_model); wider
ones (the LASSO's, up to d_model) through dense codes and one product with the dictionary."""


def diagnostics(dictionary: Dictionary, x: jax.Array, sol: ChunkSolution):
    """(residual_norm, relative_error, l0) of padded sparse codes for centred `x`."""
    values = jnp.where(sol.indices >= 0, sol.values, 0.0)
    batch, width = values.shape

    def residual_norm_of_codes():
        if width <= GATHER_WIDTH:
            atoms = dictionary.atoms[jnp.maximum(sol.indices, 0)]  # (batch, width, d_model)
            reconstruction = einsum("bw,bwm->bm", values, atoms)
        else:  # padding slots add 0 to feature 0
            dense = jnp.zeros((batch, dictionary.n_features), values.dtype)
            dense = dense.at[jnp.arange(batch)[:, None], jnp.maximum(sol.indices, 0)].add(values)
            reconstruction = matmul(dense, dictionary.atoms)
        return jnp.linalg.norm(x - reconstruction, axis=1)

    if sol.residual_norm is None:
        residual_norm = residual_norm_of_codes()
    else:  # the solver's own, unless it does not know some row's
        residual_norm = jax.lax.cond(
            jnp.any(jnp.isnan(sol.residual_norm)),
            residual_norm_of_codes,
            lambda: sol.residual_norm,
        )
    x_norm = jnp.linalg.norm(x, axis=1)
    relative_error = jnp.where(x_norm > 0, residual_norm / jnp.where(x_norm > 0, x_norm, 1), 0.0)
    l0 = jnp.sum((sol.indices >= 0) & (values != 0), axis=1).astype(jnp.int32)
    return residual_norm, relative_error, l0
