"""The fine-tuning recipe: chat JSONL in, a deployable LoRA adapter or full model out.

Read it top to bottom: ``train`` is setup → train → save → smoke test → cleanup.

Why a short loop rather than HF ``Trainer`` or TRL ``SFTTrainer``: the machinery comes from
the libraries — the model, its chat template, padding-free packing
(``DataCollatorWithFlattening`` + ``masking_utils``' packed-sequence masks), LoRA (PEFT), the LR
schedule (``transformers.get_scheduler``) — and what is left is what tunelab's contract asks for,
which the trainers do not do out of the box and which reads better as twenty visible lines than
as overrides and callbacks:

* SFTTrainer's assistant-only loss needs ``{% generation %}`` markers in the chat template
  (SmolLM's and Qwen's have none) and knows no per-message ``weight``; so tokenization is ours
  either way (tokenize.py).
* Trainer has no train token accuracy and one evaluation cadence; we need ``valid_*`` on a
  small sample every N steps *and* ``full_valid_*`` at each epoch end, in the same metrics row.
* Trainer's checkpoints carry optimizer state, and its rotation is silent; ours are deployable
  folders, and a deleted checkpoint is reported.
* Cancellation, pause (resume.py saves the loop's state), every-step events and OOM →
  ``TrainingError`` are a few lines each in a loop.

The loss is the mean over trained tokens of a whole optimizer step: each packed row's summed
token loss is divided by the step's trained-token count before ``backward``, so rows of a step
(gradient accumulation) are weighted by tokens, not by row.

DPO (``objective="dpo"``) is the same loop on preference pairs. A pair is its input followed by
each output, tokenized with the same chat template (only the output and its end-of-turn marker
are scored); both sequences sit in one packed row, so that the pair's loss
``-logsigmoid(beta * ((pc - rc) - (pr - rr)))`` (p: the policy's summed log-prob of an output,
r: the reference's) is exact under row-by-row accumulation; the step's loss is the mean over its
pairs. tests/training/test_dpo.py checks loss and gradients against TRL's ``DPOTrainer``.
The reference is the model the job starts from, its log-probs computed once before the first
step (``_reference_logps``; again on resume, from the freshly loaded starting model): no second
copy of the model and no reference forward per step, for LoRA, full and continued (SFT → DPO) runs.
"""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, get_scheduler, set_seed

from tunelab.data.formats import iter_chat_examples, iter_preference_examples
from tunelab.data.tokenize import (
    PreferencePair,
    TemplateError,
    TokenizedExample,
    template_message,
    tokenize_chat,
    tokenize_preference,
)
from tunelab.models.folder import LoraSettings, context_length, eos_ids, hidden_size, resolve_device
from tunelab.training import fsdp, hparams, resume
from tunelab.training.distributed import ONE_PROCESS, Group, RankFailed
from tunelab.training.hooks import Checkpoint, StepMetrics, Stop, TrainHooks
from tunelab.training.packing import example_of_tokens, pack, pack_groups, token_losses

Model = Any
"""A transformers causal LM, or PEFT's wrapper of one (both too dynamic for a useful static type)."""
Item = TokenizedExample | PreferencePair
"""One training example: a chat (supervised) or a preference pair (DPO)."""
PREFERENCE_METRICS = ("reward_accuracy", "chosen_reward", "rejected_reward", "reward_margin")

# Recipe constants (everything a job can change is in TrainSpec).
MAX_ROW_TOKENS = 2048  # tokens per packed forward pass; a step with more is split into several rows
WARMUP_FRACTION = 0.03  # of all steps, linear warmup, then linear decay to 0
MAX_GRAD_NORM = 1.0
VALID_POINTS = 10  # valid_loss on a sample about this many times per run
SMOKE_PROMPTS, SMOKE_MAX_NEW_TOKENS = 3, 64
STOP_CHECK_EXAMPLES = 256  # while tokenizing, ask should_stop every this many examples


