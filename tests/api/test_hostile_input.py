"""Hostile and careless input against a real server without a worker: every request is checked at the
door (a 400 naming the field, never a 500), races do not 500, a 500 keeps the connection, and the
wire objects say what the OpenAI spec says (no nulls it has absent, no server paths)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from tests.conftest import BASE_MODEL, SAMPLES, free_port
from tests.server import start_server, stop_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def idle(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("hostile") / "data", worker=False)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def headers(idle) -> dict[str, str]:
    return {"Authorization": f"Bearer {idle.key}"}


@pytest.fixture(scope="module")
def training_file(idle) -> str:
    with (SAMPLES / "training_set.jsonl").open("rb") as f:
        return idle.openai().files.create(file=f, purpose="fine-tune").id


def error_of(r: requests.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("hyperparameters", "param"),
    [
        ({"n_epochs": 1e9}, "n_epochs"),  # the one that grew the worker past 10 GB
        ({"n_epochs": 51}, "n_epochs"),
        ({"n_epochs": 0}, "n_epochs"),
        ({"n_epochs": -1}, "n_epochs"),
        ({"n_epochs": True}, "n_epochs"),  # booleans are not numbers
        ({"n_epochs": 3.0}, "n_epochs"),
        ({"n_epochs": "3"}, "n_epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -1}, "batch_size"),
        ({"batch_size": 1e9}, "batch_size"),
        ({"batch_size": 257}, "batch_size"),
        ({"batch_size": False}, "batch_size"),
        ({"learning_rate_multiplier": 0}, "learning_rate_multiplier"),
        ({"learning_rate_multiplier": -1}, "learning_rate_multiplier"),
        ({"learning_rate_multiplier": 1e300}, "learning_rate_multiplier"),
        ({"learning_rate_multiplier": True}, "learning_rate_multiplier"),
        ({"lora_rank": 100000}, "lora_rank"),
        ({"lora_rank": -1}, "lora_rank"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"lora_dropout": True}, "lora_dropout"),
    ],
)
def test_out_of_range_hyperparameters_are_400s_naming_the_field(idle, headers, training_file, hyperparameters, param):
    for body in (
        {"hyperparameters": hyperparameters},
        {"method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}},
        {"method": {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}},
    ):
        r = requests.post(
            f"{idle.url}/v1/fine_tuning/jobs",
            headers=headers,
            json={"model": BASE_MODEL, "training_file": training_file, **body},
        )
        assert error_of(r, 400)["param"].endswith(f"hyperparameters.{param}")


def test_lora_rank_above_the_models_hidden_size_is_a_400(idle, training_file):
    with pytest.raises(openai.BadRequestError) as err:
        idle.openai().fine_tuning.jobs.create(
            model=BASE_MODEL, training_file=training_file, hyperparameters={"lora_rank": 577}
        )
    assert err.value.body["param"] == "lora_rank" and "hidden size" in err.value.body["message"]
    # at the bound it is accepted
    job = idle.openai().fine_tuning.jobs.create(
        model=BASE_MODEL, training_file=training_file, hyperparameters={"lora_rank": 576}
    )
    assert job.status == "queued"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"seed": 2**31}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": -1}, "seed"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"suffix": "a:b"}, "suffix"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"metadata": {"k": 1}}, "metadata.k"),
        ({"model": "m" * 513}, "model"),
        ({"training_file": "f" * 65}, "training_file"),
        ({"method": {"type": "reinforcement"}}, "method.type"),
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}, "method.dpo.hyperparameters.beta"),
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 2.01}}}}, "method.dpo.hyperparameters.beta"),
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -0.1}}}}, "method.dpo.hyperparameters.beta"),
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": True}}}}, "method.dpo.hyperparameters.beta"),
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "0.1"}}}}, "method.dpo.hyperparameters.beta"),
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 1e300}}}}, "method.dpo.hyperparameters.beta"),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}}, "method.supervised"),
        ({"hyperparameters": {"beta": 0.1}}, "hyperparameters.beta"),  # the deprecated top level is supervised's
        ({"method": {"type": "supervised", "dpo": {}}}, "method"),
        ({"method": {"type": "dpo", "supervised": {}}}, "method"),
    ],
)
def test_other_job_fields_are_bounded(idle, headers, training_file, extra, param):
    r = requests.post(
        f"{idle.url}/v1/fine_tuning/jobs",
        headers=headers,
        json={"model": BASE_MODEL, "training_file": training_file, **extra},
    )
    assert error_of(r, 400)["param"].startswith(param)


def test_metadata_at_its_limits_is_accepted_and_filters_the_list(idle, training_file):
    jobs = idle.openai().fine_tuning.jobs
    full = {f"key{i}": "v" * 512 for i in range(15)} | {"k" * 64: "team-a"}
    tagged = jobs.create(model=BASE_MODEL, training_file=training_file, metadata=full)
    other = jobs.create(model=BASE_MODEL, training_file=training_file, metadata={"k" * 64: "team-b"})
    assert [j.id for j in jobs.list(metadata={"k" * 64: "team-a"})] == [tagged.id]
    assert [j.id for j in jobs.list(metadata={"k" * 64: "team-b", "nope": "x"})] == []
    assert {tagged.id, other.id} <= {j.id for j in jobs.list(limit=100)}


def test_jobs_created_in_the_same_second_list_newest_first(idle, training_file):
    jobs = idle.openai().fine_tuning.jobs
    made = [jobs.create(model=BASE_MODEL, training_file=training_file).id for _ in range(6)]
    listed = [j.id for j in jobs.list(limit=6).data]
    assert listed == made[::-1]
    # and the cursor walks the same order
    page = jobs.list(limit=2, after=made[3])
    assert [j.id for j in page.data] == [made[2], made[1]]


def test_the_job_object_has_no_nulls_the_spec_leaves_out_and_no_server_paths(idle, headers, training_file):
    job = requests.post(
        f"{idle.url}/v1/fine_tuning/jobs", headers=headers, json={"model": BASE_MODEL, "training_file": training_file}
    ).json()
    for absent in ("integrations", "estimated_finish", "user_provided_suffix"):
        assert absent not in job
    for required_nullable in ("error", "fine_tuned_model", "finished_at", "trained_tokens", "validation_file"):
        assert job[required_nullable] is None
    assert job["tunelab"] == {"project_id": "proj-default"}
    events = requests.get(f"{idle.url}/v1/fine_tuning/jobs/{job['id']}/events", headers=headers).json()
    assert events["data"] and all("data" not in e for e in events["data"])  # plain message events carry none
    empty = requests.get(f"{idle.url}/v1/files", headers=headers, params={"purpose": "batch"}).json()
    assert empty == {"object": "list", "data": [], "has_more": False}  # no null first_id/last_id
    file = requests.get(f"{idle.url}/v1/files/{training_file}", headers=headers).json()
    assert "expires_at" not in file and "status_details" not in file
    report = requests.get(f"{idle.url}/v1/files/{training_file}/validation", headers=headers).json()
    assert "path" not in report and str(idle.data_dir) not in json.dumps(report)


@pytest.mark.parametrize(
    ("name", "sku", "status"),
    [
        ("a", {"name": "standard", "capacity": 1}, 400),  # names are 2-64 characters
        ("x" * 65, {"name": "standard", "capacity": 1}, 400),
        ("bad name!", {"name": "standard", "capacity": 1}, 400),
        ("ok-name", {"name": "standard", "capacity": 0}, 400),
        ("ok-name", {"name": "standard", "capacity": -5}, 400),
        ("ok-name", {"name": "standard", "capacity": True}, 400),
        ("ok-name", {"name": "standard", "capacity": 10**12}, 400),
    ],
)
def test_deployment_names_and_capacity_are_checked(idle, headers, name, sku, status):
    body = {"sku": sku, "properties": {"model": {"format": "OpenAI", "name": BASE_MODEL, "version": "1"}}}
    r = requests.put(idle.deployment_url(name), headers=headers, params={"api-version": "2023-05-01"}, json=body)
    error_of(r, status)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/files", {"limit": 0}),
        ("/v1/files", {"limit": 10001}),
        ("/v1/files", {"order": "sideways"}),
        ("/v1/files", {"after": "x" * 513}),
        ("/v1/fine_tuning/jobs", {"limit": 1001}),
        ("/v1/fine_tuning/jobs", {"limit": "ten"}),
        ("/v1/fine_tuning/jobs", {"metadata[" + "k" * 65 + "]": "v"}),
        ("/v1/organization/projects", {"limit": 101}),
    ],
)
def test_list_parameters_are_bounded(idle, headers, path, params):
    error_of(requests.get(f"{idle.url}{path}", headers=headers, params=params), 400)


def test_a_body_larger_than_the_limit_is_a_413_before_it_is_read(idle, headers):
    huge = b'{"model": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    r = requests.post(
        f"{idle.url}/v1/fine_tuning/jobs", headers={**headers, "content-type": "application/json"}, data=huge
    )
    assert error_of(r, 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b"x" * (1024 * 1024)

    r = requests.post(f"{idle.url}/v1/fine_tuning/jobs", headers=headers, data=chunked())
    assert r.status_code == 413


def test_a_bad_training_file_error_leads_with_its_first_line_error(idle):
    client = idle.openai()
    bad = client.files.create(file=("bad.jsonl", b'{"messages": [}\n{"messages": []}\n'), purpose="fine-tune")
    assert bad.status == "error"
    job = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=bad.id)
    assert job.status == "failed" and job.error.param == "training_file"
    # before: "2 examples: at least 10 are needed; 2 more errors", hiding the line
    assert "has errors: line 1: invalid JSON" in job.error.message, job.error.message


def test_twenty_parallel_puts_of_a_new_name_create_it_once(idle, headers):
    body = {"sku": {"name": "standard", "capacity": 1}, "properties": {"model": {"name": BASE_MODEL}}}
    url = idle.deployment_url("raced")
    start = threading.Barrier(20)

    def put(_: int) -> int:
        start.wait()
        return requests.put(url, headers=headers, params={"api-version": "2023-05-01"}, json=body).status_code

    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(put, range(20)))
    assert sorted(codes) == [200] * 19 + [201], codes
    listed = requests.get(url.rsplit("/", 1)[0], headers=headers, params={"api-version": "2023-05-01"}).json()
    assert [d["name"] for d in listed["value"]].count("raced") == 1
    requests.delete(url, headers=headers, params={"api-version": "2023-05-01"})


def test_after_a_500_the_keep_alive_connection_still_serves(tmp_path):
    """A route that fails unexpectedly, added to the real app under the real uvicorn: the client gets an
    OpenAI-shaped 500 and its next request on the same connection is answered (not a read error)."""
    import uvicorn

    from tunelab.api.app import create_app
    from tunelab.config import Settings

    app = create_app(Settings(data_dir=tmp_path / "data", api_key="k"))

    def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.05)
    try:
        with requests.Session() as session:
            url, ports = f"http://127.0.0.1:{port}", []

            def get(path: str, **kwargs) -> requests.Response:
                r = session.get(f"{url}{path}", stream=True, **kwargs)
                ports.append(r.raw.connection.sock.getsockname()[1])  # the client end of the connection used
                r.content  # noqa: B018  # read it all, so the connection goes back to the pool
                return r

            r = get("/boom")
            assert error_of(r, 500)["type"] == "server_error" and "a bug" not in r.text
            assert get("/health").status_code == 200
            assert get("/boom").status_code == 500
            assert get("/v1/models", headers={"api-key": "k"}).status_code == 200
            assert len(set(ports)) == 1, ports  # one connection throughout: the server never dropped it
    finally:
        server.should_exit = True
        thread.join(timeout=30)
