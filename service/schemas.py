"""Request and response bodies of the REST API (requests and responses are separate classes)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Vector = list[float]
Matrix = list[Vector]


class DictionaryCreate(BaseModel):
    """Register feature directions (one row per feature) under a unique name."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "toy",
                    "directions": [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]],
                    "bias": [0, 0, 0],
                    "labels": ["x", "y", "z", "diagonal"],
                }
            ]
        },
    )

    name: str = Field(description="Unique alias: a letter, then letters, digits, '.', '_', '-'.")
    directions: Matrix = Field(description="Feature directions of shape (n_features, d_model).")
    bias: Vector | None = Field(None, description="Decoder bias of shape (d_model,).")
    labels: list[str] | None = Field(None, description="One label per feature.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form metadata.")


class NormsSummary(BaseModel):
    min: float
    max: float
    mean: float


class DictionaryInfo(BaseModel):
    id: str = Field(description="Content hash of the arrays: same content, same id.")
    name: str
    n_features: int
    d_model: int
    dtype: str
    has_bias: bool
    norms: NormsSummary = Field(description="Summary of the directions' Euclidean norms.")
    path: Literal["gram", "matrix-free"] = Field(description="Solver execution path.")
    labels: int = Field(description="Number of feature labels (0 when none).")
    metadata: dict[str, Any]
    created_at: str


class DictionaryList(BaseModel):
    dictionaries: list[DictionaryInfo]


class OMPParams(BaseModel):
    """Orthogonal Matching Pursuit: at most `k` atoms, or until the residual norm <= `tol`."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["omp"] = "omp"
    k: Annotated[int, Field(ge=1)] | None = Field(8, description="Maximum number of atoms.")
    tol: Annotated[float, Field(ge=0)] | None = Field(
        None, description="Stop once the residual norm is at most this."
    )


class UnfoldRequest(OMPParams):
    """Activations to unfold, one vector (d_model,) or a batch (batch, d_model)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"activations": [[0.0, 2.0, 0.5]], "method": "omp", "k": 2}]
        },
    )

    activations: Vector | Matrix = Field(description="Shape (batch, d_model) or (d_model,).")


class SparseCode(BaseModel):
    indices: list[int]
    values: list[float]


class UnfoldResponse(BaseModel):
    codes: list[SparseCode] = Field(description="One sparse code per activation row.")
    residual_norm: list[float]
    relative_error: list[float]
    l0: list[int]
    n_iter: list[int]
    status: list[int]
    messages: list[str]
