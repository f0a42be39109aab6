"""Schemathesis fuzzes every operation of the app's own OpenAPI document, valid and invalid inputs alike:
no input may produce a 5xx. Runs in-process on the fake engine, so it explores many inputs quickly."""

import tempfile

import schemathesis
from hypothesis import HealthCheck, settings

from serving.app import build_app
from serving.settings import ServingSettings
from tests.serving.fakes import FakeEngine, MemoryEventSink

app = build_app(
    ServingSettings(registry_dir=tempfile.mkdtemp(prefix="fuzz-registry-"), follow_policy_topic=False),
    FakeEngine,
    MemoryEventSink,
)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_server_error(case):
    case.call_and_validate(checks=[schemathesis.checks.not_a_server_error])