@dataclass
class TrainSpec:
    """One fine-tuning job."""

    base_model_dir: Path
    """Local HF folder of the base model (config, safetensors, tokenizer with a chat template)."""
    training_file: Path
    """Chat JSONL: one ``{"messages": [...]}`` per line; preference JSONL for DPO."""
    validation_file: Path | None
    """The same format, for valid_* metrics and the smoke test; optional."""
    output_dir: Path
    """Everything the job writes: results.csv, checkpoints/, final/; resume.pt while paused or
    unfinished (``train`` goes on from it when it is there)."""
    seed: int
    """Seeds LoRA init, shuffling and dropout: same seed and inputs give the same losses (CPU)."""
    hyperparameters: hparams.JobSpec = field(default_factory=hparams.JobSpec)
    """What the job asks for (objective, epochs, batch size, LR multiplier, LoRA shape, DPO beta);
    "auto" is resolved against the training set (hparams.resolve)."""
    lora_target_modules: list[str] | None = None
    """Module names to adapt; None = every linear projection except the LM head."""
    init_adapter: Path | None = None
    """A LoRA adapter of ``base_model_dir`` to train further (fine-tuning a fine-tuned model); its
    rank, alpha, dropout and target modules replace the requested ones."""
    max_length: int | None = None
    """Truncate examples longer than this many tokens; None = the model's context length."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"."""
    keep_checkpoints: int = 3
    """Epoch checkpoints kept on disk; older ones are deleted."""
    cpu_threads: int | None = None
    """CPU training threads; None = every core this process may use. PyTorch's threads wait for
    each other after every op, so if other CPU-heavy work (generation, another job) shares the
    machine, leave it a core: on 2 cores with one busy neighbour a LoRA step of SmolLM2-135M took
    46 s with 2 threads and 1.3 s with 1 (idle machine: 2 threads ~1.1 s). The thread count
    changes float rounding, so bitwise reproducibility holds for the same count."""
    sharding: Literal["none", "fsdp"] = "none"
    """A job on several processes: "none" keeps a whole copy of the model on each rank, "fsdp"
    shards weights, gradients and optimizer state over the ranks (FSDP2, fsdp.py)."""
    resume_every: float | None = None
    """Save the resumable state (resume.pt, as a pause does) at every epoch end and at least this
    often, in seconds, so that a run killed outright goes on from its last save; None = only
    when paused."""


@dataclass
class TrainResult:
    trained_tokens: int
    """Trained (assistant) tokens x epochs: what OpenAI bills."""
    hyperparameters: hparams.Hyperparameters
    """Resolved: n_epochs, batch_size, learning_rate_multiplier, learning_rate, method, lora_*."""
    final_dir: Path
    results_csv: Path
    checkpoints: list[Checkpoint]
    """The kept epoch checkpoints, oldest first."""
    ends_with_eos: bool | None
    """Whether every smoke-test answer ended with EOS by itself; None if there was no prompt."""


class Cancelled(Exception):
    """``hooks.should_stop()`` returned ``Stop.CANCEL``; training stopped."""


class Paused(Exception):
    """``hooks.should_stop()`` returned ``Stop.PAUSE``: the state is saved; ``train`` again to go on.

    ``step`` is the last step trained; None when it stopped while setting up (any state an earlier
    run saved is still there)."""

    def __init__(self, step: int | None) -> None:
        super().__init__("paused while setting up" if step is None else f"paused after step {step}")
        self.step = step


class TrainingError(Exception):
    """The job failed for a reason the user can act on; the message says how."""


