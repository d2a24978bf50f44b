"""Unfold's solvers: batched, jitted sparse recovery over a dictionary of feature directions.

Pure JAX: no web, no disk, no global state. Shapes follow one convention: a dictionary is
(n_features, d_model), activations are (batch, d_model), codes are (batch, n_features), and the
model is ``x = codes @ dictionary + bias``.

    >>> import solvers
    >>> result = solvers.unfold(activations, dictionary, method="omp", k=8)
    >>> result.to_dense()  # (batch, n_features)
"""

from ._api import DEFAULT_BLOCK_ROWS, METHODS, make_settings, unfold
from ._dictionary import DEFAULT_GRAM_BUDGET_BYTES, Dictionary, gram_bytes, prepare
from ._lasso import FISTA, ISTA, Lasso
from ._omp import OMP
from ._result import STATUS_MESSAGES, Status, UnfoldResult
from ._validation import check_dictionary

__all__ = [
    "DEFAULT_BLOCK_ROWS",
    "DEFAULT_GRAM_BUDGET_BYTES",
    "FISTA",
    "ISTA",
    "METHODS",
    "Lasso",
    "OMP",
    "STATUS_MESSAGES",
    "Dictionary",
    "Status",
    "UnfoldResult",
    "check_dictionary",
    "gram_bytes",
    "make_settings",
    "prepare",
    "unfold",
]
