"""Auth and the one error shape: 401/404/400 bodies as OpenAI sends them."""

import openai
import pytest
import requests

from tests.conftest import BASE_MODEL

pytestmark = pytest.mark.integration


def _error(r: requests.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_missing_key_is_401_with_openai_body(server):
    r = requests.get(f"{server.url}/v1/models")
    assert r.status_code == 401
    assert _error(r)["code"] == "invalid_api_key"


def test_wrong_key_is_rejected_by_the_sdk(server):
    with pytest.raises(openai.AuthenticationError):
        server.openai(key="wrong").models.list()


@pytest.mark.parametrize("headers", [{"api-key": "test-key"}, {"Authorization": "Bearer test-key"}])
def test_both_key_headers_are_accepted(server, headers):
    assert requests.get(f"{server.url}/v1/models", headers=headers).status_code == 200
    assert requests.get(f"{server.url}/openai/models", headers=headers, params={"api-version": "2024-02-01"}).ok


def test_management_plane_needs_the_key_too(server):
    r = requests.get(server.deployment_url("x"), params={"api-version": "2023-05-01"})
    assert r.status_code == 401
    _error(r)


def test_unknown_route_and_object_are_404_bodies(server):
    headers = {"api-key": server.key}
    assert _error(requests.get(f"{server.url}/v1/nothing", headers=headers))["code"] == "not_found"
    r = requests.get(f"{server.url}/v1/files/file-missing", headers=headers)
    assert r.status_code == 404 and "file-missing" in _error(r)["message"]


def test_invalid_body_is_400_naming_the_param(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=BASE_MODEL, messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert err.value.body["param"] == "temperature"


def test_unknown_deployment_is_404_deployment_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-deployment", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "DeploymentNotFound"


def test_job_with_unknown_model_or_file_is_400(client, uploaded_lab_files):
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="gpt-4o", training_file=uploaded_lab_files[0])
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=BASE_MODEL, training_file="file-nope")
    assert err.value.body["param"] == "training_file"
