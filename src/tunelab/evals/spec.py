"""What an eval and a run may say, checked before anything runs (the API at create time, and the
worker again before sampling): template variables, fields the item schema lacks, models, items.

Everything here works on the stored (echoed) dict forms and raises ``SpecError`` naming the
request field; the API turns it into a 400.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.evals.graders import message_text
from tunelab.evals.templates import MissingValue, Ref, TemplateError, references, render
from tunelab.store import Store
from tunelab.store.tables import DeploymentRow, FileRow, ModelRow

SAMPLE_FIELDS = ("output_text", "choices")
"""What a completions run's ``sample`` namespace holds for graders."""


class SpecError(ValueError):
    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(frozen=True)
class Row:
    """One data-source row: the item, and the sample a jsonl source may carry."""

    item: dict[str, Any]
    sample: dict[str, Any] | None = None


# -- the eval --------------------------------------------------------------------------------------
def check_item_schema(schema: dict[str, Any]) -> None:
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise SpecError(
            f"item_schema is not a valid JSON Schema: {exc.message}", "data_source_config.item_schema"
        ) from None


def template_refs(template: str, param: str) -> list[Ref]:
    try:
        return references(template)
    except TemplateError as exc:
        raise SpecError(f"{exc} (in {param})", param) from None


def check_ref(ref: Ref, item_schema: dict[str, Any], param: str, *, sample_allowed: bool) -> None:
    """``ref`` names a field the item schema has (as far as it declares properties), or a sample field."""
    if ref.namespace == "sample":
        if not sample_allowed:
            raise SpecError(f"{param} may not use {{{{{ref}}}}}: nothing is sampled before it", param)
        if ref.path[0] not in SAMPLE_FIELDS:
            raise SpecError(
                f"unknown template variable {{{{{ref}}}}} in {param}: the sample has "
                + ", ".join(f"sample.{f}" for f in SAMPLE_FIELDS),
                param,
            )
        return
    schema = item_schema
    for step in ref.path:
        if isinstance(step, int):
            items = schema.get("items")
            schema = items if isinstance(items, dict) else {}
            continue
        props = schema.get("properties")
        if not isinstance(props, dict):
            return  # the schema says nothing more about what is below: any field may be there
        if step not in props:
            known = ", ".join(sorted(props)) or "none"
            raise SpecError(
                f"{param} uses {{{{{ref}}}}} but the item schema has no field '{step}' (its fields: {known})", param
            )
        schema = props[step] if isinstance(props[step], dict) else {}


def resolve_model(store: Store, name: str) -> str | None:
    """The model id ``name`` means: a deployment's model, else a model id itself; None if neither."""
    deployment = store.get(DeploymentRow, name)
    if deployment is not None:
        return deployment.model
    return name if store.get(ModelRow, name) is not None else None


def check_model(store: Store, name: str, param: str) -> None:
    if resolve_model(store, name) is None:
        raise SpecError(
            f"The model '{name}' does not exist: give a base model, a fine-tuned model, a checkpoint or a "
            "deployment name.",
            param,
            code="model_not_found",
        )


def check_criteria(store: Store, criteria: list[dict[str, Any]], item_schema: dict[str, Any]) -> None:
    """Every template of every criterion refers to known fields; judge models exist."""
    for i, criterion in enumerate(criteria):
        where = f"testing_criteria[{i}]"
        for key in ("input", "reference"):
            if isinstance(criterion.get(key), str):
                for ref in template_refs(criterion[key], f"{where}.{key}"):
                    check_ref(ref, item_schema, f"{where}.{key}", sample_allowed=True)
        if criterion["type"] in ("label_model", "score_model"):
            check_model(store, criterion["model"], f"{where}.model")
            for j, message in enumerate(criterion["input"]):
                param = f"{where}.input[{j}].content"
                for ref in template_refs(message_text(message), param):
                    check_ref(ref, item_schema, param, sample_allowed=True)


# -- the run ---------------------------------------------------------------------------------------
def load_rows(store: Store, blob_path: Path, source: dict[str, Any]) -> list[Row]:
    """The rows of a ``file_content`` or ``file_id`` source.

    Raises:
        SpecError: no such file, or a file that is not JSONL of objects.
    """
    if source["type"] == "file_content":
        return [Row(r["item"], r.get("sample")) for r in source["content"]]
    param = "data_source.source.id"
    row = store.get(FileRow, source["id"])
    if row is None:
        raise SpecError(f"File {source['id']} does not exist.", param, code="file_not_found")
    return list(_jsonl_rows(blob_path / row.blob, source["id"], param))


