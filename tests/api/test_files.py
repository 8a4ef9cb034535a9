"""Files: upload, list with pagination, retrieve, content, delete, validation on upload."""

import json

import openai
import pytest
import requests

from tests.conftest import BASE_MODEL, SAMPLES
from tests.server import start_server, stop_server

pytestmark = pytest.mark.integration


def test_upload_retrieve_content_delete(client):
    data = (SAMPLES / "training_set.jsonl").read_bytes()
    f = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert f.status == "processed" and f.bytes == len(data) and f.filename == "train.jsonl"
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).read() == data
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_list_paginates_until_has_more_is_false(client):
    ids = {client.files.create(file=(f"n{i}.txt", b"x"), purpose="assistants").id for i in range(3)}
    seen = [f.id for f in client.files.list(limit=1, purpose="assistants")]  # SDK auto-paging
    assert ids <= set(seen) and len(seen) == len(set(seen))
    page = client.files.list(limit=2, order="asc", purpose="assistants")
    assert page.has_more is True and len(page.data) == 2


def test_bad_purpose_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("a.jsonl", b"{}"), purpose="nonsense")
    assert err.value.body["param"] == "purpose"


def test_malformed_jsonl_names_the_line_and_keeps_everything_else(client, uploaded_lab_files):
    before = {f.id for f in client.files.list()}
    lines = (SAMPLES / "training_set.jsonl").read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "unterminated'
    bad = client.files.create(file=("bad.jsonl", "\n".join(lines).encode()), purpose="fine-tune")
    assert bad.status == "error"
    assert "line 3" in bad.status_details
    report = requests.get(f"{client.base_url}files/{bad.id}/validation", headers={"api-key": client.api_key}).json()
    assert report["valid"] is False and report["errors"][0]["line"] == 3

    job = client.fine_tuning.jobs.create(model=BASE_MODEL, training_file=bad.id)
    assert job.status == "failed"
    assert job.error.param == "training_file" and "line 3" in job.error.message
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
    assert any("line 3" in m for m in messages)

    # Nothing else was touched: every earlier file is still there and readable.
    after = {f.id for f in client.files.list()}
    assert before <= after
    for file_id in uploaded_lab_files:
        assert client.files.retrieve(file_id).status == "processed"


def test_upload_over_the_limit_is_413_and_leaves_nothing(tmp_path):
    srv = start_server(tmp_path / "small", worker=False, env={"TUNELAB_MAX_UPLOAD_BYTES": "1000"})
    try:
        client = srv.openai()
        with pytest.raises(openai.APIStatusError) as err:
            client.files.create(file=("big.jsonl", json.dumps({"x": "y" * 5000}).encode()), purpose="fine-tune")
        assert err.value.status_code == 413
        assert client.files.list().data == []
        assert [p.name for p in (srv.data_dir / "files").iterdir()] == []
    finally:
        stop_server(srv)


def test_validation_with_a_model_counts_with_its_tokenizer_and_context(client, uploaded_lab_files):
    headers = {"api-key": client.api_key}
    url = f"{client.base_url}files/{uploaded_lab_files[0]}/validation"
    stored = requests.get(url, headers=headers).json()
    assert "model" not in stored["tokens"] and stored["max_tokens"] is None  # the upload's own report
    report = requests.get(url, params={"model": BASE_MODEL}, headers=headers).json()
    model = report["tokens"]["model"]
    assert report["max_tokens"] == 8192  # SmolLM2's max_position_embeddings
    assert model["truncated_examples"] == 0 and sum(model["histogram"]["counts"]) == report["examples"] == 12
    assert model["total"]["mean"] != stored["tokens"]["cl100k_base"]["total"]["mean"]  # another tokenizer
    missing = requests.get(url, params={"model": "no/such-model"}, headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_examples_are_tokenized_as_training_sees_them(client, uploaded_lab_files, tokenizer):
    from tunelab.data.tokenize import tokenize_chat

    headers = {"api-key": client.api_key}
    url = f"{client.base_url}files/{uploaded_lab_files[0]}/examples"
    first = requests.get(url, params={"model": BASE_MODEL, "limit": 2}, headers=headers).json()
    assert [e["line"] for e in first["data"]] == [1, 2] and first["has_more"] is True
    rest = requests.get(url, params={"model": BASE_MODEL, "after": 2, "limit": 100}, headers=headers).json()
    assert [e["line"] for e in rest["data"]] == list(range(3, 13)) and rest["has_more"] is False

    # The same tokens, and the same trained ones, as the trainer's tokenize_chat.
    example = json.loads((SAMPLES / "training_set.jsonl").read_text().splitlines()[0])
    tokenized = tokenize_chat(tokenizer, example["messages"])
    shown = first["data"][0]
    assert shown["n_tokens"] == len(tokenized) and shown["n_trained"] == tokenized.n_trained
    trained_text = "".join(text for text, trained in shown["tokens"] if trained)
    assert trained_text.startswith(example["messages"][-1]["content"]) and trained_text.endswith("<|im_end|>")
