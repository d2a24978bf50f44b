"""LASSO solvers: ISTA, FISTA with adaptive restart, and a working-set solver to a duality gap.

All three minimise, per row of centred activations ``x`` (batch, d_model),

    0.5 * ||x - codes @ D||^2 + alpha * ||codes||_1          (optionally codes >= 0)

in the dictionary's own units, and report the duality gap of what they return (see
`solvers._proximal`). A row is CONVERGED when ``gap <= tol * primal`` (or when the gap is
below the rounding noise of the dtype, see `gap_floor`), MAX_ITER otherwise.

- `ISTA`, `FISTA`: proximal gradient (`solvers._fista`) on all features (products with the
  dictionary, or with the Gram matrix when that is cheaper, i.e. n_features <= 2 d_model).
- `Lasso`: exact homotopy on working sets, certified by the global duality gap. A working set
  of w features (the current support plus the features closest to violating the dual
  constraint, ranked by ``(alpha - s |D r|_j) / ||d_j||``) is solved by the homotopy
  (LARS-lasso) path of `solvers._homotopy` on its Gram rows (gathered from the Gram matrix, or
  built from the atoms when matrix-free): exact, one step per entry or exit of a feature,
  O(w * capacity) per step. The path runs in segments, each continued from the last one's
  solution (no restart): from zero down to half the largest correlation outside the working
  set, then again from there, down to alpha. After each segment the full correlations
  ``D r`` (one product with the dictionary for a chunk of rows) give the global duality gap
  and the next working set; features that became violators join it and enter the path by a
  weighted homotopy (their penalty starts just above their correlation and falls to the
  level), so a working set that missed a feature costs a few steps, not a new path. Rows the
  path cannot finish (a feature dependent on the active set, or more active features than
  slots) are finished by the same FISTA on the working set's Gram block, with a step from
  its Gershgorin bound. The working set has static capacity: 128 features (64 active) first,
  then ``2 * max_nonzero`` for the rows whose support fills it (a `lax.cond` skips the large
  tier when no row of a chunk needs it). The working set's candidates come from a few
  min-passes over blocks of features rather than ``lax.top_k`` over all of them (see
  `smallest`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._dictionary import Dictionary
from ._driver import RUNNING, final_status, iterate, stop_code
from ._fista import proximal_gradient
from ._homotopy import PathState, empty_path, follow_path
from ._products import einsum, matmul
from ._proximal import (
    dual_scale,
    duality_gap,
    gap_floor,
    gap_met,
    padded_from_dense,
    peak_correlation,
    scale_from_peak,
)
from ._result import ChunkSolution, Status
from ._validation import check_nonnegative, check_positive_int

FIRST_TIER = 128
"""Working-set capacity tried first by `Lasso`."""
MAX_OUTER = 32
"""Working-set refreshes per capacity tier (a safety bound; max_iter binds first)."""
INNER_FRACTION = 0.25
"""The working-set subproblem is solved to this fraction of the target gap..."""
INNER_REDUCTION = 1e-5
"""...or to this fraction of the last global gap, whichever is larger."""
MAX_BUILT_BLOCK = 128
"""Matrix-free: largest working set whose Gram block is built from the atoms."""
MIN_PATH_STEPS = 64
"""The homotopy on a working set of w features stops after max(2 w, this) entries and exits."""
INNER_CANCEL_ROUNDS = 10
"""Rounds of working-set FISTA between the questions whether the solve is cancelled."""
SEGMENT_FRACTION = 0.5
"""Each homotopy segment ends at this fraction of the largest correlation outside its working
set (or at alpha): lower takes fewer working-set refreshes but more entries and exits."""
VIOLATOR_MARGIN = 1.1
"""A feature past the homotopy's level starts with this multiple of its correlation as penalty."""
EXACT_SLACK = 1e-4
"""A homotopy solution whose largest correlation is past alpha by more than this (relative)
has a violator to add, whatever its gap."""
STEP_MARGIN = 1.0 + 1e-4
"""Lipschitz bounds are inflated this much against rounding."""


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


