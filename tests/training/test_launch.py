"""How a job is laid out over processes: how many by default, and which collective backend."""

from __future__ import annotations

import pytest
import torch

from tunelab.training.distributed import backend, default_procs


def test_a_cpu_job_runs_on_one_process_over_gloo():
    assert not torch.cuda.is_available()  # this test's machine; the GPU cases below pretend
    assert default_procs("auto") == default_procs("cpu") == 1
    assert backend("auto") == backend("cpu") == "gloo"


@pytest.fixture
def four_gpus(monkeypatch):
    """torch as it answers on a machine with 4 visible GPUs (nothing of tunelab is replaced)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_by_default_a_job_takes_every_visible_gpu(four_gpus):
    assert default_procs("auto") == default_procs("cuda") == 4
    assert default_procs("cuda:2") == 1  # a pinned device is one process
    assert default_procs("cpu") == 1


def test_gpu_tensors_go_over_nccl_and_cpu_ones_over_gloo(four_gpus):
    assert backend("auto") == backend("cuda") == "cpu:gloo,cuda:nccl"
    assert backend("cpu") == "gloo"
