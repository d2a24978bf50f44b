"""Orthogonal Matching Pursuit, batched, on the Gram matrix or matrix-free; and its
non-negative variant.

OMP grows the *inverse* Cholesky factor ``Linv`` of the selected Gram block one row per step
(``Linv @ G_SS @ Linv.T = I``), so no triangular solve runs inside the loop. With
``ov = Linv @ G[S, j]`` (the new atom against the orthonormalised support),
``diag = sqrt(||d_j||^2 - ||ov||^2)`` and ``z_t = (<d_j, x> - ov . z) / diag``, the codes on the
support are ``gamma = Linv.T @ z`` at every step, and the residual correlations are recomputed
from scratch, never updated by accumulation (no drift in float32):

- Gram path (Batch-OMP, Rubinstein, Zibulevsky & Elad 2008): ``c = D x - gamma @ G[S]``.
  Each step gathers one row of the Gram matrix; the rows of the support are kept per row of the
  batch, in segments of `SEGMENT` steps so that step t reads about t rows, not k (the product
  ``gamma @ G[S]``, of ``n_features * t`` multiply-adds, is the bulk of the work: about
  ``n_features * k^2 / 2`` per row in all). Steps are not unrolled: compilation stays a few
  seconds for any k.
- Matrix-free path: ``c = D (x - gamma @ D[S])``, one product with the dictionary per step;
  memory O(batch * n_features) per chunk, for dictionaries too large for a Gram matrix.

The best atom is found by a two-level search (block maxima, then the winning block), which
returns the first index of the maximum like ``argmax`` but in vectorised passes.

Non-negative OMP (``positive=True``): each step adds the atom with the largest positive
norm-scaled correlation, then solves the non-negative least squares on the support by the
inner loop of Lawson & Hanson (1974) from the previous solution (warm start): an atom whose
coefficient would go negative is dropped from the support. It stops with
`Status.NO_POSITIVE_CORRELATION` once no atom correlates positively with the residual.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._dictionary import Dictionary
from ._driver import RUNNING, final_status, initial_stop, iterate, stop_code
from ._products import einsum, matmul
from ._result import ChunkSolution, Status
from ._scan import exact_select, scan
from ._validation import check_nonnegative, check_positive_int

SEGMENT = 8
"""Gram path: steps per segment of stored Gram rows (a compiled loop each) ..."""
MAX_SEGMENTS = 8
"""... or more steps per segment when k is large, to bound compilation time."""


CANCEL_EVERY = 16
"""Steps between the questions whether the solve is cancelled (`iterate`), when k is larger
than `UNCANCELLED_K`: up to that, a call's work is small and its program asks nothing."""
UNCANCELLED_K = 64


def cancel_every(k: int) -> int:
    return CANCEL_EVERY if k > UNCANCELLED_K else 0


