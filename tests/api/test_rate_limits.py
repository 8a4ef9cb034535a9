"""Azure-style rate limits per deployment (TUNELAB_RATE_LIMITS=true): capacity 1 = 6 requests and
1000 tokens per minute; over a limit is a 429 with retry-after, and nothing else is counted."""

import openai
import pytest
import requests

from tests.conftest import BASE_MODEL
from tests.server import start_server, stop_server

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("limited") / "data", worker=False, env={"TUNELAB_RATE_LIMITS": "true"})
    yield srv
    stop_server(srv)


def test_the_seventh_request_in_a_minute_is_a_429_with_retry_after(limited):
    assert limited.deploy("rpm", BASE_MODEL)["properties"]["provisioningState"] == "Succeeded"
    client = limited.openai()  # max_retries=0: see the 429 rather than wait it out
    remaining = []
    for _ in range(6):
        r = client.chat.completions.with_raw_response.create(model="rpm", messages=HI, max_tokens=1)
        remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
        assert r.headers["x-ratelimit-limit-requests"] == "6" and r.headers["x-ratelimit-limit-tokens"] == "1000"
    assert remaining == [5, 4, 3, 2, 1, 0]
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="rpm", messages=HI, max_tokens=1)
    assert err.value.body["code"] == "rate_limit_exceeded" and err.value.body["type"] == "requests"
    assert 0 < int(err.value.response.headers["retry-after"]) <= 60
    # The model itself, called by id rather than through the deployment, is not limited.
    assert client.chat.completions.create(model=BASE_MODEL, messages=HI, max_tokens=1).choices


def test_tokens_count_the_prompt_and_max_tokens(limited):
    assert limited.deploy("tpm", BASE_MODEL)["properties"]["provisioningState"] == "Succeeded"
    azure = limited.azure()
    long = [{"role": "user", "content": "Tell me about the sea. " * 120}]  # ~700 prompt tokens
    first = azure.chat.completions.with_raw_response.create(model="tpm", messages=long, max_tokens=1)
    left = int(first.headers["x-ratelimit-remaining-tokens"])
    assert 0 < left < 400
    with pytest.raises(openai.RateLimitError) as err:  # a small prompt, but max_tokens is counted too
        azure.chat.completions.create(model="tpm", messages=HI, max_tokens=left)
    assert err.value.body["type"] == "tokens"
    # A request that fits still goes through: the refused one was not counted.
    ok = azure.chat.completions.with_raw_response.create(model="tpm", messages=HI, max_tokens=1)
    assert int(ok.headers["x-ratelimit-remaining-requests"]) == 4


def test_streamed_responses_carry_the_headers(limited):
    assert limited.deploy("stream", BASE_MODEL)["properties"]["provisioningState"] == "Succeeded"
    r = requests.post(
        f"{limited.url}/v1/chat/completions",
        headers={"api-key": limited.key},
        stream=True,
        json={"model": "stream", "messages": HI, "max_tokens": 2, "stream": True},
    )
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "5"
    assert r.text.rstrip().endswith("data: [DONE]")
