"""The graders (OpenAI's testing criteria) as functions of an item and a sample.

    result = grade(criterion, item, sample, judge)   # {"name", "type", "score", "passed", ...}

``criterion`` is the stored (echoed) testing criterion; ``item`` the data-source row; ``sample``
the ``sample`` namespace (``output_text``, ``choices``). Model graders ask ``judge`` -- the
executor's handle on the serving engine -- for an answer. The metrics come from well-kept
libraries: rapidfuzz, sacrebleu, NLTK and rouge-score (imported on first use).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from tunelab.evals.templates import MissingValue, render

SimilarityMetric = Literal[
    "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"
]
SIMILARITY_METRICS: tuple[str, ...] = get_args(SimilarityMetric)
"""``text_similarity`` metrics tunelab computes; ``cosine`` needs an embeddings model it does not have."""

GRADER_TYPES = ("string_check", "text_similarity", "label_model", "score_model")
JUDGE_MAX_TOKENS = 16


@dataclass(frozen=True)
class JudgeAnswer:
    text: str
    prompt_tokens: int
    completion_tokens: int


Judge = Callable[[str, list[dict[str, str]], dict[str, Any]], JudgeAnswer]
"""(model, messages, sampling {"temperature", "top_p", "max_tokens", "seed"}) -> the judge's answer."""