@dataclasses.dataclass(frozen=True)
class _L1Settings:
    """Settings shared by the LASSO methods: hashable, and a pytree whose numbers (`alpha`,
    `tol`, `max_iter`) are traced under jit (a new penalty or budget compiles nothing new)
    while the rest (`positive`, `max_nonzero`) is static.

    Attributes:
        alpha: the l1 penalty (>= 0), in the units of ``0.5 * ||x - codes @ D||^2``.
        tol: relative duality-gap tolerance: a row converges when ``gap <= tol * objective``.
            The default 1e-6 is met as such in float64. In float32 a computed gap carries
            rounding noise of about ``eps * ||x|| * (||x|| + sum_j |c_j| ||d_j||)`` (typically
            1e-5 to 1e-3 of the objective, more for small alpha), and a gap under that floor
            counts as met: float32 rows report CONVERGED with their actual gap (objectives
            measured within 1e-8 relative of float64 and SPAMS solutions; tests assert 1e-5).
        max_iter: iteration budget per row (proximal-gradient steps).
        positive: constrain codes to be >= 0.
        max_nonzero: width of the padded output (at most this many non-zeros per row);
            defaults to ``min(n_features, d_model)``, the most a LASSO solution has generically.
            A row with more non-zeros reports Status.TOO_MANY_NONZEROS (nothing is dropped
            silently).
    """

    alpha: float
    tol: float = 1e-6
    max_iter: int = 1000
    positive: bool = False
    max_nonzero: int = 1

    name: ClassVar[str] = "lasso"
    default_max_iter: ClassVar[int] = 1000
    max_iter_limit: ClassVar[int] = 100_000
    """The largest `max_iter` accepted (`MAX_ITER_LIMITS`): work per request stays bounded."""
    uses_correlations: ClassVar[bool] = True
    """`solve` accepts ``correlations = x @ atoms.T`` computed for a whole block at once."""

    def row_floats(self, n_features: int, d_model: int, gram: bool) -> int:
        """Floats of working memory a row takes (`solvers.Plan` sizes calls by it): codes,
        momentum, correlations and temporaries of n_features, and the working sets' blocks."""
        width = min(2 * self.max_nonzero, n_features)
        return 8 * n_features + 4 * width * (width + d_model)

    @classmethod
    def from_params(
        cls,
        dictionary: Dictionary,
        alpha=None,
        tol=None,
        max_iter=None,
        positive=False,
        max_nonzero=None,
    ):
        if alpha is None:
            raise ValueError(f"{cls.name} needs alpha, the l1 penalty (a number >= 0)")
        n_features, d_model = dictionary.n_features, dictionary.d_model
        width = min(n_features, d_model)
        return cls(
            alpha=check_nonnegative("alpha", alpha),
            tol=1e-6 if tol is None else check_nonnegative("tol", tol),
            max_iter=cls.default_max_iter
            if max_iter is None
            else check_positive_int("max_iter", max_iter, upper=cls.max_iter_limit),
            positive=_check_bool("positive", positive),
            max_nonzero=width
            if max_nonzero is None
            else check_positive_int("max_nonzero", max_nonzero, upper=n_features),
        )


@dataclasses.dataclass(frozen=True)
class ISTA(_L1Settings):
    """Proximal gradient descent (ISTA) on the LASSO objective; see `_L1Settings`."""

    name: ClassVar[str] = "ista"
    max_iter_limit: ClassVar[int] = 1_000_000  # scikit-learn's float64 answers need 2e5 steps

    def solve(
        self, dictionary: Dictionary, x: jax.Array, correlations=None, plan=None
    ) -> ChunkSolution:
        return solve_proximal_gradient(self, dictionary, x, correlations, accelerated=False)


@dataclasses.dataclass(frozen=True)
class FISTA(_L1Settings):
    """FISTA with adaptive (gradient) restart on the LASSO objective; see `_L1Settings`."""

    name: ClassVar[str] = "fista"

    def solve(
        self, dictionary: Dictionary, x: jax.Array, correlations=None, plan=None
    ) -> ChunkSolution:
        return solve_proximal_gradient(self, dictionary, x, correlations, accelerated=True)


@dataclasses.dataclass(frozen=True)
class Lasso(_L1Settings):
    """The LASSO solved to a duality gap by homotopy on working sets; see `_L1Settings`.

    `max_iter` bounds the homotopy steps (entries and exits) plus any FISTA steps, summed over
    working-set refreshes; `n_iter` reports that sum.
    """

    max_iter: int = 10000

    name: ClassVar[str] = "lasso"
    default_max_iter: ClassVar[int] = 10000

    def solve(
        self, dictionary: Dictionary, x: jax.Array, correlations=None, plan=None
    ) -> ChunkSolution:
        """Solve a chunk of centred activations `x` of shape (batch, d_model); `correlations`,
        optional, is ``x @ dictionary.atoms.T`` of shape (batch, n_features)."""
        return solve_lasso(self, dictionary, x, correlations)


