"""The Evals API against the real server with the stock openai SDK: evals, runs on tunelab's own
models, output items, every grader, cancel, delete, the classification report, bad input."""

from __future__ import annotations

import copy
import io
import json
import time

import openai
import pytest
import requests

from tests.conftest import BASE_MODEL

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "label": {"type": "string", "enum": ["positive", "negative"]}},
    "required": ["text", "label"],
}
REVIEWS = [
    ("I loved this film, a wonderful story.", "positive"),
    ("Terrible and boring, I walked out.", "negative"),
    ("Great acting, great music, a joy.", "positive"),
    ("The worst movie I have seen this year.", "negative"),
    ("Beautiful and moving from start to end.", "positive"),
    ("Awful script and wooden acting.", "negative"),
]
PROMPT = [
    {"role": "system", "content": "Classify the sentiment of the review. Answer with one word: positive or negative."},
    {"role": "user", "content": "{{item.text}}"},
]
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.label}}",
    "operation": "eq",
}


def items(rows=REVIEWS) -> list[dict]:
    return [{"item": {"text": t, "label": label}} for t, label in rows]


def completions(model: str, rows=REVIEWS, **sampling) -> dict:
    return {
        "type": "completions",
        "model": model,
        "input_messages": {"type": "template", "template": copy.deepcopy(PROMPT)},
        "sampling_params": {"temperature": 0, "max_completion_tokens": 3, **sampling},
        "source": {"type": "file_content", "content": items(rows)},
    }


def wait_run(client, eval_id: str, run_id: str, timeout: float = 600):
    deadline = time.time() + timeout
    while (run := client.evals.runs.retrieve(run_id, eval_id=eval_id)).status in ("queued", "in_progress"):
        assert time.time() < deadline, f"run {run_id} still {run.status}"
        time.sleep(0.5)
    return run


