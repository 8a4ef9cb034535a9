"""Graders as pure functions: OpenAI's semantics, the libraries' numbers, templates, the report."""

from __future__ import annotations

import pytest

from tunelab.evals.compare import macro_f1_diff, pass_rate_diff, wilson
from tunelab.evals.graders import JudgeAnswer, grade, parse_label, parse_score, similarity, string_check
from tunelab.evals.report import OFF_FORMAT, classification_criterion, classification_report
from tunelab.evals.templates import MissingValue, TemplateError, references, render, whole_ref


def no_judge(*_):
    raise AssertionError("no judge expected")


@pytest.mark.parametrize(
    ("op", "text", "ref", "expected"),
    [
        ("eq", "positive", "positive", True),
        ("eq", "Positive", "positive", False),  # case-sensitive
        ("eq", "positive\n", "positive", False),  # no trimming
        ("ne", "negative", "positive", True),
        ("ne", "positive", "positive", False),
        ("like", "it is positive.", "positive", True),  # a substring test, not SQL LIKE
        ("like", "it is Positive.", "positive", False),
        ("like", "positive", "pos%", False),
        ("ilike", "it is POSITIVE.", "positive", True),
        ("ilike", "negative", "positive", False),
    ],
)
def test_string_check(op, text, ref, expected):
    assert string_check(op, text, ref) is expected


def test_similarity_metrics_come_from_the_libraries():
    import sacrebleu
    from nltk.translate.gleu_score import sentence_gleu
    from rapidfuzz import fuzz, utils
    from rouge_score import rouge_scorer

    hyp, ref = "the quick brown fox jumps over the dog", "the quick brown fox jumped over the lazy dog"
    assert similarity("fuzzy_match", hyp, ref) == fuzz.WRatio(hyp, ref, processor=utils.default_process) / 100
    assert similarity("bleu", hyp, ref) == pytest.approx(sacrebleu.sentence_bleu(hyp, [ref]).score / 100)
    assert similarity("gleu", hyp, ref) == pytest.approx(sentence_gleu([ref.split()], hyp.split()))
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    expected = scorer.score(ref, hyp)
    assert similarity("rouge_1", hyp, ref) == pytest.approx(expected["rouge1"].fmeasure)
    assert similarity("rouge_2", hyp, ref) == pytest.approx(expected["rouge2"].fmeasure)
    assert similarity("rouge_l", hyp, ref) == pytest.approx(expected["rougeL"].fmeasure)
    assert 0.5 < similarity("meteor", hyp, ref) < 1.0


@pytest.mark.parametrize(
    "metric",
    ["fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"],
)
def test_every_metric_is_in_range_and_orders_answers(metric):
    ref = "the cat sat on the mat near the door"
    exact, close, far = (
        similarity(metric, ref, ref),
        similarity(metric, "the cat sat on the mat near a door", ref),
        (similarity(metric, "stock prices fell sharply today", ref)),
    )
    assert 0.0 <= far < close <= exact <= 1.0
    assert similarity(metric, "", ref) == 0.0  # an empty answer scores 0, no exception


def test_meteor_of_one_exact_word_is_half_as_nltk_defines_it():
    assert similarity("meteor", "positive", "positive") == pytest.approx(0.5)
    assert similarity("fuzzy_match", "Positive.", "positive") == 1.0  # default_process: case, punctuation


def test_text_similarity_passes_at_the_threshold():
    criterion = {
        "id": "fz-1",
        "type": "text_similarity",
        "input": "{{sample.output_text}}",
        "reference": "{{item.label}}",
        "evaluation_metric": "fuzzy_match",
        "pass_threshold": 1.0,
    }
    result = grade(criterion, {"label": "positive"}, {"output_text": "Positive"}, no_judge)
    assert result == {
        "name": "fz-1",
        "type": "text_similarity",
        "sample": None,
        "score": 1.0,
        "passed": True,
        "input": "Positive",
        "reference": "positive",
    }
    assert not grade(criterion, {"label": "positive"}, {"output_text": "negative"}, no_judge)["passed"]


def test_templates():
    item = {"a": "x", "n": 3, "turns": [{"text": "hi"}], "obj": {"k": [1, 2]}}
    assert render("{{item.a}}/{{ item.n }}/{{item.turns[0].text}}/{{item.obj}}", item) == 'x/3/hi/{"k": [1, 2]}'
    assert render("{{sample.output_text}}", item, {"output_text": "yes"}) == "yes"
    assert [str(r) for r in references("{{ item.a }} {{sample.choices[0].message}}")] == [
        "item.a",
        "sample.choices[0].message",
    ]
    assert whole_ref(" {{ item.label }} ") is not None and whole_ref("x {{item.label}}") is None
    with pytest.raises(TemplateError, match="unknown template variable"):
        references("{{ items.a }}")
    with pytest.raises(TemplateError, match="names no field"):
        references("{{item}}")
    with pytest.raises(MissingValue, match="item.b is missing"):
        render("{{item.b}}", item)
    with pytest.raises(MissingValue):
        render("{{sample.output_text}}", item, None)