for _settings in (ISTA, FISTA, Lasso):
    jax.tree_util.register_dataclass(
        _settings, data_fields=["alpha", "tol", "max_iter"], meta_fields=["positive", "max_nonzero"]
    )


# --------------------------------------------------------------------------------------------
# ISTA / FISTA on all features


def solve_proximal_gradient(
    settings: _L1Settings,
    dictionary: Dictionary,
    x: jax.Array,
    correlations: jax.Array | None = None,
    *,
    accelerated: bool,
) -> ChunkSolution:
    """ISTA or restarted FISTA on a chunk `x` of shape (batch, d_model).

    Indices and values come back of shape (batch, max_nonzero).
    """
    atoms = dictionary.atoms
    n_features, d_model = atoms.shape
    dtype = x.dtype
    alpha = jnp.asarray(settings.alpha, dtype)
    positive = settings.positive
    use_gram = dictionary.gram is not None and n_features <= 2 * d_model
    step = 1.0 / (dictionary.lipschitz * STEP_MARGIN)
    x_norm = jnp.linalg.norm(x, axis=1)
    x_sq = x_norm * x_norm
    alpha0 = matmul(x, atoms.T) if correlations is None else correlations  # (batch, n_features)

    def correlations(codes):
        """``D (x - codes @ D)`` of shape (batch, n_features)."""
        if use_gram:
            return alpha0 - matmul(codes, dictionary.gram)
        return matmul(x - matmul(codes, atoms), atoms.T)

    def gap_at(codes):
        if use_gram:
            corr = correlations(codes)
            residual_sq = jnp.maximum(
                x_sq - jnp.sum(codes * alpha0, axis=1) - jnp.sum(codes * corr, axis=1), 0.0
            )
        else:
            residual = x - matmul(codes, atoms)
            residual_sq = jnp.sum(residual * residual, axis=1)
            corr = matmul(residual, atoms.T)
        scale = dual_scale(corr, alpha, positive)
        gap, primal = duality_gap(residual_sq, codes, corr, scale, alpha)
        floor = gap_floor(x_norm, matmul(jnp.abs(codes), dictionary.norms), dtype)
        return gap, gap_met(gap, primal, floor, settings.tol)

    batch = x.shape[0]
    final, stop = proximal_gradient(
        jnp.zeros((batch, n_features), dtype),
        correlations,
        step,
        alpha,
        positive,
        gap_at,
        settings.max_iter,
        jnp.zeros((batch,), jnp.int32),
        accelerated=accelerated,
    )
    indices, values, overflow = padded_from_dense(final.codes, settings.max_nonzero)
    status = final_status(stop, Status.MAX_ITER)
    status = jnp.where(overflow, Status.TOO_MANY_NONZEROS, status).astype(jnp.int32)
    return ChunkSolution(indices, values, final.n_iter, status, final.gap)


# --------------------------------------------------------------------------------------------
# Working-set LASSO


class _Outer(NamedTuple):
    codes: jax.Array  # (batch, n_features) dense codes
    correlations: jax.Array  # (batch, n_features) D r at `codes`
    scale: jax.Array  # (batch,) dual scaling s at `codes`
    gap: jax.Array  # (batch,)
    primal: jax.Array  # (batch,)
    residual_sq: jax.Array  # (batch,) ||x - codes @ D||^2
    met: jax.Array  # (batch,) bool: the gap met the tolerance
    crowded: jax.Array  # (batch,) bool: the support filled the working set in the last pass
    full: jax.Array  # (batch,) bool: ...in the last two passes: it needs a larger one
    done: jax.Array  # (batch,) bool: no more work in this tier
    n_iter: jax.Array  # (batch,) int32 homotopy and FISTA steps so far
    outer: jax.Array  # () int32 working-set refreshes in this tier


BLOCK = 64
"""`smallest`: features per block of its first, per-block selection..."""
PER_BLOCK = 4
"""... and how many of each block's smallest go on to the final selection."""