def train(spec: TrainSpec, hooks: TrainHooks) -> TrainResult:
    """Fine-tune ``spec.base_model_dir`` on ``spec.training_file`` and save to ``spec.output_dir``.

    Goes on from the state a pause left in ``spec.output_dir``, if there is one. Inside a
    torch.distributed process group (``distributed.ranks``) it is one rank of a data-parallel job:
    every rank calls it with the same spec, and only rank 0 writes.

    Raises:
        Cancelled: ``hooks.should_stop()`` returned ``Stop.CANCEL``.
        Paused: ``hooks.should_stop()`` returned ``Stop.PAUSE``; the state is saved for the next ``train``.
        TrainingError: bad data or hyperparameters, out of memory; the message is for the user.
    """
    # -- setup: should_stop is asked between phases and while tokenizing -------------------------
    if spec.init_adapter is not None:
        spec = _continue_adapter(spec, spec.init_adapter)
    group = Group.current()
    device = _device(spec.device, group)
    sharded = spec.sharding == "fsdp" and group.world > 1
    set_seed(spec.seed)
    _stop_point(hooks)
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    max_length = spec.max_length or context_length(spec.base_model_dir)
    dpo = spec.hyperparameters.objective == "dpo"
    train_set = _load_examples(spec.training_file, tokenizer, max_length, hooks, "training", dpo)
    valid_set: list[Item] = []
    if spec.validation_file is not None:
        valid_set = _load_examples(spec.validation_file, tokenizer, max_length, hooks, "validation", dpo)
    hp = _hyperparameters(spec, train_set)
    _stop_point(hooks)

    steps_per_epoch = math.ceil(len(train_set) / hp.batch_size)
    total_steps = steps_per_epoch * hp.n_epochs
    valid_every = max(1, total_steps // VALID_POINTS)
    # valid_* is measured on one fixed, seeded batch of the validation file.
    valid_sample = sorted(random.Random(spec.seed).sample(range(len(valid_set)), min(len(valid_set), hp.batch_size)))
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    results_csv = spec.output_dir / "results.csv"
    names = ["loss", "mean_token_accuracy", *(PREFERENCE_METRICS if dpo else ())]
    columns = ["step", *(f"train_{n}" for n in names)]
    if valid_set:
        columns += [f"{prefix}_{n}" for prefix in ("valid", "full_valid") for n in names]

    with _cpu_threads(device, spec.cpu_threads), _out_of_memory_is_an_error(hp, train_set), _rank_failure_is_an_error():
        model = _load_model(spec, device, hp, place=not sharded)
        if sharded:
            try:
                fsdp.shard(model, device, group)
            except ValueError as e:
                raise TrainingError(f"TUNELAB_TRAIN_SHARDING=fsdp: {e}") from None
        _stop_point(hooks)
        hp = replace(hp, lora_target_modules=_lora_targets(model))
        resolved = hp.as_dict()
        trainable = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel for all parameters; on CPU 4-7x faster than the default per-tensor loop
        optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=0.0, fused=True)
        warmup_steps = math.ceil(WARMUP_FRACTION * total_steps)
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        train_ref = valid_ref = None
        if dpo:  # before _resume: the reference is the model as it starts, not as it was paused
            assert hp.beta is not None
            train_ref, valid_ref = (_Preference(hp.beta, _reference_logps(model, pairs, device, autocast))
                                    for pairs in (train_set, valid_set))  # fmt: skip
            hooks.event(f"DPO reference log-probs computed for {len(train_set) + len(valid_set)} pairs")
            _stop_point(hooks)
        loop = _resume(spec, model, optimizer, scheduler, resolved)
        filler = _filler_row(train_set) if sharded else None

        plan = _step_plan(len(train_set), hp.batch_size, hp.n_epochs, spec.seed, start=loop.step)
        meta = {"method": hp.method, "objective": hp.objective, "base_model_dir": str(spec.base_model_dir),
                "seed": spec.seed, "hyperparameters": resolved}  # fmt: skip
        started = f"resumed at step {loop.step + 1}" if loop.step else "started"
        if group.world > 1:
            started += f" on {group.world} processes" + (" (FSDP)" if sharded else "")
        what = f"{len(train_set)} preference pairs, DPO (beta {hp.beta:g})" if dpo else f"{len(train_set)} examples"
        hooks.event(f"Training {started}: {what}, {total_steps} steps, {hp.method} on {device}")
        hooks.started(hp, total_steps)

        # -- train -----------------------------------------------------------------------------------
        earlier = _read_results(results_csv, upto=loop.step)  # a resumed run keeps the rows it had
        saved_at = time.monotonic()
        with open(results_csv if group.is_main else os.devnull, "w", newline="") as f:  # noqa: PTH123
            results = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            results.writeheader()
            results.writerows(earlier)
            for step, batch_ids in plan:
                stop = group.stop(hooks.should_stop())  # rank 0's answer, on every rank
                if stop is Stop.PAUSE:
                    _save_state(spec.output_dir, model, optimizer, scheduler, loop, resolved, group, sharded)
                    raise Paused(step - 1)
                if stop is Stop.CANCEL:
                    raise Cancelled(f"cancelled at step {step - 1}/{total_steps}")
                share = group.share(batch_ids)
                batch = [train_set[i] for i in share]
                learning_rate = scheduler.get_last_lr()[0]
                started_at = time.perf_counter()
                model.train()
                reference = train_ref.of(share) if train_ref is not None else None
                stats, n_trained, n_tokens = _train_step_within_memory(
                    model, batch, reference, device, autocast, hooks, step, group, filler
                )
                if not sharded:  # FSDP reduced them in the backward passes
                    group.sum_gradients(trainable)
                torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - started_at  # .item() in the step synchronised the device
                loop.step, loop.trained_tokens = step, loop.trained_tokens + n_trained

                end_of_epoch = step % steps_per_epoch == 0
                validation: dict[str, float] = {}
                if valid_set and (group.is_main or sharded):  # FSDP: every rank runs the forwards
                    sample_due = step % valid_every == 0 or step == total_steps
                    with autocast:
                        validation = _validate(
                            model, valid_set, valid_sample, device, end_of_epoch, sample_due, valid_ref
                        )
                metrics = StepMetrics(
                    step=step,
                    total_steps=total_steps,
                    **stats,
                    learning_rate=learning_rate,
                    tokens_per_second=n_tokens / seconds,
                    **validation,
                )
                results.writerow(metrics.results_row())
                f.flush()
                hooks.step(metrics)

                # -- save: a deployable checkpoint per epoch (rank 0), the last keep_checkpoints kept ---
                if end_of_epoch:
                    weights = fsdp.weights(model) if sharded else None
                    if group.is_main:
                        ckpt = Checkpoint(
                            step,
                            step // steps_per_epoch,
                            spec.output_dir / "checkpoints" / f"step-{step}",
                            _floats(metrics.results_row()),
                        )
                        _save(model, tokenizer, ckpt.path, meta, weights)
                        _keep(ckpt, loop.kept, spec.keep_checkpoints, hooks)

                # -- crash safety: the state a pause would save, at epoch ends and every so often ---
                due = spec.resume_every is not None and time.monotonic() - saved_at >= spec.resume_every
                if sharded:  # rank 0's clock decides, as every rank joins the save
                    due = group.agree(due)
                if spec.resume_every is not None and step < total_steps and (end_of_epoch or due):
                    _save_state(spec.output_dir, model, optimizer, scheduler, loop, resolved, group, sharded)
                    saved_at = time.monotonic()

        final_dir = spec.output_dir / "final"
        weights = fsdp.weights(model) if sharded else None
        if group.is_main:
            _save(model, tokenizer, final_dir, meta, weights)
        # -- smoke test: does the model stop by itself? (rank 0; under FSDP every rank generates) ---
        ends_with_eos = (
            _smoke_test(model, tokenizer, spec, device, hooks, sharded) if group.is_main or sharded else None
        )
        if not group.is_main:
            return TrainResult(loop.trained_tokens, hp, final_dir, results_csv, loop.kept, None)

    # -- cleanup -----------------------------------------------------------------------------------
    del model, optimizer
    _release_memory(device)
    resume.remove(spec.output_dir)
    hooks.event(
        f"Training finished: {loop.trained_tokens} trained tokens", data={"trained_tokens": loop.trained_tokens}
    )
    return TrainResult(
        trained_tokens=loop.trained_tokens,
        hyperparameters=hp,
        final_dir=final_dir,
        results_csv=results_csv,
        checkpoints=loop.kept,
        ends_with_eos=ends_with_eos,
    )


