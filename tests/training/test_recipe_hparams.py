"""The "auto" rules and hyperparameter validation (no model)."""

from __future__ import annotations

import pytest

from tunelab.training import hparams


def resolve(**overrides):
    values = dict(n_examples=10, mean_tokens=55.0) | overrides
    data = {k: values.pop(k) for k in ("n_examples", "mean_tokens")}
    return hparams.resolve(hparams.JobSpec(**values), **data)


def test_auto_for_the_lab_data():
    hp = resolve()  # 10 chats of ~55 tokens
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (10, 2, 1.0)
    assert hp.method == "lora" and hp.learning_rate == 2e-4


@pytest.mark.parametrize(
    ("n_examples", "mean_tokens", "batch_size"),
    [(1, 50, 1), (10, 55, 2), (200, 55, 18), (10_000, 55, 18), (10_000, 3000, 1), (100_000, 5, 64)],
)
def test_auto_batch_size_follows_the_token_budget_and_keeps_five_steps_per_epoch(n_examples, mean_tokens, batch_size):
    assert hparams.auto_batch_size(n_examples, mean_tokens) == batch_size


def test_auto_epochs_follow_the_cookbook_rule():
    assert [resolve(n_examples=n).n_epochs for n in (1, 10, 50, 200, 10_000)] == [25, 10, 3, 3, 2]


def test_explicit_values_are_kept_and_full_fine_tuning_has_its_own_base_lr():
    hp = resolve(n_epochs=2, batch_size=4, learning_rate_multiplier=0.5, lora_rank=0)
    assert (hp.n_epochs, hp.batch_size, hp.method) == (2, 4, "full")
    assert hp.learning_rate == pytest.approx(1e-5)
    assert set(hp.as_dict()) == {"n_epochs", "batch_size", "learning_rate_multiplier", "learning_rate", "method"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_epochs", 0),
        ("n_epochs", 1.5),
        ("n_epochs", True),
        ("batch_size", "max"),
        ("learning_rate_multiplier", 0),
        ("lora_rank", -1),
        ("lora_alpha", 0),
        ("lora_dropout", 1.0),
    ],
)
def test_out_of_range_values_name_their_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        resolve(**{field: value})


def test_dpo_resolves_beta_and_its_own_learning_rates():
    lora, full = resolve(objective="dpo"), resolve(objective="dpo", lora_rank=0, beta=2)
    assert (lora.beta, lora.learning_rate, full.beta, full.learning_rate) == (0.1, 5e-5, 2.0, 5e-6)
    assert lora.as_dict()["beta"] == 0.1 and "objective" not in lora.as_dict()
    assert "beta" not in resolve().as_dict() and resolve().learning_rate == 2e-4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"objective": "dpo", "beta": 0}, "beta must be a number in"),
        ({"objective": "dpo", "beta": 2.5}, "beta must be a number in"),
        ({"objective": "dpo", "beta": True}, "beta must be a number in"),
        ({"beta": 0.1}, "beta must be left unset for supervised"),
        ({"objective": "rl"}, "method.type must be"),
    ],
)
def test_bad_dpo_settings_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve(**overrides)