def smallest(priority: jax.Array, forced: jax.Array, width: int) -> jax.Array:
    """`width` features of each row: those of `forced` (batch, f) int32 (-1: none), then those of
    smallest `priority` (batch, n_features), without repeats (unordered).

    ``lax.top_k`` over all features costs more on a CPU than the product with the dictionary
    that precedes it, so when the blocks leave enough candidates the choice is made among the
    `PER_BLOCK` smallest of each block of `BLOCK` features (found by as many min-passes, in
    order of index on ties): the same features unless a block holds more than `PER_BLOCK` of
    them, when the next best take their places. A working set only needs good candidates: the
    global duality gap, not the working set, certifies the solution.
    """
    batch, n = priority.shape
    rows = jnp.arange(batch)[:, None]
    used = forced >= 0
    n_blocks = n // BLOCK
    if n % BLOCK or PER_BLOCK * n_blocks < 2 * width + forced.shape[1]:
        priority = priority.at[rows, jnp.maximum(forced, 0)].min(jnp.where(used, -jnp.inf, jnp.inf))
        return jax.lax.top_k(-priority, width)[1]
    # Forced features are candidates of their own, so they take no block's place.
    blocks = priority.at[rows, jnp.maximum(forced, 0)].max(jnp.where(used, jnp.inf, -jnp.inf))
    blocks = blocks.reshape(batch, n_blocks, BLOCK)
    offsets = jnp.arange(BLOCK, dtype=jnp.int32)
    values, indices = [], []
    for _ in range(PER_BLOCK):
        best = jnp.min(blocks, axis=2)
        index = jnp.min(jnp.where(blocks == best[..., None], offsets, BLOCK), axis=2)
        blocks = jnp.where(offsets == index[..., None], jnp.inf, blocks)
        values.append(best)
        indices.append(index)
    starts = jnp.arange(n_blocks, dtype=jnp.int32) * BLOCK
    candidates = jnp.concatenate(
        [jnp.where(used, forced, 0)] + [starts + jnp.minimum(i, BLOCK - 1) for i in indices], 1
    )
    values = jnp.concatenate([jnp.where(used, -jnp.inf, jnp.inf)] + values, axis=1)
    return jnp.take_along_axis(candidates, jax.lax.top_k(-values, width)[1], axis=1)


