"""FSDP2 sharding of a job's model over its ranks (``TUNELAB_TRAIN_SHARDING=fsdp``).

Plain data parallelism (distributed.py) keeps a whole copy of the model, its gradients and AdamW's
two moments on every rank. FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps 1/N of each per
rank, and all-gathers one decoder layer's weights just before the layer runs, so a model that does
not fit one device trains on N of them. What that asks of the recipe:

* **Every rank runs the same forwards in the same order**, because each forward all-gathers.
  Rows are packed per rank, so one rank may have more rows in a step than another: the others
  add zero-weight passes (``recipe._extra_passes``). Validation, DPO's reference pass and the
  smoke test run on every rank; transformers' ``synced_gpus`` keeps ``generate`` in step.
* **FSDP reduce-scatters the gradients** in each backward. They are summed, not averaged
  (``set_gradient_divide_factor(1)``), because the losses are already divided by the step's count
  over all ranks. The sum is the one-process gradient, as with the plain all-reduce. (Set on every
  unit, each reduces its own gradients; with the root's alone FSDP averaged the layers' and the
  clipped steps went another way.)
* **A checkpoint or the resume state is gathered in full to the CPU** (``weights``,
  ``resume.state``). Every rank joins that collective, and rank 0 writes.

On a GPU, parameters are all-gathered in bf16 and gradients reduced in fp32
(``MixedPrecisionPolicy``); on a CPU everything stays fp32.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from tunelab.training.distributed import Group

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
"""Whole tensors on the CPU, trainable ones only (a LoRA job's frozen base is the base model's)."""


def shard(model: Any, device: torch.device, group: Group) -> None:
    """Shard ``model`` (on the CPU, as loaded) over the group's ranks and move each shard to ``device``.

    One FSDP unit per decoder layer (transformers' ``_no_split_modules``), and the root for the
    rest (embeddings, final norm, LM head; tied weights stay one parameter).
    """
    mesh = init_device_mesh(device.type, (group.world,))
    if device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's wrapper
    layers = set(getattr(base, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in layers]
    if not units:
        raise ValueError(f"{type(base).__name__} names no decoder layer class (_no_split_modules) to shard by")
    for unit in [*units, model]:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
        # per unit (each reduces its own gradients): a plain sum, which gloo can do (no PREMUL_SUM)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    # PEFT's generate calls the wrapped model's, not its own forward: gather the root's weights for it too
    register_fsdp_forward_method(model, "generate")


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights, whole, on the CPU: what a checkpoint saves. Every rank calls it (a collective).

    A tied weight is saved once, under its parameter's name (the state dict gathers each alias as
    a tensor of its own, which the saved model would then hold twice).
    """
    state = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=FULL))
    names = {name for name, _ in model.named_parameters()}  # one name per parameter
    return {name: tensor for name, tensor in state.items() if name in names}
