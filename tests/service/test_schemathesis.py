"""Schemathesis over the live OpenAPI document of a real `unfold serve` on 127.0.0.1: every
operation, with API keys off and on, data that fits the schema and data that does not, every
built-in check (`--checks all`): no 5xx, status codes, content types, headers and bodies as
documented, schema-invalid data refused, `Allow` on 405, auth not ignored.

The example count is bounded (`UNFOLD_SCHEMATHESIS_EXAMPLES` per operation and mode, default
15) so that the test takes a couple of minutes on CI's two cores; raise it for a deeper run.

One rule is adapted, not dropped: `positive_data_acceptance` wants schema-valid data to be
accepted, but a JSON schema cannot say that a row must be as long as the dictionary's
`d_model` or that `k` is at most its `n_features`. So schema-valid data may be refused when
the refusal names such a semantic reason (a v1 code below; the OIP has a single 400 for every
bad request), never with `invalid_request` (that would mean the document allows what the
server calls a schema error) nor `empty` (the document should say `minItems`).
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.service.helpers import serve

KEY = "schemathesis-key"
EXAMPLES = int(os.environ.get("UNFOLD_SCHEMATHESIS_EXAMPLES", "15"))
ENV = {
    "UNFOLD_DEMO": "true",
    "UNFOLD_WARMUP": "false",
    "UNFOLD_REQUEST_TIMEOUT_S": "10",
    "UNFOLD_MAX_BATCH_SIZE": "16",
}
# Refusals of schema-valid data for reasons a JSON schema cannot express.
SEMANTIC_CODES = {
    "invalid_metadata",  # depth and size: not expressible for free-form JSON
    "invalid_multipart",
    "shape_mismatch",
    "invalid_shape",
    "invalid_parameter",
    "invalid_dictionary",
    "invalid_labels",
    "non_finite",
    "name_taken",
    "duplicate_content",
    "invalid_npy",
    "invalid_safetensors",
    "invalid_sae",
    "unsupported_sae",
    "too_many_rows",
    "over_memory_budget",
    "answer_too_large",
    "not_found",
}


def semantic_refusal(case, response) -> str | None:
    """None when a refusal of schema-valid data is acceptable, else why not."""
    status = response.status_code
    if status < 400 or status in (401, 403, 404, 409, 413, 429):
        return None
    if case.path.startswith("/v2"):
        return None if status == 400 else f"schema-valid OIP request answered {status}"
    if status != 422:
        return f"schema-valid request answered {status}"
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"422 without the error format: {response.text[:200]}"
    if code in SEMANTIC_CODES:
        return None
    return f"schema-valid request refused as {code}: {response.text[:300]}"


def run_operation(operation, mode, base_url: str, headers: dict | None) -> None:
    positive_acceptance = schemathesis.checks.positive_data_acceptance

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def test(case):
        response = case.call_and_validate(
            base_url=base_url,
            headers=headers,
            excluded_checks=[positive_acceptance],
            timeout=60,
        )
        if mode is GenerationMode.POSITIVE:
            reason = semantic_refusal(case, response)
            assert reason is None, f"{case.method} {case.formatted_path}: {reason}"

    test()


@pytest.mark.slow
@pytest.mark.parametrize("keys", [False, True], ids=["keys-off", "keys-on"])
def test_every_operation_conforms_and_never_answers_5xx(tmp_path, keys):
    env = {**ENV, **({"UNFOLD_API_KEYS": KEY} if keys else {})}
    headers = {"Authorization": f"Bearer {KEY}"} if keys else None
    failures: list[str] = []
    with serve(str(tmp_path), env=env, headers=headers) as client:
        base_url = str(client.base_url).rstrip("/")
        schema = schemathesis.openapi.from_url(
            f"{base_url}/openapi.json", headers=headers or {}, timeout=30
        )
        labels = []
        for result in schema.get_all_operations():
            operation = result.ok()
            labels.append(operation.label)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    run_operation(operation, mode, base_url, headers)
                except Unsatisfiable:
                    pass  # nothing in this operation can be made schema-invalid
                except Exception as error:  # every operation reports, not only the first
                    failures.append(f"--- {operation.label} [{mode.value}]\n{error}"[:3000])
        assert len(labels) >= 15, labels
        # The server is still healthy after everything it was sent.
        assert client.get("/healthz").status_code == 200
    assert not failures, f"{len(failures)} operation(s) failed:\n" + "\n".join(failures)


def test_undocumented_methods_are_405_with_the_documented_ones_in_allow(tmp_path):
    """What schemathesis's coverage phase checks (`unsupported_method`,
    `allow_header_conformance`), for every path of the document: a method the document does
    not list is 405 with `Allow` naming exactly the methods it lists."""
    methods = {"get", "put", "post", "delete", "patch"}
    problems = []
    with serve(str(tmp_path), env=ENV) as client:
        document = client.get("/openapi.json").json()
        for path, item in document["paths"].items():
            documented = {method for method in item if method in methods}
            concrete = path.replace("{ref}", "demo").replace("{model}", "demo")
            concrete = concrete.replace("{version}", "1")
            for method in sorted(methods - documented):
                response = client.request(method.upper(), concrete)
                allow = {m.strip().lower() for m in response.headers.get("allow", "").split(",")}
                allow.discard("head")
                if response.status_code != 405 or allow != documented:
                    problems.append(
                        f"{method.upper()} {path}: {response.status_code}, "
                        f"Allow {response.headers.get('allow')!r}, documented {sorted(documented)}"
                    )
    assert not problems, "\n".join(problems)
