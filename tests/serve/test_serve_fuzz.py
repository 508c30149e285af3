"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis; bounded; loopback only).

Every generated request, valid (positive) or invalid (negative), must get a non-5xx answer,
and the replicas must answer a good request afterwards. (Schemathesis' pytest plugin is not
used: its lazy-fixture loader does not run under pytest 9, so strategies are drawn directly.)
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

GOOD = {"model": "tiny", "prompt": "The quick", "max_tokens": 4, "temperature": 0.0}
EXAMPLES = 25  # per operation and mode


ROUTES = {("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"), ("POST", "/v1/completions")}


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
@pytest.mark.parametrize("app", ["byte", "chat"])
def test_no_server_errors_from_schema_fuzzing(request, app, mode):
    # the byte CalibLM (no chat template: chat is a 400) and the BPE chat model (chat runs)
    url = request.getfixturevalue("serve_urls")["full"] if app == "byte" else request.getfixturevalue("chat_url")
    name = "tiny" if app == "byte" else "qwen3-chat"
    assert url.startswith("http://127.0.0.1:")  # loopback only
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= ROUTES | {("POST", "/v1/chat/completions")}
    seen: list[int] = []
    for op in operations:
        if mode == schemathesis.GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # GET /v1/models takes no input, so there is nothing invalid to send

        @given(case=op.as_strategy(mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case):
            if mode == schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = name  # past the model check, into the replica
            response = case.call(base_url=url, timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500, (
                f"{case.method} {case.path} {case.body!r} -> {response.status_code} {response.text}"
            )

        check()
    assert seen, "no requests were generated"


def test_replicas_answer_after_fuzzing(serve_urls, chat_url):
    r = requests.post(f"{serve_urls['full']}/v1/completions", json=GOOD, timeout=60)
    assert r.status_code == 200, r.text
    chat = {"model": "qwen3-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    r = requests.post(f"{chat_url}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200, r.text