@pytest.fixture(scope="module")
def sentiment_eval(client):
    ev = client.evals.create(
        name="sentiment",
        metadata={"suite": "test"},
        data_source_config={"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True},
        testing_criteria=[
            EXACT,
            {**EXACT, "name": "contains", "operation": "ilike"},
        ],
    )
    return ev


@pytest.fixture(scope="module")
def base_run(client, sentiment_eval):
    run = client.evals.runs.create(sentiment_eval.id, name="base", data_source=completions(BASE_MODEL))
    return wait_run(client, sentiment_eval.id, run.id)


def test_eval_create_echoes_schema_and_ids(client, sentiment_eval, server):
    ev = sentiment_eval
    assert ev.object == "eval" and ev.id.startswith("eval_") and ev.name == "sentiment"
    cfg = ev.data_source_config
    assert cfg.type == "custom"
    assert cfg.schema_["properties"]["item"] == SCHEMA  # wrapped as OpenAI does, with the sample schema
    assert cfg.schema_["required"] == ["item", "sample"] and "sample" in cfg.schema_["properties"]
    ids = [c.id for c in ev.testing_criteria]
    assert ids[0].startswith("exact-") and ids[1].startswith("contains-") and len(set(ids)) == 2
    assert client.evals.retrieve(ev.id).testing_criteria[0].operation == "eq"
    azure = server.azure(api_version="2025-04-01-preview")  # /openai/evals?api-version=...
    assert azure.evals.retrieve(ev.id).id == ev.id


def test_eval_list_order_update_delete(client):
    made = [
        client.evals.create(
            name=f"e{i}", data_source_config={"type": "custom", "item_schema": SCHEMA}, testing_criteria=[EXACT]
        )
        for i in range(3)
    ]
    ours = {e.id for e in made}
    asc = [e.id for e in client.evals.list(limit=2, order="asc") if e.id in ours]  # pages of 2, auto-paged
    assert asc == [e.id for e in sorted(made, key=lambda e: (e.created_at, e.id))]  # ties: by id
    desc = [e.id for e in client.evals.list(order="desc", limit=100) if e.id in ours]
    assert desc == asc[::-1]
    page = client.evals.list(limit=1, order="asc")
    assert len(page.data) == 1 and page.has_more

    updated = client.evals.update(made[0].id, name="renamed", metadata={"k": "v"})
    assert updated.name == "renamed" and updated.metadata == {"k": "v"}
    time.sleep(1.1)  # updated_at is in seconds
    client.evals.update(made[2].id, name="renamed too")
    by_update = [e.id for e in client.evals.list(order="desc", order_by="updated_at", limit=100) if e.id in ours]
    assert by_update[0] == made[2].id

    gone = client.evals.delete(made[1].id)
    assert gone.deleted and gone.eval_id == made[1].id and gone.object == "eval.deleted"
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve(made[1].id)


def test_run_on_the_base_model(client, sentiment_eval, base_run):
    run = base_run
    assert run.status == "completed", run.error
    assert run.object == "eval.run" and run.model == BASE_MODEL and run.name == "base"
    counts = run.result_counts
    assert counts.total == len(REVIEWS) == counts.passed + counts.failed + counts.errored
    per = {r.testing_criteria: r for r in run.per_testing_criteria_results}
    assert set(per) == {c.id for c in sentiment_eval.testing_criteria}
    assert all(r.passed + r.failed == len(REVIEWS) for r in per.values())
    usage = run.per_model_usage[0]
    assert usage.model_name == BASE_MODEL and usage.invocation_count == len(REVIEWS)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0
    assert run.report_url.endswith(f"/evals/{sentiment_eval.id}/runs/{run.id}")
    assert requests.get(run.report_url, headers={"api-key": "test-key"}).json()["id"] == run.id
    assert run.data_source.input_messages.template[1].content.text == "{{item.text}}"  # normalised echo


def test_output_items_page_filter_and_samples(client, sentiment_eval, base_run):
    listed = client.evals.runs.output_items.list(base_run.id, eval_id=sentiment_eval.id, limit=2)
    assert len(listed.data) == 2 and listed.has_more
    every = list(client.evals.runs.output_items.list(base_run.id, eval_id=sentiment_eval.id, limit=2))
    assert [o.datasource_item_id for o in every] == list(range(len(REVIEWS)))
    first = every[0]
    assert first.datasource_item == items()[0]["item"] and first.object == "eval.run.output_item"
    s = first.sample
    assert s.model == BASE_MODEL and s.input[1].content == REVIEWS[0][0] and s.finish_reason in ("stop", "length")
    assert s.usage.total_tokens == s.usage.prompt_tokens + s.usage.completion_tokens and s.max_completion_tokens == 3
    for o in every:
        exact = next(r for r in o.results if r.name.startswith("exact-"))
        assert exact.passed == (o.sample.output[0].content == o.datasource_item["label"])
        assert o.status == ("pass" if all(r.passed for r in o.results) else "fail")
    passed = list(client.evals.runs.output_items.list(base_run.id, eval_id=sentiment_eval.id, status="pass"))
    failed = list(client.evals.runs.output_items.list(base_run.id, eval_id=sentiment_eval.id, status="fail"))
    assert len(passed) == base_run.result_counts.passed and len(failed) == len(every) - len(passed)
    assert {o.status for o in passed} <= {"pass"} and {o.status for o in failed} <= {"fail"}
    one = client.evals.runs.output_items.retrieve(first.id, eval_id=sentiment_eval.id, run_id=base_run.id)
    assert one.id == first.id and [r.model_dump() for r in one.results] == [r.model_dump() for r in first.results]


def test_classification_report_equals_sklearn(client, sentiment_eval, base_run):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    report = base_run.classification_report
    outputs = list(client.evals.runs.output_items.list(base_run.id, eval_id=sentiment_eval.id))
    truths = [o.datasource_item["label"] for o in outputs]
    labels = ["positive", "negative"]  # the schema's enum, in its order
    preds = [o.sample.output[0].content if o.sample.output else "" for o in outputs]
    mapped = [p if p in labels else "<off-format>" for p in preds]
    assert report["labels"] == labels and report["total"] == len(outputs)
    assert report["accuracy"] == pytest.approx(accuracy_score(truths, mapped))
    assert report["macro_f1"] == pytest.approx(
        f1_score(truths, mapped, labels=labels, average="macro", zero_division=0)
    )
    p, r, f, s = precision_recall_fscore_support(truths, mapped, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        assert report["per_label"][label] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}
        )
    matrix = confusion_matrix(truths, mapped, labels=[*labels, "<off-format>"])[:2].tolist()
    assert report["confusion_matrix"]["rows"] == matrix
    assert report["off_format"] == sum(m == "<off-format>" for m in mapped)
    exact = next(r for r in base_run.per_testing_criteria_results if r.testing_criteria.startswith("exact-"))
    assert report["accuracy"] == pytest.approx(exact.passed / len(outputs))  # accuracy is the eq pass rate


