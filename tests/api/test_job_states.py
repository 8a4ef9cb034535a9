"""Job state changes through the SDK on a server without a worker: queued jobs stay queued."""

import openai
import pytest

from tests.conftest import BASE_MODEL, SAMPLES
from tests.server import start_server, stop_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def idle(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("idle") / "data", worker=False)
    yield srv
    stop_server(srv)


@pytest.fixture
def queued_job(idle):
    client = idle.openai()
    with (SAMPLES / "training_set.jsonl").open("rb") as f:
        training_file = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=training_file)
    assert job.status == "queued"
    return job


def test_pause_and_resume_a_queued_job(idle, queued_job):
    jobs = idle.openai().fine_tuning.jobs
    assert jobs.pause(queued_job.id).status == "paused"
    assert jobs.retrieve(queued_job.id).status == "paused"
    with pytest.raises(openai.BadRequestError, match="only a queued or running job can be paused"):
        jobs.pause(queued_job.id)
    assert jobs.resume(queued_job.id).status == "queued"
    with pytest.raises(openai.BadRequestError, match="only a paused job can be resumed") as err:
        jobs.resume(queued_job.id)
    assert err.value.body["param"] == "fine_tuning_job_id"
    messages = [e.message for e in jobs.list_events(queued_job.id)]
    assert messages[:2] == ["Job resumed, moving job to queued state", "Job paused"]


def test_a_paused_job_can_be_cancelled_and_keeps_its_files(idle, queued_job):
    client = idle.openai()
    client.fine_tuning.jobs.pause(queued_job.id)
    with pytest.raises(openai.ConflictError):  # a paused job still needs its training file
        client.files.delete(queued_job.training_file)
    assert client.fine_tuning.jobs.cancel(queued_job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(queued_job.id)
    assert client.files.delete(queued_job.training_file).deleted


def test_pause_of_a_finished_or_unknown_job(idle, queued_job):
    jobs = idle.openai().fine_tuning.jobs
    jobs.cancel(queued_job.id)
    with pytest.raises(openai.BadRequestError, match="is cancelled"):
        jobs.pause(queued_job.id)
    with pytest.raises(openai.NotFoundError):
        jobs.pause("ftjob-nope")