# -- setup helpers ---------------------------------------------------------------------------------
def _continue_adapter(spec: TrainSpec, adapter_dir: Path) -> TrainSpec:
    """The spec with the LoRA shape of the adapter it goes on training."""
    try:
        own = LoraSettings.of_adapter(adapter_dir)
    except (OSError, ValueError, KeyError) as e:
        raise TrainingError(f"init_adapter {adapter_dir} is not a LoRA adapter folder: {e}") from None
    if spec.hyperparameters.lora_rank == 0:
        raise TrainingError("lora_rank: 0 (full fine-tuning) cannot go on training a LoRA adapter")
    return replace(spec, hyperparameters=spec.hyperparameters.with_lora(own), lora_target_modules=None)


def _device(setting: str, group: Group) -> torch.device:
    """The training device; a rank of a job on several GPUs trains on ``cuda:LOCAL_RANK``."""
    try:
        device = resolve_device(setting)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if device.type == "cuda" and group.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", group.rank)))
        torch.cuda.set_device(device)  # NCCL's communicator binds to the current device
    return device


def _hyperparameters(spec: TrainSpec, train_set: Sequence[Item]) -> hparams.Hyperparameters:
    """Validate the spec's options and resolve every "auto" against the training set."""
    if spec.keep_checkpoints < 1:
        raise TrainingError(f"keep_checkpoints must be an integer >= 1, got {spec.keep_checkpoints!r}")
    if spec.cpu_threads is not None and spec.cpu_threads < 1:
        raise TrainingError(f"cpu_threads must be an integer >= 1 or None, got {spec.cpu_threads!r}")
    try:
        hp = hparams.resolve(
            spec.hyperparameters, n_examples=len(train_set), mean_tokens=sum(map(len, train_set)) / len(train_set)
        )
    except ValueError as e:
        raise TrainingError(str(e)) from None
    width = hidden_size(spec.base_model_dir)
    if hp.method == "lora" and width is not None and hp.lora_rank > width:
        raise TrainingError(f"lora_rank must be at most the model's hidden size ({width}), got {hp.lora_rank}")
    return hp


def _stop_point(hooks: TrainHooks) -> None:
    """Before training starts: stop now if the job was cancelled or is to pause (nothing to save yet).

    Raises:
        Cancelled, Paused: as ``hooks.should_stop()`` says (``Paused.step`` is None).
    """
    stop = hooks.should_stop()
    if stop is Stop.CANCEL:
        raise Cancelled("cancelled while setting up")
    if stop is Stop.PAUSE:
        raise Paused(None)


def _load_examples(
    path: Path, tokenizer: PreTrainedTokenizerBase, max_length: int | None, hooks: TrainHooks, kind: str, dpo: bool
) -> list[Item]:
    """Tokenize a chat file (a preference file for DPO); examples with nothing to train on are
    dropped with a warning (for DPO: pairs with an output truncated away)."""
    examples: list[Item] = []
    truncated, empty = 0, 0
    for n, (line_no, example) in enumerate(_read_examples(path, kind, dpo), start=1):
        if n % STOP_CHECK_EXAMPLES == 0:
            _stop_point(hooks)
        tokenized: Item
        try:
            if dpo:
                tokenized = tokenize_preference(tokenizer, example, max_length)
            else:
                tokenized = tokenize_chat(tokenizer, example["messages"], max_length, tools=example.get("tools"))
        except TemplateError as e:
            raise TrainingError(f"{kind} file line {line_no}: {e}") from None
        truncated += tokenized.truncated
        if tokenized.n_trained == 0 or (
            isinstance(tokenized, PreferencePair) and 0 in (tokenized.chosen.n_trained, tokenized.rejected.n_trained)
        ):
            empty += 1
            continue
        examples.append(tokenized)
    if truncated:
        hooks.event(
            f"{truncated} {kind} examples were longer than {max_length} tokens and were truncated", level="warn"
        )
    if empty:
        what = "an output with no tokens left after truncation" if dpo else "no assistant tokens to train on"
        hooks.event(f"{empty} {kind} examples have {what} and were skipped", level="warn")
    if not examples:
        raise TrainingError(f"the {kind} file has no example with an assistant message to train on")
    return examples


