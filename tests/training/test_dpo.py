"""DPO: tunelab's loss against TRL's DPOTrainer on the same batch, and a DPO run doing what it promises."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch

from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_preference
from tunelab.training import recipe
from tunelab.training.hparams import JobSpec
from tunelab.training.recipe import TrainingError, TrainSpec, train

from .conftest import RecordingHooks, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft 0.21

PAIRS = [
    {
        "input": {"messages": [{"role": "user", "content": "What colour is the sky?"}]},
        "preferred_output": [{"role": "assistant", "content": "Blue, on a clear day."}],
        "non_preferred_output": [{"role": "assistant", "content": "Green."}],
    },
    {  # a multi-turn input: its assistant turn is context, not scored
        "input": {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"},
            ]
        },
        "preferred_output": [{"role": "assistant", "content": "6"}],
        "non_preferred_output": [{"role": "assistant", "content": "It is six, because three plus three is six."}],
    },
    {  # the older spelling of the outputs
        "input": {"messages": [{"role": "user", "content": "Say hi in French."}]},
        "preferred_completion": [{"role": "assistant", "content": "Bonjour !"}],
        "non_preferred_completion": [{"role": "assistant", "content": "Hello."}],
    },
]


def _split(example: TokenizedExample) -> tuple[list[int], list[int]]:
    """(prompt ids, scored ids): TRL's prompt/completion split of a tunelab sequence, cut after its
    last trained token (TRL would also score the template's newline after <|im_end|>)."""
    trained = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    first, last = trained[0], trained[-1]
    assert trained == list(range(first, last + 1))  # one contiguous output
    return example.input_ids[:first], example.input_ids[first : last + 1]


def test_the_loss_and_its_gradients_equal_trl_dpo_trainer_on_the_same_batch(tiny_dir, tokenizer, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from tunelab.data.formats import preference_example

    torch.manual_seed(0)
    examples = [preference_example(p)[0] for p in PAIRS]
    pairs = [tokenize_preference(tokenizer, e) for e in examples]
    beta = 0.1
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa")
    rows = [
        {"prompt": e["input"]["messages"], "chosen": e["preferred_output"], "rejected": e["non_preferred_output"]}
        for e in examples
    ]
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's, transformers' and datasets' own construction notices
        config = DPOConfig(
            output_dir=str(tmp_path / "trl"),
            per_device_train_batch_size=len(PAIRS),
            beta=beta,
            loss_type=["sigmoid"],
            max_length=None,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            dataloader_num_workers=0,
        )
        trainer = DPOTrainer(
            model=base, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, peft_config=lora
        )
    model = trainer.model  # a PeftModel; TRL's reference is the model with its adapter disabled
    for name, p in model.named_parameters():  # a trained-looking adapter, so that policy != reference
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.train()

    # tunelab: reference = the same model with its adapter disabled, then one DPO step's backward
    cpu, off = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    with model.disable_adapter():
        reference = recipe._reference_logps(model, pairs, cpu, off)
    ours, n_trained, _n_tokens = recipe._dpo_step(model, pairs, cpu, recipe._Preference(beta, reference))
    our_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    # TRL on the same token ids
    batch = []
    for pair in pairs:
        (prompt, chosen), (prompt_r, rejected) = _split(pair.chosen), _split(pair.rejected)
        assert prompt == prompt_r
        batch.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    theirs = trainer.compute_loss(model, DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(batch))
    theirs.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    assert n_trained == sum(len(_split(p.chosen)[1]) + len(_split(p.rejected)[1]) for p in pairs)
    assert ours["train_loss"] == pytest.approx(theirs.item(), abs=1e-5)
    assert ours["train_loss"] != pytest.approx(0.6931, abs=1e-3)  # not log 2: policy and reference differ
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(our_grads[name], p.grad, rtol=1e-4, atol=1e-6)
    assert ours["train_chosen_reward"] == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-5)
    assert ours["train_rejected_reward"] == pytest.approx(trl_metrics["rewards/rejected"], abs=1e-5)
    assert ours["train_reward_margin"] == pytest.approx(trl_metrics["rewards/margins"], abs=1e-5)
    assert ours["train_reward_accuracy"] == pytest.approx(trl_metrics["rewards/accuracies"])


def test_a_pair_is_scored_on_its_outputs_only(tokenizer):
    pair = tokenize_preference(tokenizer, PAIRS[1])
    trained = tokenizer.decode(
        [t for t, label in zip(pair.chosen.input_ids, pair.chosen.labels, strict=True) if label >= 0]
    )
    assert trained == "6<|im_end|>"  # not the "4" of the input's assistant turn, EOS of the turn included
    weighted = PAIRS[0] | {"preferred_output": [PAIRS[0]["preferred_output"][0] | {"weight": 0}]}
    assert tokenize_preference(tokenizer, weighted).chosen.n_trained > 0  # a weight on an output is ignored


# -- a DPO run: "polite" answers preferred over curt ones --------------------------------------------------
TOPICS = ["the weather", "the train times", "my order", "the museum", "the recipe", "the library", "the match",
          "the meeting", "the bill", "the ferry", "the garden", "the exam", "the concert", "the hotel", "the bus",
          "the market", "the bridge", "the festival", "the pool", "the lecture"]  # fmt: skip


def preference(topic: str) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": f"Tell me about {topic}."}]},
        "preferred_output": [{"role": "assistant", "content": f"Of course! Happy to help with {topic}."}],
        "non_preferred_output": [{"role": "assistant", "content": "No. Ask someone else."}],
    }


