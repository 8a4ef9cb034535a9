"""The recipe end to end on a tiny random llama (fast): outputs, metrics, seeds, methods, cancel."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.data.tokenize import tokenize_chat
from tunelab.training import recipe as recipe_module
from tunelab.training.hooks import Stop
from tunelab.training.hparams import JobSpec
from tunelab.training.recipe import Cancelled, Paused, TrainingError, TrainSpec, train

from .conftest import CHATS, RecordingHooks, chat, write_jsonl

HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier", "lora_rank", "lora_alpha", "lora_dropout")


def spec(model_dir: Path, files: tuple[Path, Path | None], out: Path, **overrides) -> TrainSpec:
    """A TrainSpec; hyperparameter names among ``overrides`` go into its JobSpec."""
    values = dict(seed=7, n_epochs=2, batch_size=2) | overrides
    hp = JobSpec(**{k: values.pop(k) for k in HYPERPARAMETERS if k in values})
    return TrainSpec(
        base_model_dir=model_dir,
        training_file=files[0],
        validation_file=files[1],
        output_dir=out,
        hyperparameters=hp,
        **values,
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_lora_run_writes_results_checkpoints_and_an_adapter(tiny_dir, chat_files, tmp_path):
    hooks = RecordingHooks()
    result = train(spec(tiny_dir, chat_files, tmp_path / "job", n_epochs=3), hooks)

    # 5 examples, batch 2 -> 3 steps per epoch
    rows = read_csv(result.results_csv)
    assert list(rows[0]) == [
        "step",
        "train_loss",
        "train_mean_token_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
        "full_valid_loss",
        "full_valid_mean_token_accuracy",
    ]
    assert [int(r["step"]) for r in rows] == list(range(1, 10))
    assert all(r["train_loss"] and r["train_mean_token_accuracy"] for r in rows)
    assert [bool(r["full_valid_loss"]) for r in rows] == [False, False, True] * 3  # each epoch end
    assert any(r["valid_loss"] for r in rows)

    metrics = hooks.metrics()
    assert [m["step"] for m in metrics] == list(range(1, 10)) and metrics[0]["total_steps"] == 9
    assert {"train_loss", "train_mean_token_accuracy"} <= set(metrics[0])
    first = next(e for e in hooks.events if e["type"] == "metrics")
    assert first["message"].startswith("Step 1/9: training loss=")

    assert [(c.step, c.epoch) for c in hooks.checkpoints] == [(3, 1), (6, 2), (9, 3)]
    assert hooks.checkpoints[-1].metrics["full_valid_loss"] > 0
    for folder in [c.path for c in result.checkpoints] + [result.final_dir]:
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tunelab.json"} <= {
            p.name for p in folder.iterdir()
        }
        assert json.loads((folder / "tunelab.json").read_text())["method"] == "lora"
    assert result.final_dir == tmp_path / "job" / "final"
    assert isinstance(result.ends_with_eos, bool)
    assert any("Smoke test" in e["message"] for e in hooks.events)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft 0.21
def test_lora_changes_adapters_only(tiny_dir, chat_files, tmp_path):
    base_before = load_file(tiny_dir / "model.safetensors")
    result = train(spec(tiny_dir, chat_files, tmp_path / "job"), RecordingHooks())

    adapter = load_file(result.final_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)  # nothing of the base is saved
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # PEFT initialises B to zero
    base_after = load_file(tiny_dir / "model.safetensors")
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)

    # the saved adapter changes the model's outputs
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 2, 3, 4]])
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, result.final_dir)
    assert not torch.allclose(before, tuned(ids).logits)


def test_full_fine_tuning_changes_the_base_weights(tiny_dir, chat_files, tmp_path):
    hooks = RecordingHooks()
    result = train(spec(tiny_dir, chat_files, tmp_path / "job", lora_rank=0), hooks)

    assert result.hyperparameters.method == "full" and result.hyperparameters.learning_rate == 2e-5
    assert "lora_rank" not in result.hyperparameters.as_dict()
    files = {p.name for p in result.final_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tunelab.json"} <= files
    before, after = load_file(tiny_dir / "model.safetensors"), load_file(result.final_dir / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.norm.weight" in changed


def test_same_seed_gives_bitwise_identical_losses(tiny_dir, chat_files, tmp_path):
    runs = []
    for name in ("a", "b"):
        result = train(spec(tiny_dir, chat_files, tmp_path / name, lora_dropout=0.1), RecordingHooks())
        runs.append(read_csv(result.results_csv))
    assert runs[0] == runs[1]  # the CSV holds full-precision reprs of the float losses
    other = train(spec(tiny_dir, chat_files, tmp_path / "c", lora_dropout=0.1, seed=8), RecordingHooks())
    assert read_csv(other.results_csv) != runs[0]


def test_auto_hyperparameters_are_resolved(tiny_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in CHATS] * 2)  # 12 examples
    result = train(
        spec(
            tiny_dir,
            (train_file, None),
            tmp_path / "job",
            n_epochs="auto",
            batch_size="auto",
            learning_rate_multiplier="auto",
        ),
        RecordingHooks(),
    )

    hp = result.hyperparameters.as_dict()
    assert hp["n_epochs"] == 8  # 100 // 12: about 100 examples seen (tunelab.data.stats.auto_n_epochs)
    assert hp["batch_size"] == 2  # 12 // 5: at least 5 steps per epoch
    assert hp["learning_rate_multiplier"] == 1.0 and hp["learning_rate"] == 2e-4
    assert hp["method"] == "lora" and hp["lora_rank"] == 16 and hp["lora_alpha"] == 32
    assert set(hp["lora_target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert len(read_csv(result.results_csv)) == 8 * 6
    # no validation file: no valid columns
    assert list(read_csv(result.results_csv)[0]) == ["step", "train_loss", "train_mean_token_accuracy"]


def test_trained_tokens_count_assistant_tokens_times_epochs(tiny_dir, chat_files, tokenizer, tmp_path):
    result = train(spec(tiny_dir, chat_files, tmp_path / "job", n_epochs=3), RecordingHooks())
    per_epoch = sum(tokenize_chat(tokenizer, chat(q, a)["messages"]).n_trained for q, a in CHATS[:5])
    assert result.trained_tokens == 3 * per_epoch


def test_checkpoints_rotate_and_deletions_are_reported(tiny_dir, chat_files, tmp_path):
    hooks = RecordingHooks()
    result = train(spec(tiny_dir, chat_files, tmp_path / "job", n_epochs=5, batch_size=5), hooks)

    assert [c.step for c in hooks.checkpoints] == [1, 2, 3, 4, 5]
    assert [c.step for c in hooks.deleted] == [1, 2]
    assert [c.step for c in result.checkpoints] == [3, 4, 5]
    on_disk = sorted(p.name for p in (tmp_path / "job" / "checkpoints").iterdir())
    assert on_disk == ["step-3", "step-4", "step-5"]


def test_should_stop_cancels_mid_epoch(tiny_dir, chat_files, tmp_path):
    hooks = RecordingHooks(stop_after=2)
    with pytest.raises(Cancelled):
        train(spec(tiny_dir, chat_files, tmp_path / "job", n_epochs=3), hooks)
    assert [m["step"] for m in hooks.metrics()] == [1, 2]  # 3 steps per epoch: stopped inside epoch 1
    assert hooks.checkpoints == [] and not (tmp_path / "job" / "final").exists()


@pytest.mark.parametrize("method", [{"lora_dropout": 0.1}, {"lora_rank": 0}], ids=["lora", "full"])
def test_pause_then_resume_gives_the_run_that_never_paused(tiny_dir, chat_files, tmp_path, method):
    straight = train(spec(tiny_dir, chat_files, tmp_path / "a", n_epochs=3, **method), RecordingHooks())

    pausing = RecordingHooks(stop_after=4, stop_with=Stop.PAUSE)  # 3 steps per epoch: inside epoch 2
    with pytest.raises(Paused) as paused:
        train(spec(tiny_dir, chat_files, tmp_path / "b", n_epochs=3, **method), pausing)
    assert paused.value.step == 4 and [c.step for c in pausing.checkpoints] == [3]
    assert (tmp_path / "b" / "resume.pt").is_file()

    resuming = RecordingHooks()
    resumed = train(spec(tiny_dir, chat_files, tmp_path / "b", n_epochs=3, **method), resuming)
    assert any(e["message"].startswith("Training resumed at step 5:") for e in resuming.events)
    assert [m["step"] for m in resuming.metrics()] == [5, 6, 7, 8, 9]
    assert [c.step for c in resuming.checkpoints] == [6, 9]
    assert read_csv(resumed.results_csv) == read_csv(straight.results_csv)  # bitwise, every column
    assert resumed.trained_tokens == straight.trained_tokens
    weights = "adapter_model.safetensors" if "lora_dropout" in method else "model.safetensors"
    a, b = load_file(straight.final_dir / weights), load_file(resumed.final_dir / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "b" / "resume.pt").exists()


def test_a_paused_state_is_not_resumed_with_other_hyperparameters(tiny_dir, chat_files, tmp_path):
    with pytest.raises(Paused):
        train(
            spec(tiny_dir, chat_files, tmp_path / "job", n_epochs=3), RecordingHooks(stop_after=2, stop_with=Stop.PAUSE)
        )
    with pytest.raises(TrainingError, match="cannot resume.*other hyperparameters"):
        train(spec(tiny_dir, chat_files, tmp_path / "job", n_epochs=3, batch_size=1), RecordingHooks())


def test_step_metrics_carry_the_learning_rate_and_throughput(tiny_dir, chat_files, tmp_path):
    hooks = RecordingHooks()
    result = train(spec(tiny_dir, chat_files, tmp_path / "job", n_epochs=3), hooks)
    metrics = hooks.metrics()
    rates = [m["learning_rate"] for m in metrics]
    lr = result.hyperparameters.learning_rate
    # one warmup step from 0 (3% of 9 steps, rounded up), then linear decay
    assert rates[0] == 0.0 and rates[1] == pytest.approx(lr) and rates[1:] == sorted(rates[1:], reverse=True)
    assert all(m["tokens_per_second"] > 0 for m in metrics)
    assert "learning_rate" not in read_csv(result.results_csv)[0]  # results.csv keeps OpenAI's columns
    assert "learning_rate" not in hooks.checkpoints[0].metrics


def test_continuing_a_lora_model_starts_from_its_adapter(tiny_dir, chat_files, tmp_path):
    first = train(spec(tiny_dir, chat_files, tmp_path / "first", lora_rank=4, lora_alpha=8), RecordingHooks())
    # A learning rate too small to move anything: the result is the adapter it started from.
    more = train(
        spec(
            tiny_dir,
            chat_files,
            tmp_path / "more",
            n_epochs=1,
            learning_rate_multiplier=1e-9,
            init_adapter=first.final_dir,
        ),
        RecordingHooks(),
    )
    assert more.hyperparameters.lora_rank == 4 and more.hyperparameters.lora_alpha == 8  # the adapter's own
    a = load_file(first.final_dir / "adapter_model.safetensors")
    b = load_file(more.final_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    fresh = train(
        spec(
            tiny_dir,
            chat_files,
            tmp_path / "fresh",
            n_epochs=1,
            learning_rate_multiplier=1e-9,
            lora_rank=4,
            lora_alpha=8,
        ),
        RecordingHooks(),
    )
    c = load_file(fresh.final_dir / "adapter_model.safetensors")
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)  # the check above can fail


def test_a_step_split_into_several_rows_has_the_same_loss(tiny_dir, chat_files, tmp_path, monkeypatch):
    # The loss is the mean over the step's trained tokens, however the step is split into rows.
    one_row = train(spec(tiny_dir, chat_files, tmp_path / "a", batch_size=5, n_epochs=2), RecordingHooks())
    monkeypatch.setattr(recipe_module, "MAX_ROW_TOKENS", 1)  # one example per row
    many_rows = train(spec(tiny_dir, chat_files, tmp_path / "b", batch_size=5, n_epochs=2), RecordingHooks())
    for a, b in zip(read_csv(one_row.results_csv), read_csv(many_rows.results_csv), strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), abs=1e-4)
        assert a["train_mean_token_accuracy"] == b["train_mean_token_accuracy"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_epochs": 0}, "n_epochs"),
        ({"batch_size": "big"}, "batch_size"),
        ({"learning_rate_multiplier": -1.0}, "learning_rate_multiplier"),
        ({"lora_rank": -2}, "lora_rank"),
        ({"keep_checkpoints": 0}, "keep_checkpoints"),
        ({"lora_target_modules": ["no_such_proj"]}, "lora_target_modules"),
        ({"device": "tpu"}, "device"),
        ({"cpu_threads": 0}, "cpu_threads"),
    ],
)
def test_bad_options_are_training_errors_that_name_the_field(tiny_dir, chat_files, tmp_path, overrides, field):
    with pytest.raises(TrainingError, match=field):
        train(spec(tiny_dir, chat_files, tmp_path / "job", **overrides), RecordingHooks())


def test_a_file_with_nothing_to_train_is_an_error(tiny_dir, tmp_path):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 0}]
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"messages": messages}])
    with pytest.raises(TrainingError, match="no example"):
        train(spec(tiny_dir, (train_file, None), tmp_path / "job"), RecordingHooks())


def test_out_of_memory_becomes_an_actionable_training_error(tiny_dir, chat_files, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(recipe_module, "_train_step", oom)
    with pytest.raises(TrainingError, match=r"out of GPU memory .*batch_size=2.*lower batch_size.*max_length.*LoRA"):
        train(spec(tiny_dir, chat_files, tmp_path / "job", lora_rank=0), RecordingHooks())


@pytest.mark.parametrize("lora_rank", [16, 0], ids=["lora", "full"])
def test_out_of_memory_turns_on_activation_checkpointing_once(tiny_dir, chat_files, tmp_path, monkeypatch, lora_rank):
    # A device that only fits the step with activation checkpointing on.
    real = recipe_module._train_step

    def fits_only_when_checkpointing(model, *args):
        if not recipe_module._checkpointing(model):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, *args)

    plain = train(spec(tiny_dir, chat_files, tmp_path / "plain", lora_rank=lora_rank), RecordingHooks())
    monkeypatch.setattr(recipe_module, "_train_step", fits_only_when_checkpointing)
    hooks = RecordingHooks()
    result = train(spec(tiny_dir, chat_files, tmp_path / "job", lora_rank=lora_rank), hooks)
    warnings = [e["message"] for e in hooks.events if e["level"] == "warn" and "memory" in e["message"]]
    assert warnings == [
        "Out of memory at step 1: training goes on with activation checkpointing (slower, much less memory)"
    ]
    # recomputing activations gives the same numbers
    for a, b in zip(read_csv(plain.results_csv), read_csv(result.results_csv), strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-5)


def test_valid_sample_numbers_from_the_full_pass_match_a_pass_of_their_own(tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    valid_set = [tokenize_chat(tokenizer, chat(q, a)["messages"]) for q, a in CHATS]
    sample, cpu = [1, 4], torch.device("cpu")
    both = recipe_module._validate(model, valid_set, sample, cpu, full=True, sample_due=True)
    alone = recipe_module._validate(model, valid_set, sample, cpu, full=False, sample_due=True)
    full_only = recipe_module._validate(model, valid_set, sample, cpu, full=True, sample_due=False)
    assert set(both) == set(alone) | set(full_only) and set(alone) == {"valid_loss", "valid_mean_token_accuracy"}
    assert both["valid_loss"] == pytest.approx(alone["valid_loss"], abs=1e-5)
    assert both["valid_mean_token_accuracy"] == alone["valid_mean_token_accuracy"]
    assert both["full_valid_loss"] == full_only["full_valid_loss"]
