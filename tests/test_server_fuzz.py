"""Property-based fuzzing of the server's OpenAPI document (schemathesis): no input gives a 5xx."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")

from tests.test_server import LiveServer  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    from moe_tui.inference.synthetic import make_checkpoint

    model = make_checkpoint(tmp_path_factory.mktemp("fuzz") / "m", "olmoe", max_position_embeddings=512)
    live = LiveServer(model)  # max_tokens is capped at 256, so valid examples stay quick
    yield schemathesis.openapi.from_url(live.url + "/openapi.json")
    live.close()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    if case.path == "/v1/stats/stream":  # an endless stream by design: take one event at the fastest rate
        case.query = {**(case.query or {}), "limit": 1, "hz": 10}
    response = case.call(timeout=120)
    assert response.status_code < 500, (case.path, case.body, response.text[:300])
