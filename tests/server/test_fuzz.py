"""Schemathesis over /openapi.json: generated requests, valid and invalid, on every route; none gets a 5xx and
every status is one the schema documents (validation errors are 400, as sent).

Schemathesis' own pytest integration (``from_fixture``) does not run under pytest 9, so the cases are drawn
here with hypothesis from each operation's strategy."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

# generation is for robustness, not load: cap what makes a valid request slow (long outputs, many samples)
CAPS = {"max_tokens": 3, "max_completion_tokens": 3, "max_new_tokens": 3, "n": 2, "best_of": 2, "num_beams": 2,
        "top_n": 3, "logprobs": 2, "top_logprobs": 2, "top_n_tokens": 2, "min_tokens": 2}
CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance]


def _cap(value):
    if isinstance(value, dict):
        return {k: min(v, CAPS[k]) if k in CAPS and type(v) is int else _cap(v) for k, v in value.items()}
    return value


def _short(body: dict, path: str) -> dict:
    """Short outputs where the body leaves the length to a default (TGI's 100 tokens, chat's whole context)."""
    body = _cap(body)
    if path.endswith("tokenize"):
        return body
    if "inputs" in body and isinstance(body.get("parameters", {}), dict):
        body["parameters"] = {"max_new_tokens": 3, **body.get("parameters", {})}
    elif ("messages" in body or "prompt" in body) and "max_completion_tokens" not in body:
        body.setdefault("max_tokens", 3)
    return body


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_5xx_and_only_documented_statuses(server, mode):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    fuzzed = 0
    for operation in operations:
        try:
            _fuzz(operation, mode, server.url)()
            fuzzed += 1
        except Unsatisfiable:  # nothing to generate: a GET without parameters has no invalid form
            continue
    assert fuzzed >= 8


def _fuzz(operation, mode, url):
    """A hypothesis test of one operation: 3 cases, the same ones every run."""
    strategy = operation.as_strategy(generation_mode=mode)

    @settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None, phases=[Phase.explicit, Phase.generate])  # no shrinking: report the case as drawn
    @given(data=st.data())
    def check(data):
        case = data.draw(strategy)
        if isinstance(case.body, dict):
            case.body = _short(case.body, operation.path)
        case.call_and_validate(base_url=url, checks=CHECKS, timeout=120)

    return check
