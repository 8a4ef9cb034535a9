"""The fuzz tier: schemathesis drives every route of the server's own OpenAPI schema (data plane,
Azure management plane, organization, health) with valid and invalid inputs against a real
`tunelab serve --no-worker` (created jobs stay queued). Nothing may answer 5xx, and every error is
OpenAI-shaped. Bounded by examples per route and by time (TUNELAB_FUZZ_EXAMPLES, default 10;
TUNELAB_FUZZ_SECONDS, default 240 in all); the request count is printed at the end.

    python -m pytest -m fuzz tests/fuzz -p no:cacheprovider -q -s

(schemathesis's own pytest plugin does not load under pytest 9, so the cases are drawn with
``APIOperation.as_strategy`` and hypothesis directly.)
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest
import requests

from tests.conftest import SAMPLES
from tests.server import Server, start_server, stop_server

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz tier needs: pip install -e '.[fuzz]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402  # installed with schemathesis
from hypothesis.errors import Unsatisfiable  # noqa: E402

pytestmark = [pytest.mark.fuzz, pytest.mark.integration]
EXAMPLES = int(os.environ.get("TUNELAB_FUZZ_EXAMPLES", "10"))
BUDGET = float(os.environ.get("TUNELAB_FUZZ_SECONDS", "240"))
TALLY: Counter[str] = Counter()
UNSATISFIABLE: list[str] = []
STARTED = time.monotonic()


@pytest.fixture(scope="session")
def fuzz_server(tmp_path_factory) -> Server:
    server = start_server(tmp_path_factory.mktemp("fuzz") / "data", worker=False)
    with (SAMPLES / "training_set.jsonl").open("rb") as f:  # something real to find
        server.openai().files.create(file=f, purpose="fine-tune")
    yield server
    stop_server(server)
    print(
        f"\nfuzz: {sum(TALLY.values())} requests, {sum(v for k, v in TALLY.items() if k.startswith('5'))} 5xx; "
        f"by status {dict(sorted(TALLY.items()))}"
    )


def test_the_schema_is_valid_openapi(fuzz_server):
    from openapi_spec_validator import validate

    validate(requests.get(f"{fuzz_server.url}/openapi.json").json())


def test_no_5xx_and_every_error_openai_shaped(fuzz_server):
    """Every operation, positive and negative cases (hypothesis, derandomized: the same run each time)."""
    api = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) > 40
    problems: list[str] = []
    headers = {"Authorization": f"Bearer {fuzz_server.key}"}
    with requests.Session() as session:  # one keep-alive connection: a dropped one shows too
        for operation in operations:
            for mode in schemathesis.GenerationMode:
                if time.monotonic() - STARTED > BUDGET:
                    break

                @settings(
                    max_examples=EXAMPLES,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                    derandomize=True,
                    database=None,
                )
                @given(case=operation.as_strategy(generation_mode=mode))
                def run(case) -> None:
                    try:
                        response = case.call(base_url=fuzz_server.url, session=session, headers=headers, timeout=60)
                    except requests.ConnectionError as e:
                        problems.append(f"{case.method} {case.formatted_path}: connection error {e}")
                        return
                    TALLY[str(response.status_code)] += 1
                    what = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
                    if response.status_code >= 500:
                        problems.append(what)
                    elif response.status_code >= 400:
                        try:
                            error = response.json().get("error")
                        except ValueError:
                            error = None
                        if not (isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)):
                            problems.append("not OpenAI-shaped: " + what)

                try:
                    run()
                except Unsatisfiable:  # e.g. no invalid input exists for a route without parameters
                    UNSATISFIABLE.append(f"{operation.label} ({mode.value})")
    print(f"\nfuzz: {len(operations)} operations; no cases possible for {UNSATISFIABLE}")
    assert problems == [], "\n".join(problems[:30])
