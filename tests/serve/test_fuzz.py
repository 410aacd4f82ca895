"""schemathesis fuzzes every operation of the server's own OpenAPI schema: never a 5xx."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.slow


def test_no_request_gets_a_5xx(tiny_server):
    fuzzed = tiny_server
    schema = schemathesis.openapi.from_url(fuzzed + "/openapi.json")
    failures, calls = [], []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            if case.body and isinstance(case.body, dict) and "max_tokens" in case.body:
                case.body["max_tokens"] = min(case.body["max_tokens"] or 1, 8)  # keep it quick
            response = case.call(base_url=fuzzed, timeout=60)
            calls.append(response.status_code)
            if response.status_code >= 500:
                failures.append((case.method, case.path, case.body, response.text[:300]))

        check()
    assert not failures, failures[:3]
    assert len(calls) > 60 and 200 in calls and 400 in calls  # it fuzzed, and reached the model
