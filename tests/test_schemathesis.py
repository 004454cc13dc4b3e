"""schemathesis against a real `wicore serve`, driven by the server's own `GET /openapi.json`:
for every operation, generated requests (valid and invalid), and for every answer: no 5xx, a
documented status and content type, a body that matches the document, and every error in
the error shape.

Bounded: the server serves a 128-token context, so no generation runs long, and each
operation gets a fixed number of examples (`MAX_EXAMPLES`). `positive_data_acceptance` is
left out on purpose: the document cannot say that roles must alternate (the chat template
decides) or how many tokens a text makes, so a well-formed request can rightly get a 400.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import orjson
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import checks  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402

from tests.conftest import MODEL_ID, ROOT, ServerProcess, _wait_process_healthy, free_port  # noqa: E402
from wicore_cpp.errors import WicoreError  # noqa: E402

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def wicore_url(demo_model_path, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("schemathesis") / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wicore_cpp", "serve", "--model", str(demo_model_path),
         "--model-id", MODEL_ID, "--port", str(port), "--threads", "2", "--ctx-size", "2048",
         "--max-seq-len", "128", "--default-max-tokens", "16", "--flash-attn", "off",
         "--rate-limit-per-minute", "0", "--request-timeout-s", "600",
         "--log-level", "WARNING"],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ),
    )
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    asyncio.run(_wait_process_healthy(server))
    yield server.url
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


@pytest.fixture(scope="module")
def wicore_schema(wicore_url):
    return schemathesis.openapi.from_url(wicore_url + "/openapi.json")


def _error_codes() -> dict[int, set[str]]:
    """Status -> the codes an error of that status may carry: those of the server's own
    error classes with that status, or the status itself (an error class without a code)."""
    out: dict[int, set[str]] = {}
    todo = [WicoreError]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        out.setdefault(cls.status, set()).add(cls.code or str(cls.status))
    return out


ERROR_CODES = _error_codes()


@schemathesis.check
def errors_in_the_error_shape(ctx, response, case):
    """Every 4xx and 5xx answer is {"error": {"message", "type", "param", "code"}}, its code
    one that the server's errors of that status have."""
    if response.status_code < 400:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), \
        response.headers
    doc = orjson.loads(response.content)
    assert set(doc) >= {"error"}, doc
    assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
    allowed = ERROR_CODES.get(response.status_code, {str(response.status_code)})
    assert doc["error"]["code"] in allowed, (doc, allowed)
    return True


CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
    errors_in_the_error_shape,
]


# schemathesis's own pytest plugin (`from_fixture`) does not run under pytest 9.2, so each
# operation's cases come from its documented strategy API, one hypothesis run per operation.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_answer_matches_the_document(wicore_schema, mode):
    failures = []
    num_operations = 0
    for result in wicore_schema.get_all_operations():
        operation = result.ok()
        num_operations += 1

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(mode))
        def run(case):
            case.call_and_validate(checks=CHECKS, timeout=120)

        try:
            run()
        except Unsatisfiable:
            pass  # nothing to generate in this mode (an operation with no input at all)
        except Exception as exc:  # noqa: BLE001 - reported together, below
            failures.append(f"{operation.label}: {exc}")
    assert num_operations >= 6
    assert not failures, "\n\n".join(failures)