def test_label_and_score_parsing():
    labels = ["positive", "negative"]
    assert parse_label("Negative.", labels) == "negative"
    assert parse_label("The review is positive, not negative", labels) == "positive"  # the first one named
    assert parse_label("unclear", labels) is None
    assert parse_label("positively", labels) is None  # whole words only
    assert parse_score('{"result": 0.7, "steps": []}') == 0.7
    assert parse_score("Score: 8/10") == 8.0
    assert parse_score("no idea") is None


def test_model_graders_ask_the_judge_and_clamp():
    asked = []

    def judge(model, messages, params):
        asked.append((model, messages, params))
        return JudgeAnswer("7", prompt_tokens=11, completion_tokens=1)

    criterion = {
        "id": "s-1",
        "type": "score_model",
        "model": "m",
        "input": [
            {"type": "message", "role": "developer", "content": {"type": "input_text", "text": "Rate {{item.q}}"}}
        ],
        "range": [0, 5],
        "pass_threshold": 4,
        "sampling_params": None,
    }
    result = grade(criterion, {"q": "this"}, {"output_text": "x"}, judge)
    assert result["score"] == 5 and result["passed"]  # 7 clamped to the range
    assert result["sample"]["usage"]["total_tokens"] == 12
    model, messages, params = asked[0]
    assert model == "m" and messages[0]["role"] == "system" and messages[0]["content"].startswith("Rate this")
    assert params["temperature"] == 0.0

    label = {
        "id": "l-1",
        "type": "label_model",
        "model": "m",
        "input": [{"role": "user", "content": "{{sample.output_text}}"}],
        "labels": ["good", "bad"],
        "passing_labels": ["good"],
    }
    out = grade(label, {}, {"output_text": "x"}, lambda *a: JudgeAnswer("Bad", 3, 1))
    assert out["label"] == "bad" and not out["passed"] and out["score"] == 0.0
    off = grade(label, {}, {"output_text": "x"}, lambda *a: JudgeAnswer("maybe", 3, 1))
    assert not off["passed"] and "none of the labels" in off["error"]


def test_classification_report_equals_sklearn_and_keeps_off_format_answers():
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    truths = ["pos", "neg", "pos", "neg", "pos", "neg"]
    preds = ["pos", "pos", "Pos", "neg", "unsure", "neg"]
    labels = ["neg", "pos"]
    report = classification_report(truths, preds, labels)
    mapped = [p if p in labels else OFF_FORMAT for p in preds]
    assert report["accuracy"] == accuracy_score(truths, mapped) == pytest.approx(0.5)
    assert report["macro_f1"] == pytest.approx(f1_score(truths, mapped, labels=labels, average="macro"))
    p, r, f, s = precision_recall_fscore_support(truths, mapped, labels=labels, zero_division=0)
    assert report["per_label"]["pos"] == {"precision": p[1], "recall": r[1], "f1": f[1], "support": 3}
    assert report["off_format"] == 2
    # rows = truth, columns = prediction; the off-format column keeps what sklearn would drop
    assert report["confusion_matrix"] == {"labels": ["neg", "pos", OFF_FORMAT], "rows": [[2, 1, 0], [0, 1, 2]]}


def test_classification_criterion_is_an_eq_check_against_one_item_field():
    eq = {"id": "e", "type": "string_check", "operation": "eq", "input": "{{sample.output_text}}"}
    assert classification_criterion([{**eq, "reference": "{{ item.label }}"}])[1] == "label"
    assert classification_criterion([{**eq, "reference": "label: {{item.label}}"}]) is None
    assert classification_criterion([{**eq, "operation": "ilike", "reference": "{{item.label}}"}]) is None


def test_confidence_intervals():
    ci = wilson(50, 50)
    assert ci.high == 1.0 and 0.9 < ci.low < 0.95
    a, b = [True] * 50 + [False] * 50, [True] * 80 + [False] * 20
    diff, ci = pass_rate_diff(a, b)
    assert diff == pytest.approx(0.3) and ci.low < 0.3 < ci.high and ci.low > 0
    same, ci0 = pass_rate_diff(a, a)
    assert same == 0 and ci0.low == ci0.high == 0  # identical runs: no difference at all
    truths = ["p", "n"] * 50
    d, ci = macro_f1_diff(truths, ["p"] * 100, truths, ["n", "p"])
    assert d == pytest.approx(1 - 1 / 3) and ci.low > 0.5
