"""The lab job on the real bundled model (slow): auto hyperparameters, the answers learn to stop."""

from __future__ import annotations

import csv

import pytest

from tunelab.training.recipe import TrainSpec, train

from .conftest import RecordingHooks

pytestmark = pytest.mark.slow


def test_lab_job_learns_and_its_answers_end_with_eos(bundled_dir, lab_paths, tmp_path):
    hooks = RecordingHooks()
    result = train(
        TrainSpec(
            base_model_dir=bundled_dir,
            training_file=lab_paths[0],
            validation_file=lab_paths[1],
            output_dir=tmp_path / "job",
            seed=105,
        ),
        hooks,
    )

    assert result.hyperparameters.as_dict() | {"lora_target_modules": None} == {
        "n_epochs": 10,
        "batch_size": 2,
        "learning_rate_multiplier": 1.0,
        "learning_rate": 2e-4,
        "method": "lora",
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_target_modules": None,
    }
    with result.results_csv.open() as f:
        full_valid = [float(r["full_valid_loss"]) for r in csv.DictReader(f) if r["full_valid_loss"]]
    assert len(full_valid) == 10 and full_valid[-1] < full_valid[0] - 0.3
    assert result.ends_with_eos is True
    smoke = next(e for e in hooks.events if e["message"].startswith("Smoke test"))
    assert all(s["ended_with_eos"] and s["answer"] for s in smoke["data"]["samples"])