def dpo_spec(model_dir: Path, out: Path, train_file: Path, valid_file: Path | None, **hp) -> TrainSpec:
    values = {"objective": "dpo", "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 20.0} | hp
    return TrainSpec(
        base_model_dir=model_dir,
        training_file=train_file,
        validation_file=valid_file,
        output_dir=out,
        seed=3,
        hyperparameters=JobSpec(**values),
    )


@pytest.fixture
def preference_files(tmp_path) -> tuple[Path, Path]:
    return (
        write_jsonl(tmp_path / "train.jsonl", [preference(t) for t in TOPICS[:16]]),
        write_jsonl(tmp_path / "valid.jsonl", [preference(t) for t in TOPICS[16:]]),
    )


def held_out_margin(model_dir: Path, adapter: Path | None, tokenizer, valid_file: Path) -> float:
    """Mean preferred-minus-rejected summed log-prob over the held-out pairs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    pairs = [tokenize_preference(tokenizer, json.loads(line)) for line in valid_file.read_text().splitlines()]
    logps = recipe._reference_logps(model, pairs, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    return float((logps[:, 0] - logps[:, 1]).mean())


def test_dpo_raises_the_held_out_margin_and_reports_preference_metrics(tiny_dir, tokenizer, preference_files, tmp_path):
    train_file, valid_file = preference_files
    hooks = RecordingHooks()
    result = train(dpo_spec(tiny_dir, tmp_path / "job", train_file, valid_file), hooks)

    before = held_out_margin(tiny_dir, None, tokenizer, valid_file)
    after = held_out_margin(tiny_dir, result.final_dir, tokenizer, valid_file)
    assert after > before + 1.0, (before, after)  # the preferred answers gained against the rejected ones

    metrics = hooks.metrics()
    assert len(metrics) == 8  # 16 pairs, batch 4, 2 epochs
    first, last = metrics[0], metrics[-1]
    assert first["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # step 1: policy == reference
    assert first["train_reward_accuracy"] == 0.0  # strict ">": equal rewards are not a win (as TRL)
    assert last["train_loss"] < first["train_loss"] and last["train_reward_accuracy"] > 0.5
    assert last["full_valid_reward_margin"] > 0 and last["full_valid_reward_accuracy"] > 0.5
    for m in metrics:
        assert m["train_reward_margin"] == pytest.approx(m["train_chosen_reward"] - m["train_rejected_reward"])
    assert "reward accuracy=" in next(e["message"] for e in hooks.events if e["type"] == "metrics")
    (resolved, total_steps), *_ = hooks.started_with
    assert resolved.beta == 0.1 and resolved.objective == "dpo" and total_steps == 8
    assert resolved.as_dict()["beta"] == 0.1 and "objective" not in resolved.as_dict()
    assert resolved.learning_rate == pytest.approx(5e-5 * 20)

    with result.results_csv.open() as f:
        header = next(csv.reader(f))
    assert header[:7] == ["step", "train_loss", "train_mean_token_accuracy", "train_reward_accuracy",
                          "train_chosen_reward", "train_rejected_reward", "train_reward_margin"]  # fmt: skip
    assert "full_valid_reward_margin" in header
    assert hooks.checkpoints[-1].metrics["full_valid_reward_accuracy"] >= 0
    meta = json.loads((result.final_dir / "tunelab.json").read_text())
    assert meta["objective"] == "dpo" and meta["method"] == "lora"
    assert any("Smoke test" in e["message"] for e in hooks.events)


def test_full_dpo_pauses_and_resumes_to_the_same_losses(tiny_dir, preference_files, tmp_path):
    from tunelab.training.hooks import Stop
    from tunelab.training.recipe import Paused

    train_file, _ = preference_files
    plain = RecordingHooks()
    train(dpo_spec(tiny_dir, tmp_path / "plain", train_file, None, lora_rank=0, learning_rate_multiplier=50.0), plain)
    paused = RecordingHooks(stop_after=3, stop_with=Stop.PAUSE)
    spec = dpo_spec(tiny_dir, tmp_path / "job", train_file, None, lora_rank=0, learning_rate_multiplier=50.0)
    with pytest.raises(Paused):
        train(spec, paused)
    resumed = RecordingHooks()
    train(spec, resumed)  # the reference comes again from the model as it starts, not as it paused
    losses = [m["train_loss"] for m in paused.metrics() + resumed.metrics()]
    assert losses == [m["train_loss"] for m in plain.metrics()]
    assert losses[-1] < losses[0]


def test_a_chat_file_is_not_a_preference_file(tiny_dir, tmp_path):
    chats = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TrainingError, match="cannot be read: .*not a preference example"):
        train(dpo_spec(tiny_dir, tmp_path / "job", chats, None), RecordingHooks())
