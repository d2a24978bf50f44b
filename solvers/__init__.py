"""Unfold's solvers: batched, jitted sparse recovery over a dictionary of feature directions.

Pure JAX: no web, no disk, no global state. Shapes follow one convention: a dictionary is
(n_features, d_model), activations are (batch, d_model), codes are (batch, n_features), and the
model is ``x = codes @ dictionary + bias``.

    >>> import solvers
    >>> result = solvers.unfold(activations, dictionary, method="omp", k=8)
    >>> result.to_dense()  # (batch, n_features)

Inside your own jitted code: ``solvers.solve(settings, prepared, x)`` (device arrays).
"""

from ._api import METHODS, make_settings, solve, unfold
from ._certify import Certificate, certify
from ._diagnostics import (
    Coherence,
    RecoveryCurve,
    coherence,
    l1_transition,
    recovery_curve,
    synthetic_codes,
    welch_bound,
)
from ._dictionary import (
    Dictionary,
    PathChoice,
    available_bytes,
    choose_path,
    choose_shard,
    default_scan,
    footprint,
    gram_bytes,
    prepare,
)
from ._driver import Cancelled
from ._lasso import FISTA, ISTA, Lasso
from ._omp import OMP
from ._plan import DEFAULT_BLOCK_ROWS, Plan, plan_for
from ._result import STATUS_MESSAGES, Solution, Status, UnfoldResult
from ._sharding import SHARDS
from ._validation import check_dictionary, validate_dictionary

MAX_ITER_LIMITS = {cls.name: cls.max_iter_limit for cls in (ISTA, FISTA, Lasso)}
"""The largest `max_iter` each method accepts."""

__all__ = [
    "DEFAULT_BLOCK_ROWS",
    "FISTA",
    "ISTA",
    "MAX_ITER_LIMITS",
    "METHODS",
    "Lasso",
    "OMP",
    "SHARDS",
    "STATUS_MESSAGES",
    "Cancelled",
    "Certificate",
    "Coherence",
    "RecoveryCurve",
    "Dictionary",
    "PathChoice",
    "Plan",
    "Solution",
    "Status",
    "UnfoldResult",
    "available_bytes",
    "certify",
    "check_dictionary",
    "coherence",
    "l1_transition",
    "recovery_curve",
    "synthetic_codes",
    "welch_bound",
    "choose_path",
    "choose_shard",
    "default_scan",
    "footprint",
    "gram_bytes",
    "make_settings",
    "plan_for",
    "prepare",
    "solve",
    "unfold",
    "validate_dictionary",
]
