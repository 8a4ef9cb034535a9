"""A DPO job through the real server and the stock SDK: create, events, checkpoints, MLflow, deploy, chat.

Training runs on the tiny random model (registered with ``tunelab models add``), so this is the
integration tier; the DPO numbers themselves are checked in tests/training/test_dpo.py.
"""

from __future__ import annotations

import io
import json

import pytest

from tests.server import Server, start_server_with_model, stop_server
from tests.training.test_dpo import TOPICS, preference

pytestmark = pytest.mark.integration
ENV = {"TUNELAB_TRAIN_THREADS": "1", "TUNELAB_WORKER_POLL_SECONDS": "0.5"}


@pytest.fixture(scope="module")
def serving(tmp_path_factory, tiny_dir) -> Server:
    server = start_server_with_model(tmp_path_factory.mktemp("dpo") / "data", tiny_dir, "tiny", env=ENV)
    yield server
    stop_server(server)


def upload(server: Server, examples: list[dict], name: str) -> str:
    data = "".join(json.dumps(e) + "\n" for e in examples).encode()
    return server.openai().files.create(file=(name, io.BytesIO(data)), purpose="fine-tune").id


@pytest.fixture(scope="module")
def preference_files(serving) -> tuple[str, str]:
    train = [preference(t) for t in TOPICS[:16]]
    train[0] = {  # the older spelling of the outputs is read too
        "input": train[0]["input"],
        "preferred_completion": train[0]["preferred_output"],
        "non_preferred_completion": train[0]["non_preferred_output"],
    }
    return upload(serving, train, "prefs.jsonl"), upload(serving, [preference(t) for t in TOPICS[10:]], "valid.jsonl")


@pytest.fixture(scope="module")
def dpo_job(serving, preference_files):
    client = serving.openai()
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=preference_files[0],
        validation_file=preference_files[1],
        seed=3,
        suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 4}}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = serving.wait_job(job.id)
    assert done.status == "succeeded", done.error
    return done


def test_the_job_echoes_its_resolved_dpo_hyperparameters(dpo_job):
    hp = dpo_job.method.dpo.hyperparameters
    assert dpo_job.method.type == "dpo" and dpo_job.method.supervised is None
    assert (hp.beta, hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (0.2, 2, 4, 1.0)  # "auto" resolved
    assert hp.model_extra["learning_rate"] == pytest.approx(5e-5) and hp.model_extra["method"] == "lora"
    assert dpo_job.fine_tuned_model.startswith("ft:tiny:dpo:") and dpo_job.trained_tokens > 0


def test_metrics_events_carry_the_preference_metrics(serving, dpo_job):
    events = list(serving.openai().fine_tuning.jobs.list_events(dpo_job.id, limit=100))
    metrics = sorted((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    assert [m["step"] for m in metrics] == list(range(1, 9))
    keys = {
        "train_loss",
        "train_reward_accuracy",
        "train_chosen_reward",
        "train_rejected_reward",
        "train_reward_margin",
    }
    assert all(keys <= set(m) for m in metrics)
    assert {"full_valid_loss", "full_valid_reward_accuracy", "full_valid_reward_margin"} <= set(metrics[-1])
    assert any("16 preference pairs, DPO (beta 0.2)" in e.message for e in events)


def test_checkpoints_have_preference_metrics_and_deploy_and_answer(serving, dpo_job):
    client = serving.openai()
    ckpts = client.fine_tuning.jobs.checkpoints.list(dpo_job.id).data
    assert sorted(c.step_number for c in ckpts) == [4, 8]
    assert all(c.metrics.model_extra["full_valid_reward_accuracy"] is not None for c in ckpts)
    for name, model in (("dpo-final", dpo_job.fine_tuned_model), ("dpo-ckpt", ckpts[-1].fine_tuned_model_checkpoint)):
        state = serving.deploy(name, model)
        assert state["properties"]["provisioningState"] == "Succeeded", state
        answer = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Tell me about the zoo."}], max_tokens=8, temperature=0
        )
        assert answer.usage.completion_tokens > 0 and answer.choices[0].message.content is not None


def test_mlflow_has_the_preference_metrics_and_beta(serving, dpo_job):
    from mlflow import MlflowClient

    raw = serving.openai().fine_tuning.jobs.with_raw_response.retrieve(dpo_job.id).http_response.json()
    run = MlflowClient(f"sqlite:///{serving.data_dir / 'mlflow.db'}").get_run(raw["tunelab"]["mlflow"]["run_id"])
    assert {"train_reward_accuracy", "train_reward_margin", "full_valid_reward_margin"} <= set(run.data.metrics)
    assert run.data.params["beta"] == "0.2" and run.data.params["method_type"] == "dpo"


def test_a_fine_tuned_model_goes_on_with_dpo(serving, preference_files, dpo_job):
    job = serving.openai().fine_tuning.jobs.create(
        model=dpo_job.fine_tuned_model,
        training_file=preference_files[0],
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1}}},
    )
    done = serving.wait_job(job.id)
    assert done.status == "succeeded", done.error
    assert (
        done.method.dpo.hyperparameters.beta == 0.1 and done.method.dpo.hyperparameters.model_extra["lora_rank"] == 16
    )
    # The reference is the model it starts from (the trained adapter), not the base: at step 1 the
    # policy equals it, so the loss is log 2 although the adapter already prefers the chosen answers.
    events = serving.openai().fine_tuning.jobs.list_events(job.id, limit=100)
    first = min((e.data for e in events if e.type == "metrics"), key=lambda d: d["step"])
    assert first["train_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert first["train_reward_margin"] == pytest.approx(0, abs=1e-4)


@pytest.mark.parametrize(
    ("method", "wrong"),
    [({"type": "dpo"}, "chat"), ({"type": "supervised"}, "preference")],
    ids=["dpo-on-chats", "supervised-on-pairs"],
)
def test_a_file_of_the_other_format_fails_the_job_with_the_reason(serving, preference_files, method, wrong):
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
             for i in range(10)]  # fmt: skip
    training_file = upload(serving, chats, "chats.jsonl") if wrong == "chat" else preference_files[0]
    job = serving.openai().fine_tuning.jobs.create(model="tiny", training_file=training_file, method=method)
    assert job.status == "failed" and job.error.param == "training_file"
    assert f"holds {wrong} examples" in job.error.message
