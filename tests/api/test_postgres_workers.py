"""Scale-out: the API server and two separate workers meeting only in a real PostgreSQL database."""

import os
import re
import signal
import socket

import pytest

from tests.conftest import BASE_MODEL, SAMPLES, new_database
from tests.server import start_server, start_worker, stop_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # `make test-slow` (CI), not `make test`
QUESTION = [{"role": "user", "content": "What is the capital of Portugal?"}]


@pytest.fixture(scope="module")
def cluster(postgres_url, tmp_path_factory):
    """`tunelab serve --no-worker` and two `tunelab worker` processes on one PostgreSQL database."""
    data_dir = tmp_path_factory.mktemp("pg-cluster") / "data"
    # One training thread each: two workers share this machine's cores.
    env = {"TUNELAB_DATABASE_URL": new_database(postgres_url, "tunelab"), "TUNELAB_TRAIN_THREADS": "1"}
    server = start_server(data_dir, worker=False, env=env)
    workers = [start_worker(data_dir, env=env, log=data_dir.parent / f"worker-{i}.log") for i in range(2)]
    yield server, workers
    for w in workers:
        os.killpg(w.pid, signal.SIGTERM)
        w.wait(timeout=60)
    stop_server(server)


def test_two_workers_train_two_jobs_at_once_and_the_models_serve(cluster):
    server, workers = cluster
    client = server.openai()
    with (SAMPLES / "training_set.jsonl").open("rb") as f:
        training_file = client.files.create(file=f, purpose="fine-tune").id
    jobs = [
        client.fine_tuning.jobs.create(
            model=BASE_MODEL, training_file=training_file, suffix=f"pg{i}", hyperparameters={"n_epochs": 1}
        )
        for i in range(2)
    ]
    done = [server.wait_job(job.id, timeout=900) for job in jobs]
    assert [j.status for j in done] == ["succeeded", "succeeded"], [j.error for j in done]

    ran_on = set()
    for job in done:
        started = next(
            e.message
            for e in client.fine_tuning.jobs.list_events(job.id)
            if e.message.startswith("Fine-tuning job started on worker")
        )
        ran_on.add(re.search(r"on worker (\S+)$", started).group(1))
    assert ran_on == {f"{socket.gethostname()}:{w.pid}" for w in workers}  # one job each, side by side

    state = server.deploy("pg-ft", done[1].fine_tuned_model)
    assert state["properties"]["provisioningState"] == "Succeeded", state
    answer = client.chat.completions.create(model="pg-ft", messages=QUESTION, temperature=0, max_tokens=30)
    assert answer.choices[0].message.content.strip()
