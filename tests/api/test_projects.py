"""Projects and scoped keys on one real server: each key sees only its project's files, jobs, models
and deployments (another project's id is a 404, never a 403), an inference key only chats, a
revoked key is refused at once, and the single-key install goes on working as the admin key."""

from __future__ import annotations

import openai
import pytest
import requests

from tests.conftest import BASE_MODEL, SAMPLES
from tests.server import Server, start_server, stop_server
from tunelab.store import Store
from tunelab.store.db import now
from tunelab.store.tables import ModelRow

pytestmark = pytest.mark.integration
API_VERSION = {"api-version": "2023-05-01"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("projects") / "data", worker=False)
    yield server
    stop_server(server)


def admin(srv: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {srv.key}"}


def new_project(srv: Server, name: str) -> str:
    r = requests.post(f"{srv.url}/v1/organization/projects", headers=admin(srv), json={"name": name})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def new_key(srv: Server, project: str, role: str = "member", by: dict | None = None) -> dict:
    r = requests.post(
        f"{srv.url}/v1/organization/projects/{project}/api_keys",
        headers=by or admin(srv),
        json={"name": f"{role} key", "role": role},
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def teams(srv):
    """Two projects, a member key each, and what project A owns: a file, a job, a model, a deployment."""
    a, b = new_project(srv, "team a"), new_project(srv, "team b")
    key_a, key_b = new_key(srv, a)["value"], new_key(srv, b)["value"]
    client_a = srv.openai(key=key_a)
    with (SAMPLES / "training_set.jsonl").open("rb") as f:
        file_a = client_a.files.create(file=f, purpose="fine-tune")
    job_a = client_a.fine_tuning.jobs.create(model=BASE_MODEL, training_file=file_a.id)
    # The row a worker writes when A's job succeeds (this server has no worker).
    model_a = f"ft:{BASE_MODEL}:team-a:{job_a.id[6:14]}"
    Store(f"sqlite:///{srv.data_dir / 'tunelab.db'}").add(
        ModelRow(
            id=model_a,
            created_at=now(),
            kind="fine-tuned",
            owned_by="user",
            path=str(srv.data_dir / "nowhere"),
            base_model=BASE_MODEL,
            method="lora",
            job_id=job_a.id,
            project_id=a,
        )
    )
    body = {"sku": {"name": "standard", "capacity": 1}, "properties": {"model": {"name": BASE_MODEL}}}
    r = requests.put(srv.deployment_url("dep-a"), headers={"api-key": key_a}, params=API_VERSION, json=body)
    assert r.status_code == 201, r.text
    return {"a": a, "b": b, "key_a": key_a, "key_b": key_b, "file_a": file_a.id, "job_a": job_a.id, "model_a": model_a}


def test_each_key_sees_only_its_own_files(srv, teams):
    a, b = srv.openai(key=teams["key_a"]), srv.openai(key=teams["key_b"])
    assert teams["file_a"] in [f.id for f in a.files.list()]
    assert teams["file_a"] not in [f.id for f in b.files.list()]
    for call in (b.files.retrieve, b.files.content, b.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(teams["file_a"])
    with pytest.raises(openai.BadRequestError) as err:  # B cannot train on A's file
        b.fine_tuning.jobs.create(model=BASE_MODEL, training_file=teams["file_a"])
    assert err.value.body["code"] == "file_not_found"


def test_each_key_sees_only_its_own_jobs(srv, teams):
    a, b = srv.openai(key=teams["key_a"]), srv.openai(key=teams["key_b"])
    assert [j.id for j in a.fine_tuning.jobs.list().data] == [teams["job_a"]]
    assert b.fine_tuning.jobs.list().data == []
    jobs = b.fine_tuning.jobs
    for call in (jobs.retrieve, jobs.cancel, jobs.pause, jobs.resume, jobs.list_events, jobs.checkpoints.list):
        with pytest.raises(openai.NotFoundError):
            call(teams["job_a"])
    assert a.fine_tuning.jobs.retrieve(teams["job_a"]).model_extra["tunelab"]["project_id"] == teams["a"]


def test_each_key_sees_only_its_own_models_and_every_base_model(srv, teams):
    a, b = srv.openai(key=teams["key_a"]), srv.openai(key=teams["key_b"])
    assert {BASE_MODEL, teams["model_a"]} <= {m.id for m in a.models.list()}
    assert BASE_MODEL in {m.id for m in b.models.list()} and teams["model_a"] not in {m.id for m in b.models.list()}
    for call in (b.models.retrieve, b.models.delete):
        with pytest.raises(openai.NotFoundError):
            call(teams["model_a"])
    with pytest.raises(openai.BadRequestError):  # nor fine-tune it further
        b.fine_tuning.jobs.create(model=teams["model_a"], training_file="file-x")
    body = {"properties": {"model": {"name": teams["model_a"]}}}
    r = requests.put(srv.deployment_url("dep-b"), headers={"api-key": teams["key_b"]}, params=API_VERSION, json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "DeploymentModelNotSupported"


def test_each_key_sees_only_its_own_deployments(srv, teams):
    b = {"api-key": teams["key_b"]}
    url = srv.deployment_url("dep-a")
    assert requests.get(url, headers=b, params=API_VERSION).status_code == 404
    assert requests.delete(url, headers=b, params=API_VERSION).status_code == 404
    listed = requests.get(url.rsplit("/", 1)[0], headers=b, params=API_VERSION).json()["value"]
    assert listed == []
    # The name is A's: B cannot take it over (names are unique on the server, as in one Azure account).
    body = {"properties": {"model": {"name": BASE_MODEL}}}
    r = requests.put(url, headers=b, params=API_VERSION, json=body)
    assert r.status_code == 409 and r.json()["error"]["code"] == "DeploymentNameTaken"
    a = {"api-key": teams["key_a"]}
    assert requests.get(url, headers=a, params=API_VERSION).json()["name"] == "dep-a"


def test_another_projects_deployment_or_model_cannot_be_chatted_with(srv, teams):
    b = srv.openai(key=teams["key_b"])
    for name in ("dep-a", teams["model_a"]):
        with pytest.raises(openai.NotFoundError):
            b.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=1)


def test_an_inference_key_chats_but_cannot_upload_or_train(srv, teams):
    key = new_key(srv, teams["a"], role="inference")["value"]
    client = srv.openai(key=key)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert err.value.status_code == 403 and err.value.body["code"] == "insufficient_permissions"
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=teams["file_a"])
    assert err.value.body["code"] == "insufficient_permissions"
    for call in (client.files.list, client.fine_tuning.jobs.list):
        with pytest.raises(openai.PermissionDeniedError):
            call()
    assert BASE_MODEL in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):  # it may call chat: past auth, to the (missing) deployment
        client.chat.completions.create(model="no-such-deployment", messages=[{"role": "user", "content": "hi"}])
    r = requests.get(srv.deployment_url("dep-a"), headers={"api-key": key}, params=API_VERSION)
    assert r.status_code == 403


def test_a_revoked_key_is_refused_at_once(srv, teams):
    made = new_key(srv, teams["b"])
    client = srv.openai(key=made["value"])
    assert client.files.list().data == []
    r = requests.delete(f"{srv.url}/v1/organization/projects/{teams['b']}/api_keys/{made['id']}", headers=admin(srv))
    assert r.json() == {"object": "organization.project.api_key.deleted", "id": made["id"], "deleted": True}
    with pytest.raises(openai.AuthenticationError):
        client.files.list()
    listed = requests.get(f"{srv.url}/v1/organization/projects/{teams['b']}/api_keys", headers=admin(srv)).json()
    assert made["id"] not in [k["id"] for k in listed["data"]]
    assert all("value" not in k for k in listed["data"])  # shown once, at creation


def test_owners_manage_their_own_projects_keys_and_members_do_not(srv, teams):
    owner = {"Authorization": f"Bearer {new_key(srv, teams['a'], role='owner')['value']}"}
    member = {"Authorization": f"Bearer {teams['key_a']}"}
    made = new_key(srv, teams["a"], role="inference", by=owner)
    assert made["owner"]["service_account"]["role"] == "inference"
    keys_of = f"{srv.url}/v1/organization/projects/{{}}/api_keys"
    assert requests.get(keys_of.format(teams["a"]), headers=member).status_code == 403
    assert requests.get(keys_of.format(teams["b"]), headers=owner).status_code == 404  # not its project
    assert requests.get(f"{srv.url}/v1/organization/projects", headers=owner).status_code == 403


def test_an_admin_key_acts_in_the_project_its_header_names(srv, teams):
    as_a = srv.openai()  # TUNELAB_API_KEY, the single key of an install from before projects
    assert teams["file_a"] not in [f.id for f in as_a.files.list()]  # the default project's files
    in_a = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=srv.key, project=teams["a"], max_retries=0)
    assert teams["file_a"] in [f.id for f in in_a.files.list()]
    wrong = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=teams["key_b"], project=teams["a"], max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.files.list()
    assert err.value.body["code"] == "mismatched_project"


