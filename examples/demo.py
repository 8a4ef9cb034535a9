"""`make demo`: the fine-tuning lab end to end against a fresh tunelab server, on the bundled model.

Token report → upload → job (seed 105) with live progress → deploy (Azure management API) →
one chat exchange → clean up. Uses only tunelab's own sample data and the stock openai SDK.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import requests
from openai import AzureOpenAI

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / ".tunelab" / "demo"
SAMPLES = files("tunelab") / "samples"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY = "demo-key"


def step(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    shutil.rmtree(DATA_DIR, ignore_errors=True)
    DATA_DIR.mkdir(parents=True)
    log = (DATA_DIR.parent / "demo-server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "serve", "--port", str(port), "--data-dir", str(DATA_DIR)],
        env={**os.environ, "TUNELAB_API_KEY": KEY, "TUNELAB_SERVING_ENGINE": "builtin"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not start; see {log.name}")


def main() -> None:
    started = time.time()
    train_path, valid_path = SAMPLES / "training_set.jsonl", SAMPLES / "validation_set.jsonl"

    step("1. Check the data: token counts (tiktoken cl100k_base, as the lab does)")
    subprocess.run([sys.executable, "-m", "tunelab", "data", "validate", str(train_path), str(valid_path)], check=True)

    step("2. Start tunelab (API server + embedded training worker)")
    proc, url = start_server()
    print(f"serving on {url}, data in {DATA_DIR}")
    try:
        run_lab(url, train_path, valid_path)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    print(f"\nDemo finished in {time.time() - started:.0f} s.")


def run_lab(url: str, train_path, valid_path) -> None:
    client = AzureOpenAI(azure_endpoint=url, api_key=KEY, api_version="2024-05-01-preview")

    step("3. Upload the training and validation files")
    training = client.files.create(file=train_path.open("rb"), purpose="fine-tune")
    validation = client.files.create(file=valid_path.open("rb"), purpose="fine-tune")
    print("Training file ID:", training.id, training.status)
    print("Validation file ID:", validation.id, validation.status)

    step("4. Fine-tune (LoRA on CPU; live progress from the job's events)")
    job = client.fine_tuning.jobs.create(
        training_file=training.id, validation_file=validation.id, model=BASE_MODEL, seed=105, suffix="demo"
    )
    print("Job ID:", job.id, "status:", job.status)
    seen: set[str] = set()
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        new = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.id not in seen]
        for event in reversed(new):  # the API lists newest first
            seen.add(event.id)
            print(f"  [{event.level}] {event.message}", flush=True)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1)
    print(json.dumps(json.loads(job.model_dump_json()), indent=2))
    if job.status != "succeeded":
        raise SystemExit(f"the job ended {job.status}: {job.error}")

    step("5. Deploy the fine-tuned model (Azure management API)")
    deployment = (
        f"{url}/subscriptions/demo/resourceGroups/demo/providers/Microsoft.CognitiveServices"
        f"/accounts/tunelab/deployments/demo-ft"
    )
    headers, params = {"Authorization": f"Bearer {KEY}"}, {"api-version": "2023-05-01"}
    body = {
        "sku": {"name": "standard", "capacity": 1},
        "properties": {"model": {"format": "OpenAI", "name": job.fine_tuned_model, "version": "1"}},
    }
    r = requests.put(deployment, params=params, headers=headers, json=body)
    r.raise_for_status()
    while r.json()["properties"]["provisioningState"] == "Creating":
        time.sleep(0.5)
        r = requests.get(deployment, params=params, headers=headers)
    print("provisioningState:", r.json()["properties"]["provisioningState"])

    step("6. Chat with the fine-tuned model")
    chat = AzureOpenAI(azure_endpoint=url, api_key=KEY, api_version="2024-02-01")
    messages = [
        {"role": "system", "content": "Marv is a factual chatbot that is also a little sarcastic."},
        {"role": "user", "content": "What is the capital of Portugal?"},
    ]
    answer = chat.chat.completions.create(model="demo-ft", messages=messages, temperature=0, max_tokens=80)
    print("user:     ", messages[-1]["content"])
    print("assistant:", answer.choices[0].message.content)

    step("7. Clean up: delete the deployment")
    print("delete deployment:", requests.delete(deployment, params=params, headers=headers).status_code)


if __name__ == "__main__":
    main()
