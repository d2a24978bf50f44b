"""Request and response bodies of the REST API (requests and responses are separate classes)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter

Vector = Annotated[list[float], Field(min_length=1)]
Matrix = Annotated[list[Vector], Field(min_length=1)]
STRICT = ConfigDict(extra="forbid", strict=True)
"""Request bodies: unknown fields refused, and no coercion (`true` or `"8"` is not a number,
`"yes"` is not a boolean; integers are accepted as floats)."""


class DictionaryAttributes(BaseModel):
    """What a registration says besides its arrays; JSON registrations validate these fields
    with pydantic and read `directions` and `bias` as arrays (`formats.json_array`)."""

    model_config = STRICT

    name: str = Field(
        description="Unique alias: a letter, then at most 127 letters, digits, '.', '_', '-'.",
        json_schema_extra={"pattern": "^[A-Za-z][A-Za-z0-9._-]{0,127}$"},  # checked: registry
    )
    labels: list[str] | None = Field(
        None, description="One label per feature, each at most 256 characters."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="Free-form JSON object, nested at most 8 levels deep, at most 64 KiB as JSON.",
    )


class DictionaryCreate(DictionaryAttributes):
    """Register feature directions (one row per feature) under a unique name."""

    model_config = ConfigDict(
        **STRICT,
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

    directions: Matrix = Field(description="Feature directions of shape (n_features, d_model).")
    bias: Vector | None = Field(None, description="Decoder bias of shape (d_model,).")


class NormsSummary(BaseModel):
    min: float
    max: float
    mean: float


class Placement(BaseModel):
    gram_bytes: int = Field(description="Size of the Gram matrix, built or not.")
    gram_budget_bytes: int | None = Field(
        description="The largest Gram matrix the server would build when this one loaded."
    )
    device_bytes: int = Field(
        description="Device memory the prepared dictionary holds on each of its devices."
    )
    devices: list[str] = Field(description="The devices it lives on.")
    shard: Literal["rows", "features"] | None = Field(
        description="How it is split across several devices: 'rows' (a replica on each, "
        "batches split) or 'features' (each holds a block of its features); null on one."
    )
    scan: Literal["float32", "bfloat16"] = Field(
        description="Precision of OMP's correlation scan (selections are float32's either way)."
    )
    reason: str = Field(description="Why this path was chosen.")


class EncoderInfo(BaseModel):
    architecture: Literal["standard", "jumprelu", "topk"]
    k: int | None = Field(description="TopK SAEs: codes per row.")
    apply_b_dec_to_input: bool = Field(description="The encoder sees x - b_dec.")


class DictionaryInfo(BaseModel):
    id: str = Field(description="Content hash of the arrays: same content, same id.")
    name: str
    n_features: int
    d_model: int
    dtype: str
    has_bias: bool
    norms: NormsSummary = Field(description="Summary of the directions' Euclidean norms.")
    path: Literal["gram", "matrix-free"] = Field(description="Solver execution path.")
    placement: Placement = Field(description="Why this path, and the memory it takes.")
    warm: bool = Field(
        description="The default programs (OMP, k=8, every batch bucket) are compiled; "
        "stays false with UNFOLD_WARMUP=false."
    )
    labels: int = Field(description="Number of feature labels (0 when none).")
    metadata: dict[str, Any]
    created_at: str
    encoder: EncoderInfo | None = Field(
        None,
        description="The SAE's own encoder, kept from a SAELens folder (unfold with "
        "compare_encoder); null when none was registered.",
    )


class DictionaryList(BaseModel):
    dictionaries: list[DictionaryInfo]


class Histogram(BaseModel):
    counts: list[int]
    edges: list[float] = Field(description="len(counts) + 1 bin edges.")


class NormsReport(NormsSummary):
    median: float
    histogram: Histogram


class SimilarPair(BaseModel):
    i: int
    j: int
    cosine: float
    labels: list[str] | None = Field(None, description="When the dictionary has labels.")


class CoherenceReport(BaseModel):
    mutual: float = Field(description="Largest |cosine| between two different features.")
    welch_bound: float = Field(
        description="The smallest `mutual` any dictionary of this shape has."
    )
    guaranteed_k: int = Field(
        description="Largest k below (1 + 1/mutual) / 2: every k-sparse code is recovered by "
        "OMP and l1 (Tropp 2004)."
    )
    histogram: Histogram = Field(description="|cosine| over all pairs of (sampled) features.")
    top_pairs: list[SimilarPair] = Field(description="The most similar pairs, most similar first.")
    sampled_features: int


class RecoveryCurveReport(BaseModel):
    method: Literal["omp", "lasso"] = Field(description='"lasso" stands for l1 minimisation.')
    positive: bool
    ks: list[int]
    recovered: list[float] = Field(description="Fraction of codes recovered exactly, per k.")
    recommended_k: int = Field(description="Largest k up to which >= 95% are recovered.")
    half_k: float | None = Field(description="Where the curve crosses 50% (interpolated).")
    truncated: str | None = Field(description="Why the curve stopped early, if it did.")


class L1Transition(BaseModel):
    signed: float | None
    nonnegative: float | None
    description: str


class RecoveryReport(BaseModel):
    sampled_features: int
    note: str | None = Field(description="Said when the analysis ran on a sample of features.")
    trials: int = Field(description="Synthetic codes per k.")
    criterion: str
    curves: list[RecoveryCurveReport]
    recommended_k: dict[str, int]
    l1_transition: L1Transition = Field(
        description="Theory for a Gaussian random dictionary of the same shape."
    )


class EncoderReport(EncoderInfo):
    ks: list[int]
    encoder_f1: list[float] = Field(description="Mean support F1 of the SAE encoder, per k.")
    unfold_f1: list[float] = Field(description="Mean support F1 of non-negative OMP, per k.")
    encoder_relative_error: list[float]
    unfold_relative_error: list[float]
    encoder_l0: list[float] = Field(description="Mean number of codes the encoder gives.")
    trials: int
    truncated: str | None
    note: str


class DictionaryReport(BaseModel):
    state: Literal["ready"]
    version: int
    dictionary: dict[str, Any]
    computed_at: str
    seconds: float
    norms: NormsReport
    coherence: CoherenceReport
    recovery: RecoveryReport
    encoder: EncoderReport | None = Field(
        description="The SAE's encoder against Unfold on synthetic codes (with an encoder)."
    )


class ReportPending(BaseModel):
    state: Literal["queued", "running"]
    message: str


class UnfoldOptions(BaseModel):
    """What to return, shared by every method."""

    model_config = STRICT

    output: Literal["sparse", "dense"] = Field(
        "sparse", description="Per-row indices/values (and labels), or dense (batch, n_features)."
    )
    top: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Sparse output only: keep the `top` largest |values| of each row."
    )
    compare_encoder: bool = Field(
        False,
        description="Add the SAE encoder's codes next to Unfold's (dictionaries registered "
        "with their encoder): `encoder` (README: The SAE's own encoder as a baseline).",
    )
    certify: bool = Field(
        False,
        description="Add per-row certificates: `certified` (Tropp's exact recovery condition "
        "on the found support), `erc`, `erc_margin` and `support_stability` (README: "
        "Certificates).",
    )


class OMPParams(UnfoldOptions):
    """Orthogonal Matching Pursuit: at most `k` atoms, or until the residual norm <= `tol`."""

    method: Literal["omp"] = "omp"
    k: Annotated[int, Field(ge=1)] | None = Field(8, description="Maximum number of atoms.")
    tol: Annotated[float, Field(ge=0)] | None = Field(
        None, description="Stop once the residual norm is at most this (the norm, not squared)."
    )
    positive: bool | None = Field(None, description="Non-negative OMP: codes >= 0 (default no).")


class L1Params(UnfoldOptions):
    """The LASSO: minimize 0.5 * ||x - bias - codes @ dictionary||^2 + alpha * ||codes||_1."""

    alpha: Annotated[float, Field(ge=0)] = Field(description="The l1 penalty.")
    tol: Annotated[float, Field(ge=0)] | None = Field(
        None, description="Relative duality-gap tolerance (solver default when omitted)."
    )
    max_iter: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Iteration budget per row (solver default when omitted)."
    )
    positive: bool | None = Field(None, description="Constrain codes to be >= 0 (default no).")
    max_nonzero: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="Most non-zeros per row in the answer (default min(n_features, d_model), "
        "at most n_features); a row that needs more reports status 5.",
    )


class ISTAParams(L1Params):
    method: Literal["ista"]


class FISTAParams(L1Params):
    method: Literal["fista"]


class LassoParams(L1Params):
    method: Literal["lasso"]


def _method_of(value: Any) -> str:
    """The discriminator: `method`, "omp" when absent."""
    if isinstance(value, dict):
        return value.get("method", "omp")
    return getattr(value, "method", "omp")


PARAMS = {"omp": OMPParams, "ista": ISTAParams, "fista": FISTAParams, "lasso": LassoParams}
"""The service's method table: each method's parameters (the solvers' `METHODS` has the same
names). Query parameters, job parameters and the CLI's choices come from it."""
OUTPUT_FIELDS = tuple(UnfoldOptions.model_fields)
"""What to return, shared by every method (not the solver's business)."""
SOLVER_FIELDS = tuple(
    dict.fromkeys(
        name
        for model in PARAMS.values()
        for name in model.model_fields
        if name not in OUTPUT_FIELDS
    )
)
"""Every method's solver parameters, `method` included."""