def test_archiving_a_project_stops_its_keys(srv):
    project = new_project(srv, "short-lived")
    client = srv.openai(key=new_key(srv, project)["value"])
    client.files.list()
    r = requests.post(f"{srv.url}/v1/organization/projects/{project}/archive", headers=admin(srv))
    assert r.json()["status"] == "archived"
    with pytest.raises(openai.AuthenticationError):
        client.files.list()
    r = requests.post(f"{srv.url}/v1/organization/projects/proj-default/archive", headers=admin(srv))
    assert r.status_code == 400


def test_admin_keys_are_listed_redacted_and_a_new_one_works(srv):
    made = requests.post(f"{srv.url}/v1/organization/admin_api_keys", headers=admin(srv), json={"name": "ops"}).json()
    assert made["object"] == "organization.admin_api_key" and made["value"].startswith("tl-")
    listed = requests.get(f"{srv.url}/v1/organization/admin_api_keys", headers=admin(srv)).json()["data"]
    assert {"key-configured", made["id"]} <= {k["id"] for k in listed}
    assert all("value" not in k and srv.key not in k["redacted_value"] for k in listed)
    other = {"Authorization": f"Bearer {made['value']}"}
    assert requests.get(f"{srv.url}/v1/organization/projects", headers=other).status_code == 200
    r = requests.delete(f"{srv.url}/v1/organization/admin_api_keys/key-configured", headers=other)
    assert r.status_code == 400  # TUNELAB_API_KEY is revoked by changing the setting
    r = requests.delete(f"{srv.url}/v1/organization/admin_api_keys/{made['id']}", headers=admin(srv))
    assert r.json()["deleted"] is True
    assert requests.get(f"{srv.url}/v1/organization/projects", headers=other).status_code == 401
