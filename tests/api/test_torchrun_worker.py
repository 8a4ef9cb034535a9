"""A worker that torchrun starts on two "machines" (two torchrun agents meeting by c10d rendezvous).

Both agents run on this host, but they meet as two machines would: each is one node of
``--nnodes 2``, found through the rendezvous endpoint, and each starts its own rank. Rank 0 is the
worker that claims the job; the job, a full fine-tuning sharded over both ranks with FSDP, has the
one-process losses, and its model and checkpoint deploy and answer; a stop signal to both agents
ends every rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.test_distributed_jobs import ENV, TRAINING, check_losses_and_deploy
from tests.server import _env, free_port, start_server_with_model, stop_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def agent(data_dir: Path, endpoint: str, log: Path) -> subprocess.Popen:
    """One machine's torchrun agent: one rank of `tunelab worker`, node rank from the rendezvous."""
    cmd = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", endpoint, "--rdzv-id", "tunelab-test", "--max-restarts", "0",
           "-m", "tunelab", "worker", "--data-dir", str(data_dir)]  # fmt: skip
    env = _env({k: v for k, v in ENV.items() if k != "TUNELAB_TRAIN_PROCS"} | {"TUNELAB_TRAIN_SHARDING": "fsdp"})
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def workers_of(data_dir: Path) -> list[int]:
    """The live processes of `tunelab worker --data-dir data_dir`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in args and str(data_dir).encode() in args:
            found.append(int(cmdline.parent.name))
    return found


def test_an_fsdp_job_trains_on_the_ranks_of_two_torchrun_nodes_and_deploys(tmp_path_factory, tiny_dir, tmp_path):
    data = tmp_path_factory.mktemp("torchrun") / "data"
    server = start_server_with_model(data, tiny_dir, "tiny", env=ENV, worker=False)
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [agent(data, endpoint, tmp_path / f"node{i}.log") for i in range(2)]
    try:
        with TRAINING.open("rb") as f:
            training_file = server.openai().files.create(file=f, purpose="fine-tune").id
        full = {"lora_rank": 0}  # what FSDP is for: every weight trained, and sharded
        check_losses_and_deploy(server, training_file, tiny_dir, tmp_path, "on 2 processes (FSDP)", full)

        for proc in agents:  # what systemd or Ctrl-C does to each machine's agent
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in agents:
            assert proc.wait(timeout=60) is not None
        assert not workers_of(data)  # no rank left behind on either "machine"
    finally:
        for proc in agents:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        stop_server(server)