def test_runs_list_with_status_filter(client, sentiment_eval, base_run):
    runs = list(client.evals.runs.list(sentiment_eval.id))
    assert base_run.id in [r.id for r in runs]
    assert base_run.id in [r.id for r in client.evals.runs.list(sentiment_eval.id, status="completed")]
    assert base_run.id not in [r.id for r in client.evals.runs.list(sentiment_eval.id, status="failed")]


def jsonl_eval(client, criteria: list[dict]):
    return client.evals.create(
        name="graders",
        data_source_config={
            "type": "custom",
            "item_schema": {"type": "object", "properties": {"ref": {"type": "string"}}, "required": ["ref"]},
            "include_sample_schema": True,
        },
        testing_criteria=criteria,
    )


def test_every_string_check_and_similarity_metric_on_a_jsonl_run(client):
    from tunelab.evals.graders import similarity

    rows = [
        ("the cat sat on the mat", "the cat sat on the mat"),
        ("The Cat sat", "the cat sat on the mat"),
        ("dogs bark loudly", "the cat sat on the mat"),
    ]
    checks = [
        {
            "type": "string_check",
            "name": op,
            "input": "{{sample.output_text}}",
            "reference": "{{item.ref}}",
            "operation": op,
        }
        for op in ("eq", "ne", "like", "ilike")
    ]
    checks[2]["reference"] = checks[3]["reference"] = "cat"
    metrics = [
        "fuzzy_match",
        "bleu",
        "gleu",
        "meteor",
        "rouge_1",
        "rouge_2",
        "rouge_3",
        "rouge_4",
        "rouge_5",
        "rouge_l",
    ]
    sims = [
        {
            "type": "text_similarity",
            "name": m,
            "input": "{{sample.output_text}}",
            "reference": "{{item.ref}}",
            "evaluation_metric": m,
            "pass_threshold": 0.5,
        }
        for m in metrics
    ]
    ev = jsonl_eval(client, checks + sims)
    content = [{"item": {"ref": ref}, "sample": {"output_text": out}} for out, ref in rows]
    run = client.evals.runs.create(
        ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": content}}
    )
    run = wait_run(client, ev.id, run.id)
    assert run.status == "completed", run.error and run.per_model_usage == []
    outputs = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id))
    expected_checks = {
        "eq": [True, False, False],
        "ne": [False, True, True],
        "like": [True, False, False],  # "cat" in "The Cat sat"? no: case-sensitive
        "ilike": [True, True, False],
    }
    for o in outputs:
        out, ref = rows[o.datasource_item_id]
        by_name = {r.name.rsplit("-", 5)[0]: r for r in o.results}
        for op, want in expected_checks.items():
            assert by_name[op].passed is want[o.datasource_item_id], (op, out)
        for m in metrics:
            score = similarity(m, out, ref)
            assert by_name[m].score == pytest.approx(score) and by_name[m].passed == (score >= 0.5)
        assert o.sample.output[0].content == out and o.sample.usage.total_tokens == 0


def test_label_and_score_model_graders_with_a_tunelab_judge(client):
    judge = [
        {"role": "developer", "content": "Is the answer correct for the reference? Reference: {{item.ref}}"},
        {"role": "user", "content": "Answer: {{sample.output_text}}"},
    ]
    ev = jsonl_eval(
        client,
        [
            {
                "type": "label_model",
                "name": "judge",
                "model": BASE_MODEL,
                "input": judge,
                "labels": ["correct", "incorrect"],
                "passing_labels": ["correct"],
            },
            {
                "type": "score_model",
                "name": "score",
                "model": BASE_MODEL,
                "input": judge,
                "range": [0, 10],
                "pass_threshold": 5,
            },
        ],
    )
    content = [{"item": {"ref": "Paris"}, "sample": {"output_text": a}} for a in ("Paris", "London", "Paris, France")]
    run = wait_run(
        client,
        ev.id,
        client.evals.runs.create(
            ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": content}}
        ).id,
    )
    assert run.status == "completed", run.error
    usage = {u.model_name: u for u in run.per_model_usage}
    assert usage[BASE_MODEL].invocation_count == 2 * len(content)  # each grader asked the judge once per item
    for o in client.evals.runs.output_items.list(run.id, eval_id=ev.id):
        label, score = o.results
        assert label.type == "label_model" and score.type == "score_model"
        assert label.sample["model"] == BASE_MODEL and label.sample["output"][0]["content"]
        if "error" in (label.model_extra or {}):
            assert not label.passed and label.score == 0
        else:
            assert label.model_extra["label"] in ("correct", "incorrect")
            assert label.passed == (label.model_extra["label"] == "correct") and label.score == float(label.passed)
        assert 0 <= score.score <= 10 and score.passed == (
            score.score >= 5 and "error" not in (score.model_extra or {})
        )


