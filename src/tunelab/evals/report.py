"""The classification report of a run (a tunelab extension on the run object).

When a testing criterion is a ``string_check`` ``eq`` whose reference is exactly one item field
(``"{{ item.label }}"``), the run is a classification: the rendered ``input`` is the prediction
and the field the truth. The report has accuracy, per-label precision/recall/F1, macro averages,
the confusion matrix and the number of off-format answers (answers that are none of the labels:
counted as wrong in an explicit column, never dropped). scikit-learn computes every number.
"""

from __future__ import annotations

from typing import Any

from tunelab.evals.templates import whole_ref

OFF_FORMAT = "<off-format>"


def classification_criterion(criteria: list[dict[str, Any]]) -> tuple[dict[str, Any], str] | None:
    """The first criterion that makes a run a classification, and its label field."""
    for criterion in criteria:
        if criterion["type"] == "string_check" and criterion["operation"] == "eq":
            ref = whole_ref(criterion["reference"])
            if ref is not None and ref.namespace == "item" and len(ref.path) == 1 and isinstance(ref.path[0], str):
                return criterion, ref.path[0]
    return None


def labels_of(item_schema: dict[str, Any], field: str, truths: list[str]) -> list[str]:
    """The label set: the field's ``enum`` in the item schema, else the truths seen, sorted."""
    prop = (item_schema.get("properties") or {}).get(field) or {}
    enum = prop.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return list(enum)
    return sorted(set(truths))


def classification_report(truths: list[str], predictions: list[str], labels: list[str]) -> dict[str, Any]:
    """Accuracy, per-label and macro precision/recall/F1, confusion matrix, off-format count."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    known = set(labels)
    y_pred = [p if p in known else OFF_FORMAT for p in predictions]
    p, r, f, support = precision_recall_fscore_support(truths, y_pred, labels=labels, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(truths, y_pred, labels=labels, average="macro", zero_division=0)
    columns = [*labels, OFF_FORMAT]
    matrix = confusion_matrix(truths, y_pred, labels=columns)
    return {
        "labels": labels,
        "total": len(truths),
        "accuracy": float(accuracy_score(truths, y_pred)),
        "macro_precision": float(mp),
        "macro_recall": float(mr),
        "macro_f1": float(mf),
        "per_label": {
            label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "confusion_matrix": {"labels": columns, "rows": [[int(v) for v in row] for row in matrix[: len(labels)]]},
        "off_format": sum(1 for v in y_pred if v == OFF_FORMAT),
    }