def segments(k: int) -> list[tuple[int, int]]:
    """(first step, steps) of each segment of the Gram path's `k` steps (`SEGMENT`)."""
    segment = max(SEGMENT, -(-k // MAX_SEGMENTS))
    return [(start, min(segment, k - start)) for start in range(0, k, segment)]


@dataclasses.dataclass(frozen=True)
class OMP:
    """Orthogonal Matching Pursuit settings: hashable, and a pytree whose float `tol` is traced
    under jit (a new tolerance compiles nothing new) while the rest is static.

    Attributes:
        k: at most this many atoms per row.
        tol: stop a row once its residual norm is at most `tol` (not squared, unlike
            scikit-learn's ``orthogonal_mp``); 0 to always select `k` atoms.
        positive: non-negative OMP: codes are >= 0 (see the module docstring).
    """

    k: int
    tol: float = 0.0
    positive: bool = False

    uses_correlations = True
    """`solve` accepts ``correlations = x @ atoms.T`` computed for a whole block at once."""

    def row_floats(self, n_features: int, d_model: int, gram: bool) -> int:
        """Floats of working memory a row takes (`solvers.Plan` sizes calls by it): the
        correlations and a few temporaries of n_features, and the stored Gram rows or atoms."""
        stored = (self.k + 1) * n_features if gram else self.k * d_model
        return 4 * n_features + stored + 2 * self.k * self.k

    @classmethod
    def from_params(cls, dictionary: Dictionary, k=None, tol=None, positive=False) -> OMP:
        """Validated settings; `k` defaults to d_model when only `tol` is given."""
        if k is None and tol is None:
            raise ValueError("omp needs k (maximum number of atoms) or tol (residual norm)")
        n_features, d_model = dictionary.n_features, dictionary.d_model
        k = d_model if k is None else check_positive_int("k", k, upper=n_features)
        tol = 0.0 if tol is None else check_nonnegative("tol", tol)
        if not isinstance(positive, bool | np.bool_):
            raise ValueError(f"positive must be True or False, got {positive!r}")
        # At most d_model atoms can be linearly independent.
        return cls(k=min(k, n_features, d_model), tol=tol, positive=bool(positive))

    def solve(
        self, dictionary: Dictionary, x: jax.Array, correlations=None, plan=None
    ) -> ChunkSolution:
        """Solve a chunk of centred activations `x` of shape (batch, d_model).

        `correlations`, optional, is ``x @ dictionary.atoms.T`` of shape (batch, n_features).
        `plan` (`solvers.Plan`), optional, picks the selection kernel (``native_argmax``) and
        the matrix-free scan's precision (``scan``).
        """
        if correlations is None:
            correlations = matmul(x, dictionary.atoms.T)
        native = bool(getattr(plan, "native_argmax", False))
        if self.positive:
            return solve_nnomp(self, dictionary, x, correlations, native=native)
        fast_scan = getattr(plan, "scan", "float32") == "bfloat16"
        return solve_omp(self, dictionary, x, correlations, native=native, fast_scan=fast_scan)


# ----------------------------------------------------------------------------- selection


def _block_width(n_features: int) -> int:
    """Width of the blocks of the two-level argmax (0: a plain two-pass search)."""
    for width in (128, 64, 32, 16):
        if n_features % width == 0 and n_features >= 4 * width:
            return width
    return 0


def select(
    correlations: jax.Array, inv_norms: jax.Array | None, positive: bool, native: bool = False
):
    """Best atom of each row: (index, score), the first maximiser of the norm-scaled
    correlation ``correlations * inv_norms`` (its absolute value unless `positive`).

    `correlations` of shape (batch, n_features); `inv_norms` of shape (n_features,), or None
    when the correlations are already scaled (unit-norm atoms): then each pass reads them
    once and writes nothing. Returns two arrays of shape (batch,). `native`: ``jnp.argmax``
    (accelerators); else the same result (first index on ties) in vectorised passes, as XLA's
    CPU argmax is a scalar loop.
    """

    def scores(c, inv):
        c = c if positive else jnp.abs(c)
        return c if inv is None else c * inv

    if native:
        score = scores(correlations, inv_norms)
        index = jnp.argmax(score, axis=1).astype(jnp.int32)
        return index, jnp.take_along_axis(score, index[:, None], axis=1)[:, 0]

    def largest(c, inv, axis):
        if inv is not None:
            return jnp.max(scores(c, inv), axis=axis)
        if positive:
            return jnp.max(c, axis=axis)
        return jnp.maximum(jnp.max(c, axis=axis), -jnp.min(c, axis=axis))

    batch, n = correlations.shape
    width = _block_width(n)
    if width == 0:
        score = scores(correlations, inv_norms)
        best = jnp.max(score, axis=1)
        index = jnp.min(
            jnp.where(score == best[:, None], jnp.arange(n, dtype=jnp.int32), n), axis=1
        )
        return jnp.minimum(index, n - 1), best
    n_blocks = n // width
    blocks = correlations.reshape(batch, n_blocks, width)
    inv_blocks = None if inv_norms is None else inv_norms.reshape(n_blocks, width)
    block_max = largest(blocks, inv_blocks, 2)  # (batch, n_blocks)
    best = jnp.max(block_max, axis=1)
    block = jnp.min(
        jnp.where(block_max == best[:, None], jnp.arange(n_blocks, dtype=jnp.int32), n_blocks),
        axis=1,
    )
    block = jnp.minimum(block, n_blocks - 1)  # NaN-safe
    inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    inside = scores(inside, None if inv_blocks is None else inv_blocks[block])
    offset = jnp.min(
        jnp.where(inside == best[:, None], jnp.arange(width, dtype=jnp.int32), width), axis=1
    )
    return block * width + jnp.minimum(offset, width - 1), best


# ----------------------------------------------------------------------------- stopping


def _thresholds(x: jax.Array, tol) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(x_sq, exact_sq, tol_sq)`` for centred activations `x` of shape (batch, d_model): the
    rows' squared norms and the squared residual below which a row is rounding noise (exactly
    explained), both of shape (batch,), and the squared tolerance `tol`, a scalar."""
    x_sq = jnp.sum(x * x, axis=1)
    exact_sq = 10 * jnp.finfo(x.dtype).eps * x_sq
    return x_sq, exact_sq, jnp.asarray(tol, x.dtype) ** 2


# ----------------------------------------------------------------------------- OMP


jax.tree_util.register_dataclass(OMP, data_fields=["tol"], meta_fields=["k", "positive"])


class OMPState(NamedTuple):
    correlations: jax.Array  # (batch, n_features): D r, r the current residual
    stored: (
        jax.Array
    )  # [D x; G[S]] (batch, 1 + segments so far, n_features), or atoms (batch, k, d_model)
    inv_chol: jax.Array  # (batch, k, k) Linv, lower-triangular, rows of unused slots zero
    projections: jax.Array  # (batch, k) z_i = <q_i, x>
    indices: jax.Array  # (batch, k) selected atoms, -1 when none
    residual_sq: jax.Array  # (batch,) ||r||^2 = ||x||^2 - ||z||^2
    previous_sq: jax.Array  # (batch,) ||r||^2 before the last step
    dependent: jax.Array  # (batch,) bool: the last step's atom depended on the support
    t: jax.Array  # () int32: the next step's slot
    residual: jax.Array | None = None  # (batch, d_model) r, for the fast scan's re-scoring
    bound: jax.Array | None = None  # (batch,) error bound of the fast scan's `correlations`


def solve_omp(
    settings: OMP,
    dictionary: Dictionary,
    x: jax.Array,
    alpha0: jax.Array,
    *,
    native: bool = False,
    fast_scan: bool = False,
) -> ChunkSolution:
    """OMP on a chunk of centred activations `x` of shape (batch, d_model), with
    ``alpha0 = x @ atoms.T`` of shape (batch, n_features).

    Indices and values come back of shape (batch, k). Internally the atoms are scaled to unit
    norm (scores need no scaling pass); values are converted back at the end. `native`: select
    with ``jnp.argmax``; `fast_scan` (matrix-free path, `dictionary.scan_atoms` needed): scan
    correlations in bfloat16 and settle each selection in float32 (`solvers._scan`).
    """
    batch = x.shape[0]
    k = settings.k
    n_features, d_model = dictionary.atoms.shape
    dtype = x.dtype
    use_gram = dictionary.gram is not None
    if fast_scan and (use_gram or dictionary.scan_atoms is None):
        raise ValueError("the bfloat16 scan needs a matrix-free dictionary prepared with it")
    eps = jnp.finfo(dtype).eps
    rows = jnp.arange(batch)
    slots = jnp.arange(k)

    x_sq, exact_sq, tol_sq = _thresholds(x, settings.tol)
    inv_norms = 1.0 / dictionary.norms
    alpha0 = alpha0 * inv_norms  # correlations with the unit-norm atoms

    def choose(s: OMPState, running: jax.Array) -> jax.Array:
        """The atom each row adds, of shape (batch,)."""
        if not fast_scan:
            return select(s.correlations, None, False, native)[0]
        j, settled = exact_select(s.correlations, s.bound, s.residual, dictionary.atoms, inv_norms)

        def strict(_):
            scores = matmul(s.residual, dictionary.atoms.T) * inv_norms
            return jnp.where(settled, j, select(scores, None, False, native)[0])

        return jax.lax.cond(jnp.any(~settled & running), strict, lambda _: j, None)

    def step(s: OMPState, running: jax.Array) -> OMPState:
        """Add one atom to each running row (slot ``s.t``)."""
        t = s.t
        j = choose(s, running)
        safe = jnp.maximum(s.indices, 0)
        scale = inv_norms[j][:, None]
        if use_gram:
            new = dictionary.gram[j] * (scale * inv_norms)  # (batch, n_features), unit atoms
            against = jnp.take_along_axis(new, safe, axis=1)  # G[S, j]
            stored = jax.lax.dynamic_update_slice_in_dim(s.stored, new[:, None, :], 1 + t, axis=1)
        else:
            new = dictionary.atoms[j] * scale  # (batch, d_model), unit norm
            against = einsum("bkm,bm->bk", s.stored, new)
            stored = s.stored.at[:, t].set(new)
        against = jnp.where(slots < t, against, 0.0)
        overlaps = einsum("bij,bj->bi", s.inv_chol, against)  # <d_j, q_i>
        new_sq = 1.0 - jnp.sum(overlaps * overlaps, axis=1)
        independent = new_sq > 100 * eps
        ok = running & independent
        diag = jnp.sqrt(jnp.where(ok, new_sq, 1.0))
        # Row t of Linv: (e_t - ov^T Linv) / diag.
        row = jnp.where(slots == t, 1.0, -einsum("bi,bij->bj", overlaps, s.inv_chol))
        row = jnp.where(ok[:, None], row / diag[:, None], 0.0)
        inv_chol = jax.lax.dynamic_update_slice_in_dim(s.inv_chol, row[:, None, :], t, axis=1)
        z = (alpha0[rows, j] - jnp.sum(overlaps * s.projections, axis=1)) / diag
        z = jnp.where(ok, z, 0.0)
        projections = jnp.where(slots == t, z[:, None], s.projections)
        indices = jnp.where((slots == t) & ok[:, None], j[:, None], s.indices)
        gamma = einsum("bij,bi->bj", inv_chol, projections)  # codes on the support
        residual, bound = None, None
        if use_gram:
            # [1, -gamma] @ [D x; G[S]]: one product gives D x - gamma @ G[S].
            weights = jnp.concatenate([jnp.ones((batch, 1), dtype), -gamma], axis=1)
            correlations = einsum("bk,bkn->bn", weights[:, : stored.shape[1]], stored)
        else:
            residual = x - einsum("bk,bkm->bm", gamma, stored)
            if fast_scan:
                correlations, bound = scan(
                    residual, dictionary.scan_atoms, dictionary.scan_error, inv_norms
                )
            else:
                correlations = matmul(residual, dictionary.atoms.T) * inv_norms
        return OMPState(
            correlations=correlations,
            stored=stored,
            inv_chol=inv_chol,
            projections=projections,
            indices=indices,
            residual_sq=s.residual_sq - z * z,
            previous_sq=s.residual_sq,
            dependent=running & ~independent,
            t=t + 1,
            residual=residual if fast_scan else None,
            bound=bound,
        )

    def terminate(s: OMPState) -> jax.Array:
        """A dependent atom stops a row (EXACT when nothing was left to explain); a residual at
        `tol` or at rounding level stops it (CONVERGED, EXACT)."""
        dependent = jnp.where(s.previous_sq <= exact_sq, Status.EXACT, Status.DEPENDENT)
        reached = s.residual_sq <= jnp.maximum(tol_sq, exact_sq)
        met = jnp.where(s.residual_sq <= exact_sq, Status.EXACT, Status.CONVERGED)
        return jnp.where(
            s.dependent, stop_code(dependent), jnp.where(reached, stop_code(met), RUNNING)
        )

    state = OMPState(
        correlations=alpha0,
        stored=jnp.zeros((batch, k, d_model), dtype),
        inv_chol=jnp.zeros((batch, k, k), dtype),
        projections=jnp.zeros((batch, k), dtype),
        indices=jnp.full((batch, k), -1, jnp.int32),
        residual_sq=x_sq,
        previous_sq=x_sq,
        dependent=jnp.zeros((batch,), bool),
        t=jnp.zeros((), jnp.int32),
        residual=x if fast_scan else None,
        bound=jnp.zeros((batch,), dtype) if fast_scan else None,  # alpha0 is float32
    )
    stop = initial_stop(x_sq)
    if use_gram:
        # `stored` is [D x; G[S]] grown by a segment of rows at a time: step t multiplies by
        # t rounded up to a segment of Gram rows, not k.
        stored = alpha0[:, None, :]
        for _, width in segments(k):
            stored = jnp.concatenate([stored, jnp.zeros((batch, width, n_features), dtype)], 1)
            state, stop = iterate(
                step,
                terminate,
                state._replace(stored=stored),
                stop,
                width,
                cancel_every=min(cancel_every(k), width),
            )
            stored = state.stored
    else:
        state, stop = iterate(step, terminate, state, stop, k, cancel_every=cancel_every(k))

    values = einsum("bij,bi->bj", state.inv_chol, state.projections)
    values = values * inv_norms[jnp.maximum(state.indices, 0)]  # in the dictionary's units
    n_iter = jnp.sum(state.indices >= 0, axis=1).astype(jnp.int32)
    return ChunkSolution(
        indices=state.indices,
        values=jnp.where(state.indices >= 0, values, 0.0),
        n_iter=n_iter,
        status=final_status(stop, Status.K_REACHED),
        duality_gap=jnp.full((batch,), jnp.nan, dtype),
    )


# ----------------------------------------------------------------------------- NNOMP


class NNOMPState(NamedTuple):
    correlations: jax.Array  # (batch, n_features): D r
    stored: jax.Array  # (batch, k, n_features) Gram rows, or (batch, k, d_model) atoms, per slot
    gram: jax.Array  # (batch, k, k) Gram block of the slots' atoms
    targets: jax.Array  # (batch, k) <d_i, x> of the slots' atoms
    coef: jax.Array  # (batch, k) codes, >= 0, zero on inactive slots
    active: jax.Array  # (batch, k) bool: the slot's atom is in the support
    indices: jax.Array  # (batch, k) atom of each slot, -1 when never used
    n_iter: jax.Array  # (batch,) int32 atoms added
    residual_sq: jax.Array  # (batch,) ||x - coef D_S||^2
    failure: jax.Array  # (batch,) int32 stop code when the last step added no atom, else 0


def _masked_solve(gram: jax.Array, rhs: jax.Array, mask: jax.Array) -> jax.Array:
    """Least squares on the slots in `mask`: solve ``gram[P, P] s = rhs[P]``, zero elsewhere.
    Shapes (batch, k, k), (batch, k), (batch, k) bool."""
    both = mask[:, :, None] & mask[:, None, :]
    eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
    system = jnp.where(both, gram, eye)  # identity on the unused slots: s = 0 there
    factor = jnp.linalg.cholesky(system)
    solution = jax.scipy.linalg.cho_solve((factor, True), jnp.where(mask, rhs, 0.0)[..., None])[
        ..., 0
    ]
    return jnp.where(mask, solution, 0.0)


class _NNLSState(NamedTuple):
    coef: jax.Array  # (batch, k)
    active: jax.Array  # (batch, k) bool
    feasible: jax.Array  # (batch,) bool: the last least squares was non-negative (done)


def _nnls_on_support(gram, targets, coef, active):
    """Lawson-Hanson's inner loop from a feasible `coef` (zero on the newly added slot): the
    non-negative least squares on the slots in `active`, dropping slots that reach zero.
    Returns (coef, active). Shapes (batch, k, k), (batch, k), (batch, k), (batch, k) bool."""
    k = coef.shape[1]

    def step(s: _NNLSState, running: jax.Array) -> _NNLSState:
        ls = _masked_solve(gram, targets, s.active)
        feasible = jnp.all(jnp.where(s.active, ls > 0, True), axis=1)
        # Step from coef towards ls as far as every coefficient stays >= 0.
        blocking = s.active & (ls <= 0)
        gap = jnp.maximum(s.coef - ls, jnp.finfo(s.coef.dtype).tiny)  # >= coef where blocking
        ratio = jnp.where(blocking, s.coef / gap, jnp.inf)
        move = jnp.clip(jnp.min(ratio, axis=1), 0.0, 1.0)
        moved = s.coef + move[:, None] * (ls - s.coef)
        hit = blocking & (ratio <= move[:, None])
        coef = jnp.where(feasible[:, None], ls, jnp.where(hit, 0.0, jnp.maximum(moved, 0.0)))
        active = jnp.where(feasible[:, None], s.active, s.active & ~hit)
        keep = ~running[:, None]
        return _NNLSState(
            jnp.where(keep, s.coef, coef), jnp.where(keep, s.active, active), feasible
        )

    def terminate(s: _NNLSState) -> jax.Array:
        return jnp.where(s.feasible, stop_code(Status.CONVERGED), RUNNING)

    batch = coef.shape[0]
    nothing = ~jnp.any(active, axis=1)
    start = _NNLSState(coef, active, jnp.zeros((batch,), bool))
    stop = jnp.where(nothing, stop_code(Status.CONVERGED), RUNNING)
    final, _ = iterate(step, terminate, start, stop, k + 1)
    return final.coef, final.active


def solve_nnomp(
    settings: OMP, dictionary: Dictionary, x: jax.Array, alpha0: jax.Array, *, native=False
) -> ChunkSolution:
    """Non-negative OMP on a chunk of centred activations `x` of shape (batch, d_model), with
    ``alpha0 = x @ atoms.T`` of shape (batch, n_features); see the module docstring.

    At most ``2 k`` atoms are added (atoms can leave the support); indices and values come back
    of shape (batch, k), the support first.
    """
    batch = x.shape[0]
    k = settings.k
    n_features, d_model = dictionary.atoms.shape
    dtype = x.dtype
    use_gram = dictionary.gram is not None
    eps = jnp.finfo(dtype).eps
    rows = jnp.arange(batch)
    slots = jnp.arange(k)

    x_sq, exact_sq, tol_sq = _thresholds(x, settings.tol)
    # Correlations of the support are zero up to rounding at a least-squares solution.
    tiny = 100 * eps * jnp.sqrt(x_sq)
    inv_norms = 1.0 / dictionary.norms
    atom_sq = dictionary.norms**2

    def step(s: NNOMPState, running: jax.Array) -> NNOMPState:
        """Add the best positively correlated atom to each running row, then re-solve the
        non-negative least squares on its support."""
        safe = jnp.maximum(s.indices, 0)
        # Never re-select an atom of the support.
        scores = s.correlations.at[rows[:, None], safe].min(jnp.where(s.active, -jnp.inf, jnp.inf))
        j, best = select(scores, inv_norms, True, native)
        positive = best > tiny
        slot = jnp.min(jnp.where(s.active, k, slots), axis=1)  # first free slot
        if use_gram:
            new = dictionary.gram[j]
            against = jnp.take_along_axis(new, safe, axis=1)  # G[slots, j]
        else:
            new = dictionary.atoms[j]
            against = einsum("bkm,bm->bk", s.stored, new)
        against = jnp.where(s.active, against, 0.0)
        # Linear independence from the support: the Schur complement of the new atom.
        w = _masked_solve(s.gram, against, s.active)
        new_sq = atom_sq[j] - jnp.sum(w * against, axis=1)
        independent = new_sq > 100 * eps * atom_sq[j]
        ok = running & positive & independent
        put = (slots == slot[:, None]) & ok[:, None]  # (batch, k)
        stored = jnp.where(put[:, :, None], new[:, None, :], s.stored)
        gram = jnp.where(put[:, :, None], against[:, None, :], s.gram)
        gram = jnp.where(put[:, None, :], against[:, :, None], gram)
        gram = jnp.where(put[:, :, None] & put[:, None, :], atom_sq[j][:, None, None], gram)
        targets = jnp.where(put, alpha0[rows, j][:, None], s.targets)
        indices = jnp.where(put, j[:, None], s.indices)
        active = s.active | put
        coef = jnp.where(put, 0.0, s.coef)
        coef, active = _nnls_on_support(gram, targets, coef, jnp.where(ok[:, None], active, False))
        coef = jnp.where(ok[:, None], coef, s.coef)
        active = jnp.where(ok[:, None], active, s.active)
        if use_gram:
            correlations = alpha0 - einsum("bk,bkn->bn", coef, stored)
        else:
            correlations = matmul(x - einsum("bk,bkm->bm", coef, stored), dictionary.atoms.T)
        # ||x - coef D_S||^2 = ||x||^2 - 2 coef.targets + coef^T G_SS coef
        residual_sq = (
            x_sq - 2 * jnp.sum(coef * targets, axis=1) + einsum("bi,bij,bj->b", coef, gram, coef)
        )
        old_residual_sq = x_sq - jnp.sum(s.coef * s.targets, axis=1)  # at a LS solution
        why = jnp.where(
            old_residual_sq <= exact_sq,
            Status.EXACT,
            jnp.where(positive, Status.DEPENDENT, Status.NO_POSITIVE_CORRELATION),
        )
        return NNOMPState(
            correlations=jnp.where(ok[:, None], correlations, s.correlations),
            stored=stored,
            gram=gram,
            targets=targets,
            coef=coef,
            active=active,
            indices=indices,
            n_iter=s.n_iter + ok.astype(jnp.int32),
            residual_sq=residual_sq,
            failure=jnp.where(ok, RUNNING, stop_code(why)),
        )

    def terminate(s: NNOMPState) -> jax.Array:
        """A step that added no atom stops its row (`failure`); a residual at rounding level
        (EXACT) or at `tol` (CONVERGED), or `k` atoms in the support (K_REACHED), too."""
        full = jnp.sum(s.active, axis=1) >= k
        met = jnp.where(
            s.residual_sq <= exact_sq,
            stop_code(Status.EXACT),
            jnp.where(
                s.residual_sq <= tol_sq,
                stop_code(Status.CONVERGED),
                jnp.where(full, stop_code(Status.K_REACHED), RUNNING),
            ),
        )
        return jnp.where(s.failure != RUNNING, s.failure, met)

    width = n_features if use_gram else d_model
    state = NNOMPState(
        correlations=alpha0,
        stored=jnp.zeros((batch, k, width), dtype),
        gram=jnp.zeros((batch, k, k), dtype),
        targets=jnp.zeros((batch, k), dtype),
        coef=jnp.zeros((batch, k), dtype),
        active=jnp.zeros((batch, k), bool),
        indices=jnp.full((batch, k), -1, jnp.int32),
        n_iter=jnp.zeros((batch,), jnp.int32),
        residual_sq=x_sq,
        failure=jnp.zeros((batch,), jnp.int32),
    )
    state, stop = iterate(
        step, terminate, state, initial_stop(x_sq), 2 * k, cancel_every=cancel_every(k)
    )
    # The support first, in slot order.
    order = jnp.argsort(~state.active, axis=1, stable=True)
    active = jnp.take_along_axis(state.active, order, axis=1)
    indices = jnp.where(active, jnp.take_along_axis(state.indices, order, axis=1), -1)
    values = jnp.where(active, jnp.take_along_axis(state.coef, order, axis=1), 0.0)
    status = final_status(stop, Status.MAX_ITER)
    return ChunkSolution(
        indices=indices,
        values=values,
        n_iter=state.n_iter,
        status=status,
        duality_gap=jnp.full((batch,), jnp.nan, dtype),
    )