class Activations(BaseModel):
    activations: Vector | Matrix = Field(description="Shape (batch, d_model) or (d_model,).")


class OMPRequest(OMPParams, Activations):
    pass


class ISTARequest(ISTAParams, Activations):
    pass


class FISTARequest(FISTAParams, Activations):
    pass


class LassoRequest(LassoParams, Activations):
    pass


def _tagged_union(models: dict[str, type[BaseModel]]):
    tagged = tuple(Annotated[model, Tag(name)] for name, model in models.items())
    return Annotated[Union[tagged], Discriminator(_method_of)]  # noqa: UP007


UnfoldParams = _tagged_union(PARAMS)
"""Solver settings and output options, by `method` (query string of binary requests)."""
UnfoldRequest = _tagged_union(
    {"omp": OMPRequest, "ista": ISTARequest, "fista": FISTARequest, "lasso": LassoRequest}
)
"""A JSON unfold request: activations plus `UnfoldParams`."""


class SparseCode(BaseModel):
    indices: list[int]
    values: list[float]
    labels: list[str] | None = Field(None, description="When the dictionary has labels.")


class EncoderComparison(BaseModel):
    codes: list[SparseCode] = Field(description="The encoder's codes, largest first.")
    l0: list[int]
    relative_error: list[float] = Field(description="Of the encoder's own codes.")
    relative_error_at_l0: list[float] = Field(
        description="Of the encoder's largest codes, as many as Unfold's l0 of the row."
    )
    support_overlap: list[float] = Field(
        description="Share of Unfold's features among those largest codes (0 when Unfold has none)."
    )


