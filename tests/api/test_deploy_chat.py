"""Deployments through the Azure management path, and chat completions on them."""

import openai
import pytest
import requests

from tests.conftest import BASE_MODEL

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def base_deployment(server):
    body = server.deploy("base-chat", BASE_MODEL)
    assert body["properties"]["provisioningState"] == "Succeeded", body
    yield "base-chat"
    requests.delete(server.deployment_url("base-chat"), headers={"Authorization": f"Bearer {server.key}"})


def test_deployment_is_listed_in_azure_shape(server, base_deployment):
    r = requests.get(
        server.deployment_url("").rstrip("/"),
        params={"api-version": "2023-05-01"},
        headers={"Authorization": f"Bearer {server.key}"},
    )
    names = [d["name"] for d in r.json()["value"]]
    assert base_deployment in names
    item = next(d for d in r.json()["value"] if d["name"] == base_deployment)
    assert item["properties"]["model"]["name"] == BASE_MODEL
    assert item["sku"] == {"name": "standard", "capacity": 1}


def test_chat_plain_and_streamed_agree_at_temperature_zero(client, base_deployment):
    plain = client.chat.completions.create(model=base_deployment, messages=QUESTION, temperature=0, max_tokens=24)
    text = plain.choices[0].message.content
    assert "Paris" in text
    assert plain.usage.prompt_tokens > 0 and plain.usage.completion_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=base_deployment,
            messages=QUESTION,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_azure_client_chat_with_max_tokens_stop_and_n(server, base_deployment):
    azure = server.azure(api_version="2024-02-01")
    r = azure.chat.completions.create(model=base_deployment, messages=QUESTION, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = azure.chat.completions.create(model=base_deployment, messages=QUESTION, temperature=0, stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    r = azure.chat.completions.create(model=base_deployment, messages=QUESTION, n=2, seed=7, max_tokens=8)
    assert len(r.choices) == 2


def test_same_seed_same_sample(client, base_deployment):
    kwargs = dict(model=base_deployment, messages=QUESTION, temperature=1.0, seed=42, max_tokens=16)
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_deployment_of_unknown_model_is_400(server):
    r = requests.put(
        server.deployment_url("bad"),
        headers={"Authorization": f"Bearer {server.key}"},
        json={"properties": {"model": {"format": "OpenAI", "name": "ft:nope", "version": "1"}}},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "properties.model.name"


def test_deleted_deployment_is_gone(server, client):
    assert server.deploy("short-lived", BASE_MODEL)["properties"]["provisioningState"] == "Succeeded"
    r = requests.delete(server.deployment_url("short-lived"), headers={"Authorization": f"Bearer {server.key}"})
    assert r.status_code == 200
    assert requests.get(server.deployment_url("short-lived"), headers={"api-key": server.key}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="short-lived", messages=QUESTION)


def test_models_list_and_retrieve_ids_with_slashes(client):
    assert BASE_MODEL in [m.id for m in client.models.list()]
    assert client.models.retrieve(BASE_MODEL).id == BASE_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("ft:nothing:here")
