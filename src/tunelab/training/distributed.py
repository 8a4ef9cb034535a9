"""One job on N processes: data-parallel training with ``torch.distributed`` on one host.

The worker's own process is rank 0: it runs the recipe with the job's hooks, exactly as a
one-process job does, and starts ranks 1..N-1 (``python -m tunelab.training.distributed``), which
run the same recipe with hooks that write nothing. They meet by torch.distributed's TCP
rendezvous on this host (``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``, what ``torchrun``
sets). In the recipe (``Group``):

* each rank takes a strided share of every step's global batch (``batch_ids[rank::world]``) and
  packs it on its own, so ``batch_size`` means what it means on one process;
* the step's trained-token (DPO: pair) count is summed over the ranks before any backward, every
  rank divides its rows' losses by it, and the trainable gradients are summed once per step (one
  flat ``all_reduce``): the sum is exactly the one-process gradient, so clipping and AdamW see the
  same numbers on every rank (a rank with no example this step adds zeros);
* rank 0 asks ``should_stop`` and broadcasts the answer before each step, so every rank stops at
  the same step boundary; only rank 0 validates and writes events, metrics, checkpoints, MLflow and
  the resume state;
* with ``TUNELAB_TRAIN_SHARDING=fsdp`` the model is sharded over the ranks instead of copied
  (fsdp.py), and FSDP reduces the gradients;
* the backend is gloo on CPU, NCCL for the GPU tensors on GPUs (``backend``); rank r trains on
  ``cuda:LOCAL_RANK``;
* a rank that dies breaks the others' next collective at once (its sockets close); a rank that
  hangs breaks it after ``COLLECTIVE_TIMEOUT``. Rank 0 then fails the job and kills the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tunelab.models.folder import resolve_device
from tunelab.training.hooks import Checkpoint, StepMetrics, Stop
from tunelab.training.hparams import Hyperparameters, JobSpec

COLLECTIVE_TIMEOUT = timedelta(minutes=15)
"""How long a rank waits for the others in one collective: rank 0's validation and checkpoint
saves must fit in it; a hung rank fails the job after it."""
_STOPS = (Stop.GO_ON, Stop.PAUSE, Stop.CANCEL)
_ranks: list[subprocess.Popen] = []  # ranks 1..N-1 of the job this process leads


def rank_pids() -> list[int]:
    """The process ids of the other ranks of the job this process runs as rank 0."""
    return [p.pid for p in _ranks if p.poll() is None]


class RankFailed(Exception):
    """Another rank of the job died or stopped answering."""


@dataclass(frozen=True)
class Group:
    """This process's place in the job; one process (``world == 1``) when no group is initialised."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Group:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch_ids: list[int]) -> list[int]:
        """This rank's examples of a step's global batch."""
        return batch_ids[self.rank :: self.world]

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of ``values`` over the ranks (float64: counts stay exact)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        self._collective(dist.all_reduce, t)
        return t.tolist()

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks, in place (missing ones count as zero)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._collective(dist.all_reduce, flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
            offset += g.numel()

    def max(self, value: int) -> int:
        """The largest ``value`` of any rank."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        self._collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank (a decision every rank must take alike, e.g. to join a save)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64)
        self._collective(dist.broadcast, t, src=0)
        return bool(t.item())

    def stop(self, asked: Stop) -> Stop:
        """Rank 0's answer to ``should_stop``, on every rank."""
        if self.world == 1:
            return asked
        t = torch.tensor([_STOPS.index(asked)], dtype=torch.int64)
        self._collective(dist.broadcast, t, src=0)
        return _STOPS[int(t.item())]

    def _collective(self, collective: Any, tensor: torch.Tensor, **kwargs: Any) -> None:
        try:
            collective(tensor, **kwargs)
        except (RuntimeError, dist.DistBackendError) as e:  # gloo: "Connection reset by peer", "Timed out"
            raise RankFailed(f"a training process of this job stopped answering: {e}") from None


ONE_PROCESS = Group()
"""The group of a job that runs on one process."""


class QuietHooks:
    """The hooks of ranks 1..N-1: rank 0 reports everything; stopping comes from its broadcast."""

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        pass

    def started(self, resolved: Hyperparameters, total_steps: int) -> None:
        pass

    def step(self, metrics: StepMetrics) -> None:
        pass

    def checkpoint(self, ckpt: Checkpoint) -> None:
        pass

    def checkpoint_deleted(self, ckpt: Checkpoint) -> None:
        pass

    def should_stop(self) -> Stop:
        return Stop.GO_ON


def backend(device: str) -> str:
    """The process group's backend for a job on ``device`` (the setting): gloo on CPU; on GPUs NCCL
    for GPU tensors (gradients, FSDP's shards) and gloo for the CPU ones (counts, stop flags)."""
    return "cpu:gloo,cuda:nccl" if resolve_device(device).type == "cuda" else "gloo"


def default_procs(device: str) -> int:
    """``TUNELAB_TRAIN_PROCS`` unset: one process per visible GPU, where the device setting lets a
    job use them all ("auto", "cuda"); one process on a CPU or a pinned "cuda:N"."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 1


@contextmanager
def ranks(spec: Any, world: int) -> Iterator[None]:
    """Run the body as rank 0 of a ``world``-process job on ``spec`` (a ``recipe.TrainSpec``).

    Starts ranks 1..world-1, joins the process group and, on the way out (finished, paused,
    failed), leaves it and ends every rank still running.
    """
    port = _free_port()
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                        "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": str(spec.cpu_threads or 1)}  # fmt: skip
    payload = json.dumps(_spec_json(spec))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tunelab.training.distributed", payload],
            env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
            start_new_session=True,  # the worker's Ctrl-C reaches rank 0, which stops them all
        )
        for rank in range(1, world)
    ]
    _ranks[:] = procs
    try:
        dist.init_process_group(
            backend(spec.device),
            init_method=f"tcp://127.0.0.1:{port}",
            rank=0,
            world_size=world,
            timeout=COLLECTIVE_TIMEOUT,
        )
        try:
            yield
        finally:
            dist.destroy_process_group()
    finally:
        _end(procs)
        _ranks.clear()


def _end(procs: list[subprocess.Popen]) -> None:
    """Wait a moment for the ranks to leave by themselves (they do after the last step), then kill them."""
    deadline = time.monotonic() + 30
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spec_json(spec: Any) -> dict[str, Any]:
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(spec).items()}
    out["hyperparameters"] = spec.hyperparameters.to_json()
    return out


def _spec_of(payload: str) -> Any:
    """The ``recipe.TrainSpec`` that ``_spec_json`` wrote."""
    from tunelab.training.recipe import TrainSpec

    data = json.loads(payload)
    paths = ("base_model_dir", "training_file", "validation_file", "output_dir", "init_adapter")
    for key in paths:
        if data.get(key) is not None:
            data[key] = Path(data[key])
    data["hyperparameters"] = JobSpec.from_json(data["hyperparameters"])
    return TrainSpec(**data)


def _rank_main(payload: str) -> int:
    """Ranks 1..N-1: run the recipe on the spec rank 0 runs, in its process group."""
    from tunelab.training.recipe import Cancelled, Paused, train

    spec = _spec_of(payload)
    dist.init_process_group(backend(spec.device), init_method="env://", timeout=COLLECTIVE_TIMEOUT)
    try:
        train(spec, QuietHooks())
    except (Cancelled, Paused):
        pass
    finally:
        dist.destroy_process_group()
    return 0


# -- a worker on several machines: torchrun starts it on every rank ------------------------------
IDLE_TIMEOUT = timedelta(days=365)
"""How long ranks 1..N-1 of a torchrun-launched worker wait for the next job."""


def under_torchrun() -> bool:
    """This process is one rank of a group that torchrun started (its agent sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


class Crew:
    """The ranks of a worker that ``torchrun`` started, on one machine or several (its rendezvous).

    The group outlives jobs. Rank 0 is the worker: it claims jobs, announces each one's spec to
    the others (``announce``) and trains it with them, as rank 0 of ``ranks`` does; ranks 1..N-1
    ``follow``. They need the data folder and the models at the same paths (a shared file
    system), never the database.

    A job that fails may leave the ranks out of step (one of them waits in a collective the others
    have left), so rank 0 then exits with an error (``broken``) and torchrun restarts the whole
    group (``--max-restarts``); the job's state is as a killed worker leaves it.
    """

    def __init__(self, device: str) -> None:
        dist.init_process_group(backend(device), init_method="env://", timeout=COLLECTIVE_TIMEOUT)
        self.group = Group.current()
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.broken = False
        # Idle ranks wait for the next job in a group of their own, as long as it takes.
        self._announcements = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def announce(self, spec: Any | None) -> None:
        """Rank 0: the ranks train ``spec`` now; None: the worker is stopping, and so are they."""
        payload = [None if spec is None else json.dumps(_spec_json(spec))]
        dist.broadcast_object_list(payload, src=0, group=self._announcements)

    def follow(self) -> None:
        """Ranks 1..N-1: train each announced job with rank 0's group until it says stop.

        A stop signal is left to rank 0, which pauses the job at the next step with every rank
        and then announces the stop.
        """
        from tunelab.training.recipe import Cancelled, Paused, TrainingError, train

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            while True:
                payload: list[Any] = [None]
                dist.broadcast_object_list(payload, src=0, group=self._announcements)
                if payload[0] is None:
                    return
                with contextlib.suppress(Cancelled, Paused, TrainingError):  # rank 0 reports it
                    train(_spec_of(payload[0]), QuietHooks())
        finally:
            dist.destroy_process_group()

    def leave(self) -> None:
        """Rank 0, the worker stopped: the others stop too (unless the group is broken)."""
        if not self.broken:
            self.announce(None)
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1]))