class UnfoldResponse(BaseModel):
    codes: list[SparseCode] | None = Field(None, description="Sparse output: one per row.")
    dense: Matrix | None = Field(None, description="Dense output: (batch, n_features).")
    residual_norm: list[float] = Field(description="||x - bias - codes @ dictionary|| per row.")
    relative_error: list[float] = Field(description="residual_norm / ||x - bias|| per row.")
    l0: list[int] = Field(description="Non-zero codes per row (before `top`).")
    n_iter: list[int]
    status: list[int] = Field(
        description="0 converged (tolerance met), 1 max_iter, 2 exact, 3 dependent, "
        "4 no positive correlation, 5 more non-zeros than max_nonzero, "
        "6 k reached (OMP: k atoms selected, residual above tol)"
    )
    messages: list[str]
    duality_gap: list[float | None] = Field(description="LASSO methods; null for OMP.")
    encoder: EncoderComparison | None = Field(
        None, description="With compare_encoder: the SAE encoder's codes and errors, per row."
    )
    certified: list[bool] | None = Field(
        None, description="With certify: ERC(S) < 1 on the row's support S."
    )
    erc: list[float | None] | None = Field(
        None,
        description="With certify: max over atoms j outside S of ||pinv(D_S) d_j||_1 (unit "
        "atoms); null when the support's atoms are linearly dependent.",
    )
    erc_margin: list[float | None] | None = Field(None, description="With certify: 1 - erc.")
    support_stability: list[float | None] | None = Field(
        None,
        description="With certify: min |code| * ||d_i|| * sigma_min(D_S) / residual_norm; above "
        "1, a change of the activation as large as the residual flips no code on S. Null for "
        "an empty support or a zero residual.",
    )


def openapi_body(schema, binary: dict[str, str]) -> dict:
    """`openapi_extra` documenting a JSON body of `schema` plus binary alternatives.

    Used by routes that read their body themselves to accept several content types; the
    schema's definitions are hoisted into the document's components by `create_app`.
    """
    json_schema = TypeAdapter(schema).json_schema(ref_template="#/components/schemas/{model}")
    definitions = json_schema.pop("$defs", {})
    content = {"application/json": {"schema": json_schema}}
    for media_type, description in binary.items():
        schema = {"type": "string", "format": "binary", "description": description}
        content[media_type] = {"schema": schema}
    return {"requestBody": {"required": True, "content": content}, "x-definitions": definitions}


# Jobs.


class JobCreate(BaseModel):
    """A job over activations the server can read: a file or a folder of shards under one of
    UNFOLD_JOB_INPUT_DIRS. Solver parameters as in unfold (`method`, `k`, `alpha`, ...), and
    `certify` and `compare_encoder` to add those arrays to the result."""

    model_config = ConfigDict(extra="allow", strict=True)

    input: str = Field(description="Absolute path of a .npy/.safetensors/.npz file or folder.")
    dictionary: str = Field(description="Id or name of a registered dictionary.")
    method: Literal[*PARAMS] = "omp"


class JobInfo(BaseModel):
    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    dictionary: str
    method: str
    params: dict[str, Any]
    input: str
    rows_total: int
    rows_done: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    rows_per_s: float | None
    eta_s: float | None


class JobList(BaseModel):
    jobs: list[JobInfo]


class FeatureStatistic(BaseModel):
    feature: int
    label: str | None
    count: int
    frequency: float = Field(description="Fraction of rows where the feature fires.")
    mean: float = Field(description="Mean code where it fires.")
    max_abs: float = Field(description="Largest |code|.")


class JobFeatures(BaseModel):
    rows: int
    n_features: int
    firing: int = Field(description="Features that fire at least once.")
    top: list[FeatureStatistic] = Field(description="The most frequent features first.")