class GraderError(Exception):
    """The grader could not grade this item (a missing value, an answer that is no label or number)."""

    def __init__(self, message: str, sample: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.sample = sample  # the judge's sampling, when it answered


# -- string_check ----------------------------------------------------------------------------------
def string_check(operation: str, text: str, reference: str) -> bool:
    """OpenAI's semantics: ``like``/``ilike`` are substring tests (not SQL patterns); no trimming."""
    if operation == "eq":
        return text == reference
    if operation == "ne":
        return text != reference
    if operation == "like":
        return reference in text
    if operation == "ilike":
        return reference.lower() in text.lower()
    raise ValueError(f"unknown string_check operation {operation!r}")


# -- text_similarity -------------------------------------------------------------------------------
def similarity(metric: str, text: str, reference: str) -> float:
    """A score in [0, 1] of ``text`` against ``reference``.

    - fuzzy_match: ``rapidfuzz.fuzz.WRatio`` with ``utils.default_process`` (lowercased,
      punctuation stripped) / 100, as OpenAI's own grader examples do.
    - bleu: ``sacrebleu.sentence_bleu`` (13a tokens, exp smoothing) / 100.
    - gleu: ``nltk.translate.gleu_score.sentence_gleu`` (1- to 4-grams) on 13a tokens.
    - meteor: ``nltk.translate.meteor_score.meteor_score`` on 13a tokens, exact and Porter-stem
      matches (no WordNet synonyms: no offline package ships WordNet; see docs/evals.md).
    - rouge_N / rouge_l: rouge-score F-measure of ``rougeN`` / ``rougeL``, no stemmer.
    """
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz, utils

        return float(fuzz.WRatio(text, reference, processor=utils.default_process)) / 100.0
    if metric == "bleu":
        import sacrebleu

        # sacrebleu's float arithmetic gives 100.00000000000004 for a perfect match: clamp.
        return min(float(sacrebleu.sentence_bleu(text, [reference]).score) / 100.0, 1.0)
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        hyp, ref = _tokens(text), _tokens(reference)
        return float(sentence_gleu([ref], hyp)) if hyp and ref else float(hyp == ref)
    if metric == "meteor":
        from nltk.translate.meteor_score import meteor_score

        hyp, ref = _tokens(text), _tokens(reference)
        return float(meteor_score([ref], hyp, wordnet=_NoSynonyms())) if hyp and ref else float(hyp == ref)
    if metric.startswith("rouge_"):
        key = "rougeL" if metric == "rouge_l" else "rouge" + metric.removeprefix("rouge_")
        return float(_rouge(key).score(target=reference, prediction=text)[key].fmeasure)
    raise ValueError(f"unknown text_similarity metric {metric!r}")


def _tokens(text: str) -> list[str]:
    return _tokenizer_13a()(text).split()


@functools.cache
def _tokenizer_13a() -> Callable[[str], str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


@functools.cache
def _rouge(key: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([key], use_stemmer=False)


class _NoSynonyms:
    """A WordNet with no synsets: METEOR's synonym stage matches nothing."""

    def synsets(self, *_: Any, **__: Any) -> list:
        return []


# -- model graders ---------------------------------------------------------------------------------
def parse_label(answer: str, labels: list[str]) -> str | None:
    """The label a judge answered: the whole answer (case and surrounding punctuation ignored),
    else the label named first as a word in it; None when it names none."""
    clean = answer.strip().strip(".!\"'`*").strip()
    for label in labels:
        if clean.lower() == label.lower():
            return label
    found = [(m.start(), label) for label in labels if (m := re.search(rf"\b{re.escape(label)}\b", answer, re.I))]
    return min(found)[1] if found else None


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def parse_score(answer: str) -> float | None:
    """A judge's score: ``{"result": x}`` JSON (OpenAI's format), else the first number in the answer."""
    try:
        data = json.loads(answer)
        if isinstance(data, dict) and isinstance(data.get("result"), int | float):
            return float(data["result"])
    except ValueError:
        pass
    m = _NUMBER.search(answer)
    if m is None:
        return None
    value = float(m.group())
    return value if math.isfinite(value) else None


def judge_messages(messages: list[dict[str, Any]], item: dict, sample: dict | None, instruction: str) -> list[dict]:
    """The grader's ``input`` messages rendered, ``developer`` as ``system``, the answer format
    appended to the last message (small models follow it best there)."""
    out = [
        {"role": "system" if m["role"] == "developer" else m["role"], "content": render(message_text(m), item, sample)}
        for m in messages
    ]
    out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{instruction}"}
    return out


def message_text(message: dict[str, Any]) -> str:
    """The text of an echoed message (content ``{"type": "input_text", "text"}`` or a string)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return "".join(str(part.get("text", "")) for part in content)


# -- one criterion ---------------------------------------------------------------------------------
def grade(criterion: dict[str, Any], item: dict[str, Any], sample: dict[str, Any] | None, judge: Judge) -> dict:
    """The result of one testing criterion on one item: OpenAI's ``{name, type, score, passed,
    sample}`` plus what was compared (``input``/``reference`` or the judge's answer) and, when it
    could not grade, ``error`` (then score 0, not passed)."""
    result: dict[str, Any] = {"name": criterion["id"], "type": criterion["type"], "sample": None}
    try:
        score, passed, extra = _grade(criterion, item, sample, judge)
    except MissingValue as exc:
        return {**result, "score": 0.0, "passed": False, "error": str(exc)}
    except GraderError as exc:
        return {**result, "sample": exc.sample, "score": 0.0, "passed": False, "error": str(exc)}
    return {**result, "score": score, "passed": passed, **extra}


def _grade(criterion: dict, item: dict, sample: dict | None, judge: Judge) -> tuple[float, bool, dict]:
    kind = criterion["type"]
    if kind in ("string_check", "text_similarity"):
        text, reference = render(criterion["input"], item, sample), render(criterion["reference"], item, sample)
        shown = {"input": text, "reference": reference}
        if kind == "string_check":
            ok = string_check(criterion["operation"], text, reference)
            return float(ok), ok, shown
        score = similarity(criterion["evaluation_metric"], text, reference)
        return score, score >= criterion["pass_threshold"], shown
    if kind == "label_model":
        labels = criterion["labels"]
        messages = judge_messages(
            criterion["input"], item, sample, "Answer with exactly one of these labels: " + ", ".join(labels) + "."
        )
        answer = judge(criterion["model"], messages, {"temperature": 0.0, "max_tokens": JUDGE_MAX_TOKENS})
        label = parse_label(answer.text, labels)
        judged = _judge_sample(criterion["model"], messages, answer)
        if label is None:
            raise GraderError(f"the judge's answer {answer.text!r} is none of the labels {labels}", judged)
        extra = {"sample": judged, "label": label}
        ok = label in criterion["passing_labels"]
        return float(ok), ok, extra
    if kind == "score_model":
        low, high = criterion.get("range") or [0.0, 1.0]
        params = criterion.get("sampling_params") or {}
        messages = judge_messages(
            criterion["input"], item, sample, f"Reply with only a number from {low:g} to {high:g}."
        )
        answer = judge(
            criterion["model"],
            messages,
            {
                "temperature": params.get("temperature") or 0.0,
                "top_p": params.get("top_p") or 1.0,
                "max_tokens": params.get("max_completions_tokens") or JUDGE_MAX_TOKENS,
                "seed": params.get("seed"),
            },
        )
        value = parse_score(answer.text)
        judged = _judge_sample(criterion["model"], messages, answer)
        if value is None:
            raise GraderError(f"the judge's answer {answer.text!r} holds no number", judged)
        extra = {"sample": judged}
        score = min(max(value, low), high)  # clamped to the range, as OpenAI does
        threshold = criterion.get("pass_threshold")
        return score, score >= (threshold if threshold is not None else (low + high) / 2), extra
    raise ValueError(f"unknown grader type {kind!r}")


def _judge_sample(model: str, messages: list[dict], answer: JudgeAnswer) -> dict:
    return {
        "model": model,
        "input": messages,
        "output": [{"role": "assistant", "content": answer.text}],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
            "cached_tokens": 0,
        },
    }