def _jsonl_rows(path: Path, file_id: str, param: str) -> Iterator[Row]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SpecError(f"File {file_id} is not JSONL: it is not UTF-8 text.", param, code="invalid_file") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise SpecError(
                f"File {file_id} is not JSONL: line {number} is not JSON ({exc}).", param, code="invalid_file"
            ) from None
        if not isinstance(data, dict):
            raise SpecError(
                f"File {file_id} is not JSONL of objects: line {number} is a {type(data).__name__}.",
                param,
                code="invalid_file",
            )
        if "item" in data and set(data) <= {"item", "sample"}:
            if not isinstance(data["item"], dict) or not isinstance(data.get("sample") or {}, dict):
                raise SpecError(f"File {file_id}, line {number}: 'item' must be an object.", param, "invalid_file")
            yield Row(data["item"], data.get("sample"))
        else:  # a bare item per line
            yield Row(data)
    return


def check_items(rows: list[Row], item_schema: dict[str, Any], param: str) -> None:
    """Every item validates against the item schema; the error names the item and the field."""
    from jsonschema.exceptions import best_match
    from jsonschema.validators import validator_for

    if not rows:
        raise SpecError("The data source has no items.", param)
    validator = validator_for(item_schema)(item_schema)
    for i, row in enumerate(rows):
        error = best_match(validator.iter_errors(row.item))
        if error is not None:
            field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
            raise SpecError(
                f"Item {i} does not match the item schema at 'item{field}': {error.message}",
                f"{param}[{i}].item{field}",
                code="invalid_item",
            )


def input_templates(data_source: dict[str, Any]) -> list[tuple[str, str]]:
    """(template, param) of each message of a template ``input_messages``."""
    messages = data_source.get("input_messages") or {}
    if messages.get("type") != "template":
        return []
    return [
        (message_text(m), f"data_source.input_messages.template[{j}].content")
        for j, m in enumerate(messages["template"])
    ]


def check_run(
    store: Store,
    blob_path: Path,
    data_source: dict[str, Any],
    item_schema: dict[str, Any],
    criteria: list[dict[str, Any]],
) -> list[Row]:
    """Check a run's data source against its eval; its rows.

    Raises:
        SpecError: unknown model, bad template variable, bad file, an item failing the schema,
            a jsonl row without the sample a grader reads, an item lacking a value a template needs.
    """
    if data_source["type"] != "jsonl":
        check_model(store, data_source["model"], "data_source.model")
        for template, param in input_templates(data_source):
            for ref in template_refs(template, param):
                check_ref(ref, item_schema, param, sample_allowed=False)
    rows = load_rows(store, blob_path, data_source["source"])
    param = "data_source.source.content" if data_source["source"]["type"] == "file_content" else "data_source.source"
    check_items(rows, item_schema, param)
    if data_source["type"] == "jsonl" and uses_sample(criteria):
        for i, row in enumerate(rows):
            if row.sample is None:
                raise SpecError(
                    f"Item {i} has no 'sample', but a grader reads sample.*: a jsonl run grades the sample each "
                    "row carries (or use a completions data source to sample a model).",
                    f"{param}[{i}].sample",
                )
    for i, row in enumerate(rows):
        prompt_of(data_source, row, i)  # every template renders: a missing value fails now, not mid-run
    return rows


def uses_sample(criteria: list[dict[str, Any]]) -> bool:
    texts = [str(c[k]) for c in criteria for k in ("input", "reference") if isinstance(c.get(k), str)]
    texts += [message_text(m) for c in criteria if isinstance(c.get("input"), list) for m in c["input"]]
    return any(ref.namespace == "sample" for t in texts for ref in references(t))


def prompt_of(data_source: dict[str, Any], row: Row, index: int) -> list[dict[str, str]] | None:
    """The chat messages a completions run sends for ``row`` (None for jsonl: nothing is sampled).

    Raises:
        SpecError: a template value the item lacks, or an item reference that is no message list.
    """
    if data_source["type"] == "jsonl":
        return None
    spec = data_source["input_messages"]
    if spec["type"] == "item_reference":
        try:
            messages = render_reference(spec["item_reference"], row.item)
        except (MissingValue, TemplateError, ValueError) as exc:
            raise SpecError(
                f"Item {index}: {exc}", "data_source.input_messages.item_reference", "invalid_item"
            ) from None
        return messages
    out = []
    for j, message in enumerate(spec["template"]):
        try:
            text = render(message_text(message), row.item)
        except MissingValue as exc:
            raise SpecError(
                f"Item {index} has no value for {{{{{exc.ref}}}}} (in data_source.input_messages.template[{j}])",
                f"data_source.source.content[{index}].item" + str(exc.ref).removeprefix("item"),
                code="invalid_item",
            ) from None
        out.append({"role": "system" if message["role"] == "developer" else message["role"], "content": text})
    return out


def render_reference(reference: str, item: dict[str, Any]) -> list[dict[str, str]]:
    from tunelab.evals.templates import lookup, parse_ref

    ref = parse_ref(reference.strip().removeprefix("{{").removesuffix("}}"))
    value = lookup(ref, item, None)
    if not (isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value)):
        raise ValueError(f"{ref} is not a list of chat messages ({{'role', 'content'}})")
    return [
        {"role": "system" if m["role"] == "developer" else str(m["role"]), "content": message_text(m)} for m in value
    ]