def solve_lasso(
    settings: Lasso, dictionary: Dictionary, x: jax.Array, correlations: jax.Array | None = None
) -> ChunkSolution:
    """The working-set LASSO on a chunk `x` of shape (batch, d_model).

    Indices and values come back of shape (batch, max_nonzero).
    """
    atoms = dictionary.atoms
    n_features, d_model = atoms.shape
    dtype = x.dtype
    batch = x.shape[0]
    rows = jnp.arange(batch)[:, None]
    alpha = jnp.asarray(settings.alpha, dtype)
    positive = settings.positive
    tol = settings.tol
    max_iter = settings.max_iter
    x_norm = jnp.linalg.norm(x, axis=1)
    x_sq = x_norm * x_norm
    alpha0 = matmul(x, atoms.T) if correlations is None else correlations  # (batch, n_features)
    lipschitz = dictionary.lipschitz * STEP_MARGIN

    def check(codes, residual, n_iter, *, exact, full, last_tier, previous_done, corr=None):
        """Global gap at dense `codes` (batch, n_features) with residual (batch, d_model), and
        the per-row stopping state. For the rows whose codes are `exact` (homotopy) solutions
        of their working set, a gap under the rounding floor counts as met only when no
        feature is past alpha: its correlation is known far better than the gap."""
        residual_sq = jnp.sum(residual * residual, axis=1)
        corr = matmul(residual, atoms.T) if corr is None else corr
        peak = peak_correlation(corr, positive)
        scale = scale_from_peak(peak, alpha)
        gap, primal = duality_gap(residual_sq, codes, corr, scale, alpha)
        floor = gap_floor(x_norm, matmul(jnp.abs(codes), dictionary.norms), dtype)
        violated = exact & (peak > alpha * (1.0 + EXACT_SLACK))
        met = gap_met(gap, primal, jnp.where(violated, 0.0, floor), tol)
        done = previous_done | met | (n_iter >= max_iter) | (full & (not last_tier))
        return corr, scale, gap, primal, residual_sq, met, done

    def inner_solve(codes, gram_block, b_block, step, target, active, budget, apply_gram):
        """Restarted FISTA on the working-set subproblem, of shape (batch, w)."""

        def corr_of(c):
            return b_block - apply_gram(c, gram_block)

        def inner_gap(c):
            corr = corr_of(c)
            residual_sq = jnp.maximum(
                x_sq - jnp.sum(c * b_block, axis=1) - jnp.sum(c * corr, axis=1), 0.0
            )
            scale = dual_scale(corr, alpha, positive)
            gap, primal = duality_gap(residual_sq, c, corr, scale, alpha)
            return gap, primal

        def converged(c):
            gap, _ = inner_gap(c)
            return gap, gap <= target

        stop = jnp.where(active, RUNNING, stop_code(Status.CONVERGED))
        # Nested in the refreshes, which ask each time: cheap working-set steps ask rarely.
        final, _ = proximal_gradient(
            codes,
            corr_of,
            step,
            alpha,
            positive,
            converged,
            budget,
            stop,
            cancel_rounds=INNER_CANCEL_ROUNDS,
            ask_first=False,
        )
        return final.codes, final.n_iter

    def run_tier(width: int, last_tier: bool, start: _Outer) -> _Outer:
        use_gram = dictionary.gram is not None
        # Without a Gram matrix, the w x w block is built from the w atoms for a small working
        # set. A large one (rare: supports of hundreds of features) would need w x d_model
        # gathered atoms per row, too much memory for the big dictionaries this path is for;
        # its products go through the whole dictionary instead (memory O(batch n_features)),
        # and FISTA alone solves the working set.
        block_free = not use_gram and width > MAX_BUILT_BLOCK
        capacity = min(max(width // 2, 1), d_model)

        def apply_gram(c, block):
            if block_free:  # block holds the working set's indices (batch, w)
                dense = jnp.zeros((batch, n_features), dtype).at[rows, block].set(c)
                return jnp.take_along_axis(matmul(matmul(dense, atoms), atoms.T), block, axis=1)
            return einsum("bw,bwv->bv", c, block)

        def refresh(carry: tuple[_Outer, PathState, jax.Array, jax.Array, jax.Array], active):
            """A new working set for each running (`active`) row, solved, then the global
            duality gap."""
            s, current, level, fallback, previous = carry
            signed = s.correlations if positive else jnp.abs(s.correlations)
            priority = jnp.where(  # no penalty (s = 0): rank by correlation alone
                alpha > 0,
                (alpha - s.scale[:, None] * signed) / dictionary.norms,
                -signed / dictionary.norms,
            )
            # The support always belongs to the working set: on the path's rows it is the
            # path's active set; on FISTA's, it lies in the previous working set.
            priority = jnp.where(s.codes != 0, -jnp.inf, priority)
            in_previous = jnp.take_along_axis(s.codes, jnp.maximum(previous, 0), axis=1)
            support = jnp.where((previous >= 0) & (in_previous != 0), previous, -1)
            path_set = jnp.pad(
                current.positions, ((0, 0), (0, width - capacity)), constant_values=-1
            )
            forced = jnp.where(fallback[:, None], support, path_set)
            # In index order: Gram entries are then gathered along increasing addresses.
            working_set = jnp.sort(smallest(priority, forced, width), axis=1)
            codes_w = jnp.take_along_axis(s.codes, working_set, axis=1)
            b_w = jnp.take_along_axis(alpha0, working_set, axis=1)
            sub = None if use_gram or block_free else atoms[working_set]  # (batch, w, d_model)

            def gram_rows(features):
                """Rows of the working set's Gram block for `features` (batch, ...) global."""
                if use_gram:
                    return dictionary.gram[
                        features[..., None],
                        working_set.reshape((batch,) + (1,) * (features.ndim - 1) + (width,)),
                    ]
                return einsum("b...d,bwd->b...w", atoms[features], sub)

            path_steps = jnp.zeros((batch,), jnp.int32)
            crowded_path = jnp.zeros((batch,), bool)
            if block_free:
                fallback = fallback | active
            else:
                # The homotopy on the working set, from the current solution (at penalty
                # `level`; zero at first) towards alpha, down to a fraction of the largest
                # correlation outside the working set (the features that could compete next).
                inside = jnp.zeros((batch, n_features), bool).at[rows, working_set].set(True)
                outside = jnp.max(jnp.where(inside, -jnp.inf, signed), axis=1)
                cold = ~jnp.isfinite(level)
                target = jnp.maximum(alpha, SEGMENT_FRACTION * outside)
                match = current.positions[:, :, None] == working_set[:, None, :]
                used = current.positions >= 0
                positions = jnp.where(used, jnp.argmax(match, axis=2).astype(jnp.int32), -1)
                slot_rows = jnp.where(
                    used[:, :, None], gram_rows(jnp.maximum(current.positions, 0)), 0.0
                )
                start = current._replace(positions=positions, gram_rows=slot_rows)
                # Penalties at the start: the current level on the active set and below it;
                # past it (features new to the working set) a little above their correlation,
                # so that they enter one at a time. From zero: all at the largest correlation.
                signed_w = jnp.take_along_axis(signed, working_set, axis=1)
                on_path = (
                    jnp.zeros((batch, width), bool).at[rows, jnp.maximum(positions, 0)].max(used)
                )
                penalties = jnp.where(
                    on_path | (signed_w <= level[:, None]),
                    level[:, None],
                    VIOLATOR_MARGIN * signed_w,
                )
                penalties = jnp.where(
                    cold[:, None], jnp.max(signed_w, axis=1, keepdims=True), penalties
                )
                path = active & ~fallback
                end, path_steps, finished, crowded_path = follow_path(
                    lambda j: gram_rows(jnp.take_along_axis(working_set, j[:, None], 1)[:, 0]),
                    dictionary.norms[working_set] ** 2,
                    b_w,
                    penalties,
                    target,
                    start,
                    positive=positive,
                    running=path,
                    max_steps=jnp.clip(max_iter - s.n_iter, 0, max(2 * width, MIN_PATH_STEPS)),
                )
                solved = (
                    jnp.zeros((batch, width), dtype)
                    .at[rows, jnp.maximum(end.positions, 0)]
                    .add(jnp.where(end.positions >= 0, end.codes, 0.0))
                )
                codes_w = jnp.where(path[:, None], solved, codes_w)
                fallback = fallback | (path & ~finished)
                level = jnp.where(path & finished, target, level)
                features = jnp.take_along_axis(working_set, jnp.maximum(end.positions, 0), axis=1)
                current = end._replace(positions=jnp.where(end.positions >= 0, features, -1))

            # FISTA (warm) for the rows the homotopy could not solve: the working set's problem
            # only as far as it deserves (celer): a fraction of the last global gap, down to
            # the tolerance; never below the rounding floor.
            polish = active & fallback

            def run_fista(codes_w):
                if block_free:
                    block = working_set
                    step = jnp.full((batch,), 1.0 / lipschitz, dtype)
                else:
                    block = gram_rows(working_set)
                    bound = jnp.max(jnp.sum(jnp.abs(block), axis=2), axis=1)
                    step = 1.0 / jnp.minimum(bound * STEP_MARGIN, lipschitz)
                floor = gap_floor(x_norm, matmul(jnp.abs(s.codes), dictionary.norms), dtype)
                target = jnp.maximum(
                    INNER_FRACTION * tol * s.primal, jnp.maximum(floor, INNER_REDUCTION * s.gap)
                )
                return inner_solve(
                    codes_w,
                    block,
                    b_w,
                    step,
                    target,
                    polish,
                    max_iter - s.n_iter - path_steps,
                    apply_gram,
                )

            codes_w, steps = jax.lax.cond(
                jnp.any(polish),
                run_fista,
                lambda c: (c, jnp.zeros((batch,), jnp.int32)),
                codes_w,
            )
            dense = jnp.zeros_like(s.codes).at[rows, working_set].set(codes_w)
            codes = jnp.where(active[:, None], dense, s.codes)
            n_iter = s.n_iter + path_steps + steps
            nonzero = jnp.sum(codes_w != 0, axis=1)
            crowded = active & (crowded_path | (nonzero > width - max(1, width // 8)))
            crowded = crowded & (width < n_features)
            full = crowded & s.crowded  # early iterates may be dense: only a lasting excess
            if block_free:
                residual = x - matmul(codes, atoms)
            else:  # from the path's slots (and the working set for FISTA's rows, if any):
                # gathered atoms are cheaper than a product with the dictionary
                on_slots = jnp.where(current.positions >= 0, current.codes, 0.0)
                slot_atoms = atoms[jnp.maximum(current.positions, 0)]
                residual = x - einsum("bm,bmd->bd", on_slots, slot_atoms)
                residual = jax.lax.cond(
                    jnp.any(polish),
                    lambda r: jnp.where(
                        polish[:, None],
                        x - einsum("bw,bwd->bd", codes_w, atoms[working_set]),
                        r,
                    ),
                    lambda r: r,
                    residual,
                )
            corr, scale, gap, primal, residual_sq, met, done = check(
                codes,
                residual,
                n_iter,
                exact=~fallback,
                full=full,
                last_tier=last_tier,
                previous_done=s.done,
            )
            # No progress at alpha: the support did not change and the gap did not even halve
            # (a problem solved to its rounding floor, with no violator left to add).
            same_support = jnp.all((codes != 0) == (s.codes != 0), axis=1)
            at_alpha = fallback | (level <= alpha)
            stuck = active & (s.outer > 0) & at_alpha & same_support & ~(gap < 0.5 * s.gap)
            done = done | stuck
            keep = active[:, None]
            state = _Outer(
                codes=codes,
                correlations=jnp.where(keep, corr, s.correlations),
                scale=jnp.where(active, scale, s.scale),
                gap=jnp.where(active, gap, s.gap),
                primal=jnp.where(active, primal, s.primal),
                residual_sq=jnp.where(active, residual_sq, s.residual_sq),
                met=jnp.where(active, met, s.met),
                crowded=jnp.where(active, crowded, s.crowded),
                full=jnp.where(active, full, s.full),
                done=done,
                n_iter=n_iter,
                outer=s.outer + 1,
            )
            return state, current, level, fallback, working_set

        start = start._replace(outer=jnp.zeros((), jnp.int32))
        carry = (
            start,
            empty_path(batch, capacity, width, dtype),
            jnp.full((batch,), jnp.inf, dtype),
            jnp.zeros((batch,), bool),
            jnp.full((batch, width), -1, jnp.int32),  # no previous working set
        )

        # `done` (per row) ends a row's work in this tier; its status comes from `met`/`full`.
        def terminate(carry) -> jax.Array:
            return jnp.where(carry[0].done, stop_code(Status.CONVERGED), RUNNING)

        carry, _ = iterate(refresh, terminate, carry, terminate(carry), MAX_OUTER, cancel_every=1)
        return carry[0]

    zeros = jnp.zeros((batch, n_features), dtype)
    no_iter = jnp.zeros((batch,), jnp.int32)
    false = jnp.zeros((batch,), bool)
    corr, scale, gap, primal, residual_sq, met, done = check(
        zeros,
        x,
        no_iter,
        exact=jnp.ones((batch,), bool),  # zero codes: exact until a feature passes alpha
        full=false,
        last_tier=True,
        previous_done=false,
        corr=alpha0,
    )
    state = _Outer(
        zeros,
        corr,
        scale,
        gap,
        primal,
        residual_sq,
        met,
        false,
        false,
        done,
        no_iter,
        jnp.zeros((), jnp.int32),
    )

    cap = settings.max_nonzero
    # Working-set capacities: small first; then room for `max_nonzero` non-zeros and as many
    # candidates, so that even a support of d_model features can still swap features.
    tiers = sorted({min(FIRST_TIER, n_features), min(max(2 * cap, FIRST_TIER), n_features)})
    state = run_tier(tiers[0], len(tiers) == 1, state)
    for width in tiers[1:]:
        escalate = state.full & ~state.met & (state.n_iter < max_iter)
        state = state._replace(done=~escalate)
        state = jax.lax.cond(
            jnp.any(escalate),
            lambda s, w=width: run_tier(w, True, s),
            lambda s: s,
            state,
        )

    indices, values, overflow = padded_from_dense(state.codes, cap)
    status = jnp.where(state.met, Status.CONVERGED, Status.MAX_ITER)
    too_many = overflow | (~state.met & state.full)
    status = jnp.where(too_many, Status.TOO_MANY_NONZEROS, status).astype(jnp.int32)
    # The residual is known for the codes returned, unless some were dropped (NaN: the caller
    # recomputes it).
    residual_norm = jnp.where(overflow, jnp.nan, jnp.sqrt(state.residual_sq))
    return ChunkSolution(indices, values, state.n_iter, status, state.gap, residual_norm)