def _read_examples(path: Path, kind: str, dpo: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        yield from iter_preference_examples(path) if dpo else iter_chat_examples(path)
    except ValueError as e:  # the file was validated at upload; this is a file changed since
        raise TrainingError(f"the {kind} file cannot be read: {e}") from None


def _load_model(spec: TrainSpec, device: torch.device, hp: hparams.Hyperparameters, place: bool = True) -> Model:
    """The base model on ``device`` (on the CPU unless ``place``: FSDP moves the shards), wrapped
    in LoRA adapters unless full fine-tuning.

    On GPU the frozen base of a LoRA run is held in bf16 (PEFT keeps the adapters in fp32); a
    full run keeps fp32 master weights. Compute runs under bf16 autocast on GPU, fp32 on CPU.
    """
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu and hp.method == "lora" else torch.float32
    model: Model = AutoModelForCausalLM.from_pretrained(spec.base_model_dir, dtype=dtype, attn_implementation="sdpa")
    if place:
        model.to(device)
    if hp.method == "full":
        model.requires_grad_(True)
        return model

    from peft import LoraConfig, PeftModel, get_peft_model

    if spec.init_adapter is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return PeftModel.from_pretrained(model, spec.init_adapter, is_trainable=True)
    config = LoraConfig(
        r=hp.lora_rank,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=spec.lora_target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`; not ours to fix.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module name the model does not have
        raise TrainingError(f"lora_target_modules: {e}") from None


def _lora_targets(model: Model) -> tuple[str, ...] | None:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return None
    # PEFT resolves "all-linear" to full module paths or to suffixes, depending on model size.
    config: Any = model.peft_config["default"]  # a LoraConfig
    names = config.target_modules
    return tuple(sorted({name.rsplit(".", 1)[-1] for name in names}))


@contextmanager
def _cpu_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """On CPU, train with ``threads`` threads (default: every core this process may use)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or max(1, min(before, len(os.sched_getaffinity(0)))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _out_of_memory_is_an_error(hp: hparams.Hyperparameters, train_set: Sequence[Item]) -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError:
        longest = max(map(len, train_set))
        advice = ["lower batch_size", "set max_length to truncate long examples"]
        if hp.method == "full":
            advice.append("use LoRA (lora_rank > 0) instead of full fine-tuning")
        raise TrainingError(
            f"out of GPU memory (method={hp.method}, batch_size={hp.batch_size}, longest example={longest} tokens): "
            + ", or ".join(advice)
        ) from None


@contextmanager
def _rank_failure_is_an_error() -> Iterator[None]:
    try:
        yield
    except RankFailed as e:
        raise TrainingError(str(e)) from None


# -- train helpers ---------------------------------------------------------------------------------
def _step_plan(
    n_examples: int, batch_size: int, n_epochs: int, seed: int, start: int = 0
) -> Iterator[tuple[int, list[int]]]:
    """(step, example indices) of each optimizer step after step ``start``, made as they are needed.

    Each epoch is a seeded shuffle, drawn when the epoch begins; a run that starts at a later
    step draws (and skips) the earlier epochs' shuffles, so every run of a seed sees one order.
    Nothing here grows with ``n_epochs``.
    """
    shuffle = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n_examples / batch_size)
    for epoch in range(n_epochs):
        order = torch.randperm(n_examples, generator=shuffle)
        first = epoch * steps_per_epoch + 1
        for i in range(max(0, start + 1 - first), steps_per_epoch):
            yield first + i, order[i * batch_size : (i + 1) * batch_size].tolist()


def _resume(spec: TrainSpec, model: Model, optimizer, scheduler, resolved: dict) -> resume.LoopState:
    """The state a pause left in ``spec.output_dir``, loaded into the run; a fresh state if there is none."""
    if not resume.exists(spec.output_dir):
        return resume.LoopState()
    try:
        loop = resume.load(spec.output_dir, model, optimizer, scheduler, resolved)
    except (ValueError, KeyError, RuntimeError) as e:
        raise TrainingError(f"cannot resume from the paused state in {spec.output_dir}: {e}") from None
    loop.kept = [Checkpoint(step, epoch, Path(path), metrics) for step, epoch, path, metrics in loop.kept]
    return loop


def _read_results(path: Path, upto: int) -> list[dict[str, str]]:
    """The results.csv rows of steps 1..``upto`` (what a resumed run keeps)."""
    if upto == 0 or not path.is_file():
        return []
    kept: list[dict[str, str]] = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):  # steps 1, 2, ... in order; a run killed mid-write may leave a torn last row
            if len(kept) == upto or row.get("step") != str(len(kept) + 1):
                break
            kept.append(row)
    return kept


@dataclass(frozen=True)
class _Preference:
    """What DPO compares the policy with: each pair's summed log-probs under the reference."""

    beta: float
    reference: torch.Tensor
    """(N, 2): the chosen and the rejected output of each pair."""

    def of(self, ids: list[int]) -> _Preference:
        return _Preference(self.beta, self.reference[ids])


def _train_step(
    model: Model,
    batch: Sequence[Item],
    device: torch.device,
    preference: _Preference | None,
    group: Group = ONE_PROCESS,
    filler: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, float], int, int]:
    """Forward and backward this rank's share of one optimizer step's examples.

    The losses are divided by the step's count over all ranks (trained tokens; DPO: pairs), so
    that the gradients summed over the ranks are the one-process gradient. Under FSDP
    (``filler`` given) the rank then passes ``filler`` with weight 0 until it has forwarded as
    many rows as the rank with the most.

    Returns:
        the step's train_* metrics over all ranks (loss, token accuracy; for DPO the preference
        metrics), its trained tokens and its tokens, over all ranks.
    """
    n_tokens = sum(map(len, batch))
    if preference is not None:
        return _dpo_step(model, _pairs(batch), device, preference, group, filler)
    examples = [e for e in batch if isinstance(e, TokenizedExample)]
    n_trained, n_tokens = (int(n) for n in group.sum([sum(e.n_trained for e in examples), n_tokens]))
    loss_sum, correct = 0.0, 0.0
    rows = list(pack(examples, MAX_ROW_TOKENS))
    extra = _extra_passes(filler, len(rows), group)
    for row in rows:
        losses, hits = token_losses(model, _to(row, device))
        (losses.sum() / n_trained).backward()
        loss_sum += losses.sum().item()
        correct += int(hits.sum())
    _pass_idle(model, filler, extra, device)
    loss_sum, correct = group.sum([loss_sum, correct])
    metrics = {"train_loss": loss_sum / n_trained, "train_mean_token_accuracy": correct / n_trained}
    return metrics, n_trained, n_tokens


def _dpo_step(
    model: Model,
    batch: list[PreferencePair],
    device: torch.device,
    preference: _Preference,
    group: Group = ONE_PROCESS,
    filler: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, float], int, int]:
    """``_train_step`` for DPO: each row's summed pair losses over the step's pair count, backward."""
    n_pairs_all, n_trained, n_tokens = (
        int(n) for n in group.sum([len(batch), sum(p.n_trained for p in batch), sum(map(len, batch))])
    )
    stats, first = [torch.zeros(0, 6)], 0
    rows = list(pack_groups([(p.chosen, p.rejected) for p in batch], MAX_ROW_TOKENS))
    extra = _extra_passes(filler, len(rows), group)
    for row in rows:
        sums = _example_sums(model, _to(row, device))  # (2P, 3), chosen and rejected alternating
        n_pairs = len(sums) // 2
        reference = preference.reference[first : first + n_pairs].to(device)  # (P, 2)
        losses, row_stats = _pair_stats(sums, reference, preference.beta)
        (losses.sum() / n_pairs_all).backward()
        stats.append(row_stats.cpu())
        first += n_pairs
    _pass_idle(model, filler, extra, device)
    totals = group.sum(torch.cat(stats).double().sum(0).tolist())
    return _pair_summary(totals, n_pairs_all, "train"), n_trained, n_tokens


def _extra_passes(filler: dict[str, torch.Tensor] | None, n_rows: int, group: Group) -> int:
    """FSDP (``filler`` given): how many zero-weight passes of ``filler`` this rank adds, so that
    every rank forwards as many rows (each forward all-gathers). Asked before any forward."""
    return 0 if filler is None else group.max(n_rows) - n_rows


def _pass_idle(model: Model, filler: dict[str, torch.Tensor] | None, n: int, device: torch.device) -> None:
    """Forward and backward ``filler`` ``n`` times with weight 0: the weights' gathers and the
    gradients' reduce-scatters of rows this rank does not have."""
    for _ in range(n):
        assert filler is not None
        (_example_sums(model, _to(filler, device))[:, 0].sum() * 0).backward()


def _filler_row(train_set: Sequence[Item]) -> dict[str, torch.Tensor]:
    """A packed row of the first training example (or pair): what an idle rank passes under FSDP."""
    first = train_set[0]
    if isinstance(first, PreferencePair):
        return next(iter(pack_groups([(first.chosen, first.rejected)], MAX_ROW_TOKENS)))
    return next(iter(pack([first], MAX_ROW_TOKENS)))


def _pair_stats(sums: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The DPO (sigmoid) loss of each pair and the numbers its metrics are made of.

    Args:
        sums: (2P, 3) ``_example_sums`` of P pairs, chosen and rejected alternating.
        reference: (P, 2) the reference's summed log-probs of the same outputs.

    Returns:
        losses (P,) with their graph, and (P, 6) detached: loss, chosen reward, rejected reward,
        1 if the chosen reward is higher (TRL's strict ``>``), correct and trained tokens of the
        chosen output. A reward is ``beta * (policy - reference)`` summed log-prob, as in TRL.
    """
    logps = -sums[:, 0].view(-1, 2)  # (P, 2)
    rewards = beta * (logps - reference)  # (P, 2)
    losses = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])  # (P,)
    r = rewards.detach()
    chosen = sums.detach().view(-1, 2, 3)[:, 0]  # (P, 3)
    stats = torch.stack([losses.detach(), r[:, 0], r[:, 1], (r[:, 0] > r[:, 1]).float(), chosen[:, 1], chosen[:, 2]], 1)
    return losses, stats


def _pair_summary(totals: list[float], n: int, prefix: str) -> dict[str, float]:
    """``{prefix}_loss`` (mean over pairs), token accuracy of the chosen outputs, and the preference
    metrics: reward accuracy, mean chosen and rejected rewards and their margin.

    Args:
        totals: the column sums of ``_pair_stats`` over ``n`` pairs.
    """
    loss, chosen, rejected, won, correct, n_tokens = totals
    return {
        f"{prefix}_loss": loss / n,
        f"{prefix}_mean_token_accuracy": correct / n_tokens,
        f"{prefix}_reward_accuracy": won / n,
        f"{prefix}_chosen_reward": chosen / n,
        f"{prefix}_rejected_reward": rejected / n,
        f"{prefix}_reward_margin": (chosen - rejected) / n,
    }


@torch.no_grad()
def _reference_logps(model: Model, pairs: Sequence[Item], device: torch.device, autocast) -> torch.Tensor:
    """(N, 2): the summed log-probs of each pair's chosen and rejected output under ``model``."""
    model.eval()
    out = []
    with autocast:
        for row in pack_groups([(p.chosen, p.rejected) for p in _pairs(pairs)], MAX_ROW_TOKENS):
            out.append(-_example_sums(model, _to(row, device))[:, 0].view(-1, 2).float().cpu())
    model.train()
    return torch.cat(out) if out else torch.zeros(0, 2)


def _pairs(items: Sequence[Item]) -> list[PreferencePair]:
    return [p for p in items if isinstance(p, PreferencePair)]


def _train_step_within_memory(
    model: Model,
    batch: Sequence[Item],
    preference: _Preference | None,
    device: torch.device,
    autocast,
    hooks: TrainHooks,
    step: int,
    group: Group,
    filler: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, float], int, int]:
    """``_train_step``; on the first out-of-memory, turn on activation checkpointing and try again.

    Checkpointing keeps one tensor per layer instead of every activation and recomputes the rest in
    the backward pass: ~30% slower, a fraction of the memory. A second out-of-memory is the user's.
    """
    try:
        with autocast:
            return _train_step(model, batch, device, preference, group, filler)
    except torch.OutOfMemoryError:
        if _checkpointing(model):
            raise
    model.zero_grad(set_to_none=True)  # the failed step's partial gradients
    _release_memory(device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under PEFT's wrapper
    kwargs = {"use_reentrant": False}  # re-entrant checkpointing needs inputs that require grad (frozen embeddings)
    if hasattr(base, "activation_checkpointing_enable"):  # newer transformers; the old name is its deprecated alias
        base.activation_checkpointing_enable(kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    hooks.event(
        f"Out of memory at step {step}: training goes on with activation checkpointing (slower, much less memory)",
        level="warn",
    )
    with autocast:
        return _train_step(model, batch, device, preference, group, filler)


def _checkpointing(model: Model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _validate(
    model: Model,
    valid_set: Sequence[Item],
    sample: list[int],
    device: torch.device,
    full: bool,
    sample_due: bool,
    preference: _Preference | None = None,
) -> dict[str, float]:
    """full_valid_* over the whole validation file at epoch ends, valid_* on the sample when due.

    When both are due, the sample's numbers come out of the full pass (one forward, not two).
    DPO (``preference`` given): the pairs' loss and preference metrics against the reference.
    """

    def summary(stats: torch.Tensor, prefix: str) -> dict[str, float]:
        if preference is None:
            return _summary(stats, prefix)
        return _pair_summary(stats.double().sum(0).tolist(), len(stats), prefix)

    def evaluate(ids: list[int]) -> torch.Tensor:
        items = [valid_set[i] for i in ids]
        if preference is None:
            return _evaluate(model, items, device)
        return _evaluate_pairs(model, _pairs(items), preference.of(ids), device)

    if full:
        stats = evaluate(list(range(len(valid_set))))
        return summary(stats, "full_valid") | (summary(stats[sample], "valid") if sample_due else {})
    if sample_due:
        return summary(evaluate(sample), "valid")
    return {}


@torch.no_grad()
def _evaluate(model: Model, examples: Sequence[Item], device: torch.device) -> torch.Tensor:
    """Per example: summed loss, correct predictions and count of its trained tokens, shape (N, 3)."""
    model.eval()
    chats = [e for e in examples if isinstance(e, TokenizedExample)]
    stats = [_example_sums(model, _to(row, device)).cpu() for row in pack(chats, MAX_ROW_TOKENS)]
    model.train()
    return torch.cat(stats)


@torch.no_grad()
def _evaluate_pairs(
    model: Model, pairs: list[PreferencePair], preference: _Preference, device: torch.device
) -> torch.Tensor:
    """Per pair: ``_pair_stats``, shape (N, 6)."""
    model.eval()
    stats, first = [], 0
    for row in pack_groups([(p.chosen, p.rejected) for p in pairs], MAX_ROW_TOKENS):
        sums = _example_sums(model, _to(row, device))
        n_pairs = len(sums) // 2
        reference = preference.reference[first : first + n_pairs].to(device)
        stats.append(_pair_stats(sums, reference, preference.beta)[1].cpu())
        first += n_pairs
    model.train()
    return torch.cat(stats)


def _example_sums(model: Model, row: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward a packed row; per example: summed loss, correct predictions and count of its
    trained tokens, shape (n, 3), differentiable in the loss."""
    losses, hits = token_losses(model, row)  # (K,), (K,)
    per_token = torch.stack([losses, hits.float(), torch.ones_like(losses)], dim=1)  # (K, 3)
    n_examples = int((row["position_ids"][0] == 0).sum())
    index = example_of_tokens(row).to(losses.device)  # (K,)
    return torch.zeros(n_examples, 3, device=losses.device, dtype=per_token.dtype).index_add(0, index, per_token)


def _summary(stats: torch.Tensor, prefix: str) -> dict[str, float]:
    """``{prefix}_loss`` and ``{prefix}_mean_token_accuracy``: means over all trained tokens."""
    loss_sum, correct, n = stats.double().sum(0).tolist()
    return {f"{prefix}_loss": loss_sum / n, f"{prefix}_mean_token_accuracy": correct / n}


def _floats(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _to(row: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in row.items()}


# -- save ------------------------------------------------------------------------------------------
def _save(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    meta: dict,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a deployable folder: PEFT adapter (LoRA) or full HF model, tokenizer, tunelab.json.

    ``weights``: the trainable weights gathered from the shards (FSDP); else the model's own.
    Written next to ``path`` and renamed into place, so a folder that exists is complete.
    """
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **({"state_dict": weights} if weights is not None else {}))
    tokenizer.save_pretrained(tmp)
    (tmp / "tunelab.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _save_state(
    folder: Path,
    model: Model,
    optimizer,
    scheduler,
    loop: resume.LoopState,
    resolved: dict,
    group: Group,
    sharded: bool,
) -> None:
    """Write resume.pt (rank 0); under FSDP every rank joins the gather of the shards."""
    if group.is_main or sharded:
        state = resume.state(model, optimizer, scheduler, loop, resolved)
        if group.is_main:
            resume.save(folder, state)


def _keep(ckpt: Checkpoint, kept: list[Checkpoint], keep: int, hooks: TrainHooks) -> None:
    """Add ``ckpt`` to the kept checkpoints; delete (and report) the oldest beyond ``keep``."""
    kept.append(ckpt)
    hooks.checkpoint(ckpt)
    while len(kept) > keep:
        old = kept.pop(0)
        shutil.rmtree(old.path, ignore_errors=True)
        hooks.checkpoint_deleted(old)


# -- smoke test ------------------------------------------------------------------------------------
@torch.no_grad()
def _smoke_test(
    model: Model,
    tokenizer: PreTrainedTokenizerBase,
    spec: TrainSpec,
    device: torch.device,
    hooks: TrainHooks,
    synced: bool = False,
) -> bool | None:
    """Greedy answers to a few prompts (validation file first); did each end with EOS by itself?

    ``synced``: every rank of an FSDP job runs it; transformers' ``synced_gpus`` keeps the ranks
    forwarding until the last one is done.
    """
    source = spec.validation_file or spec.training_file
    dpo = spec.hyperparameters.objective == "dpo"
    prompts = []
    for _line_no, example in _read_examples(source, "validation" if spec.validation_file else "training", dpo):
        if dpo:  # the input the two outputs answer
            prompts.append(([template_message(m) for m in example["input"]["messages"]], example["input"].get("tools")))
            continue
        messages = example["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
        if last > 0:  # the conversation up to its last answer
            prompts.append(([template_message(m) for m in messages[:last]], example.get("tools")))
    if not prompts or SMOKE_PROMPTS == 0:
        return None

    model.eval()
    stop_ids = eos_ids(model.generation_config, tokenizer)
    samples = []
    for prompt, tools in prompts[:SMOKE_PROMPTS]:
        encoded: Any = tokenizer.apply_chat_template(
            prompt, tools=tools, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        inputs = {k: v.to(device) for k, v in encoded.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            output = model.generate(
                **inputs,
                max_new_tokens=SMOKE_MAX_NEW_TOKENS,
                do_sample=False,
                synced_gpus=synced,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0],
            )
        answer = output[0, inputs["input_ids"].shape[1] :].tolist()
        ended = bool(answer) and answer[-1] in stop_ids
        text = tokenizer.decode(answer, skip_special_tokens=True)
        samples.append({"prompt": prompt[-1]["content"], "answer": text, "ended_with_eos": ended})
    ends_with_eos = all(s["ended_with_eos"] for s in samples)
    n_ok = sum(s["ended_with_eos"] for s in samples)
    hooks.event(
        f"Smoke test: {n_ok}/{len(samples)} greedy answers ended with EOS within {SMOKE_MAX_NEW_TOKENS} tokens",
        level="info" if ends_with_eos else "warn",
        data={"ends_with_eos": ends_with_eos, "samples": samples},
    )
    return ends_with_eos


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