def test_cancel_stops_a_run_and_the_worker_goes_on(client, server, sentiment_eval):
    many = REVIEWS * 20
    run = client.evals.runs.create(
        sentiment_eval.id, data_source=completions(BASE_MODEL, many, max_completion_tokens=16)
    )
    deadline = time.time() + 300
    while client.evals.runs.retrieve(run.id, eval_id=sentiment_eval.id).result_counts.total == 0:
        assert time.time() < deadline
        time.sleep(0.3)
    in_progress = client.evals.runs.retrieve(run.id, eval_id=sentiment_eval.id)
    assert in_progress.status == "in_progress" and 0 < in_progress.result_counts.total < len(many)  # counts so far
    canceled = client.evals.runs.cancel(run.id, eval_id=sentiment_eval.id)
    assert canceled.status == "canceled"
    time.sleep(3)
    after = client.evals.runs.retrieve(run.id, eval_id=sentiment_eval.id)
    assert after.status == "canceled" and after.result_counts.total < len(many)
    with pytest.raises(openai.BadRequestError):
        client.evals.runs.cancel(run.id, eval_id=sentiment_eval.id)
    # OpenAI's reference spelling, POST /evals/{e}/runs/{r}, cancels too
    queued = client.evals.runs.create(sentiment_eval.id, data_source=completions(BASE_MODEL, REVIEWS[:2]))
    r = requests.post(f"{server.url}/v1/evals/{sentiment_eval.id}/runs/{queued.id}", headers={"api-key": server.key})
    assert r.status_code in (200, 400) and client.evals.runs.retrieve(queued.id, eval_id=sentiment_eval.id).status in (
        "canceled",
        "completed",
    )
    nxt = client.evals.runs.create(sentiment_eval.id, data_source=completions(BASE_MODEL, REVIEWS[:2]))
    assert wait_run(client, sentiment_eval.id, nxt.id).status == "completed"


def test_delete_run(client, sentiment_eval):
    run = client.evals.runs.create(sentiment_eval.id, data_source=completions(BASE_MODEL, REVIEWS[:2]))
    gone = client.evals.runs.delete(run.id, eval_id=sentiment_eval.id)
    assert gone.deleted and gone.run_id == run.id
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(run.id, eval_id=sentiment_eval.id)
    with pytest.raises(openai.NotFoundError):
        list(client.evals.runs.output_items.list(run.id, eval_id=sentiment_eval.id))


# -- bad input -------------------------------------------------------------------------------------
def bad(call) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value.body


@pytest.mark.parametrize(
    ("criterion", "param", "words"),
    [
        ({**EXACT, "input": "{{ output_text }}"}, "testing_criteria[0].input", "unknown template variable"),
        ({**EXACT, "reference": "{{item.lable}}"}, "testing_criteria[0].reference", "has no field 'lable'"),
        ({**EXACT, "input": "{{sample.text}}"}, "testing_criteria[0].input", "unknown template variable"),
        (
            {
                "type": "label_model",
                "name": "j",
                "model": "ft:nope",
                "input": [{"role": "user", "content": "x"}],
                "labels": ["a"],
                "passing_labels": ["a"],
            },
            "testing_criteria[0].model",
            "does not exist",
        ),
        (
            {"type": "python", "name": "py", "source": "def grade(s, i): return 1"},
            "testing_criteria[0].type",
            "user code",
        ),
        (
            {
                "type": "text_similarity",
                "name": "c",
                "input": "{{sample.output_text}}",
                "reference": "{{item.label}}",
                "evaluation_metric": "cosine",
                "pass_threshold": 0.5,
            },
            "testing_criteria[0].evaluation_metric",
            "embeddings",
        ),
        ({**EXACT, "operation": "regex"}, "testing_criteria.0.string_check.operation", ""),
    ],
)
def test_bad_eval_is_400_naming_the_field(client, criterion, param, words):
    body = bad(
        lambda: client.evals.create(
            data_source_config={"type": "custom", "item_schema": SCHEMA}, testing_criteria=[criterion]
        )
    )
    assert body["param"] == param, body
    assert words in body["message"]


def test_bad_runs_are_400_naming_the_field_and_harm_nothing(client, sentiment_eval, base_run):
    eid = sentiment_eval.id
    body = bad(lambda: client.evals.runs.create(eid, data_source=completions("ft:no-such-model")))
    assert body["param"] == "data_source.model" and body["code"] == "model_not_found"
    ds = completions(BASE_MODEL)
    ds["input_messages"]["template"][1]["content"] = "{{item.body}}"
    body = bad(lambda: client.evals.runs.create(eid, data_source=ds))
    assert body["param"] == "data_source.input_messages.template[1].content" and "no field 'body'" in body["message"]
    ds = completions(BASE_MODEL)
    ds["input_messages"]["template"][1]["content"] = "{{sample.output_text}}"
    assert "nothing is sampled" in bad(lambda: client.evals.runs.create(eid, data_source=ds))["message"]
    wrong = [("fine", "positive"), ("meh", "neutral")]
    body = bad(lambda: client.evals.runs.create(eid, data_source=completions(BASE_MODEL, wrong)))
    assert body["param"] == "data_source.source.content[1].item.label" and "neutral" in body["message"]
    missing = completions(BASE_MODEL)
    del missing["source"]["content"][2]["item"]["label"]
    body = bad(lambda: client.evals.runs.create(eid, data_source=missing))
    assert body["param"] == "data_source.source.content[2].item" and "'label' is a required property" in body["message"]

    not_jsonl = client.files.create(file=("notes.jsonl", io.BytesIO(b'{"item": {}}\nnot json\n')), purpose="evals")
    body = bad(
        lambda: client.evals.runs.create(
            eid, data_source={**completions(BASE_MODEL), "source": {"type": "file_id", "id": not_jsonl.id}}
        )
    )
    assert body["param"] == "data_source.source.id" and "line 2" in body["message"]
    lines = "\n".join(json.dumps(r) for r in [*items(), {"item": {"text": "x", "label": 3}}]).encode()
    bad_item = client.files.create(file=("items.jsonl", io.BytesIO(lines)), purpose="evals")
    body = bad(
        lambda: client.evals.runs.create(
            eid, data_source={**completions(BASE_MODEL), "source": {"type": "file_id", "id": bad_item.id}}
        )
    )
    assert (
        body["param"] == f"data_source.source[{len(REVIEWS)}].item.label" and f"Item {len(REVIEWS)}" in body["message"]
    )
    assert (
        bad(
            lambda: client.evals.runs.create(
                eid, data_source={**completions(BASE_MODEL), "source": {"type": "file_id", "id": "file-nope"}}
            )
        )["code"]
        == "file_not_found"
    )

    # nothing else was touched: the eval and its earlier run are as they were
    assert client.evals.retrieve(eid).testing_criteria[0].id == sentiment_eval.testing_criteria[0].id
    again = client.evals.runs.retrieve(base_run.id, eval_id=eid)
    assert again.status == "completed" and again.result_counts == base_run.result_counts


def test_a_good_file_id_run(client, sentiment_eval):
    lines = "\n".join(json.dumps(r) for r in items(REVIEWS[:3])).encode()
    f = client.files.create(file=("items.jsonl", io.BytesIO(lines)), purpose="evals")
    ds = {**completions(BASE_MODEL), "source": {"type": "file_id", "id": f.id}}
    run = wait_run(client, sentiment_eval.id, client.evals.runs.create(sentiment_eval.id, data_source=ds).id)
    assert run.status == "completed" and run.result_counts.total == 3
    outputs = list(client.evals.runs.output_items.list(run.id, eval_id=sentiment_eval.id))
    assert [o.datasource_item["text"] for o in outputs] == [t for t, _ in REVIEWS[:3]]


def test_unknown_eval_and_run_are_404(client, sentiment_eval):
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve("eval_nope")
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve("evalrun_nope", eval_id=sentiment_eval.id)
