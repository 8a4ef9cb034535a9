"""``{{ item.x }}`` / ``{{ sample.output_text }}`` templates, as OpenAI's evals write them.

A template is text with ``{{ namespace.path }}`` placeholders: the namespace is ``item`` (the
data-source row) or ``sample`` (what the model answered), the path dotted names and ``[N]``
indexes (``{{ item.turns[0].text }}``). Nothing else is allowed between the braces: these are not
Jinja templates, and an unknown namespace or a malformed path is an error at create time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.S)
_STEP = re.compile(r"\.([^.\[\]\s{}]+)|\[(\d+)\]")
NAMESPACES = ("item", "sample")


class TemplateError(ValueError):
    """A placeholder that is no ``item``/``sample`` reference."""


@dataclass(frozen=True)
class Ref:
    """One placeholder: ``item.turns[0].text`` is ``Ref("item", ("turns", 0, "text"))``."""

    namespace: str
    path: tuple[str | int, ...]

    def __str__(self) -> str:
        return self.namespace + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.path)


class MissingValue(LookupError):
    """A reference the item or sample has no value for."""

    def __init__(self, ref: Ref) -> None:
        super().__init__(f"{ref} is missing")
        self.ref = ref


def parse_ref(text: str) -> Ref:
    text = text.strip()
    namespace = text.split(".", 1)[0].split("[", 1)[0]
    if namespace not in NAMESPACES:
        raise TemplateError(f"unknown template variable '{{{{{text}}}}}': use item.<field> or sample.<field>")
    rest, path, pos = text[len(namespace) :], [], 0
    while pos < len(rest):
        m = _STEP.match(rest, pos)
        if m is None:
            raise TemplateError(f"malformed template variable '{{{{{text}}}}}'")
        path.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if not path:
        raise TemplateError(f"template variable '{{{{{text}}}}}' names no field: use {namespace}.<field>")
    return Ref(namespace, tuple(path))


def references(template: str) -> list[Ref]:
    """Every placeholder of ``template``, in order.

    Raises:
        TemplateError: a placeholder that is not an item/sample reference.
    """
    return [parse_ref(m.group(1)) for m in _PLACEHOLDER.finditer(template)]


def lookup(ref: Ref, item: dict[str, Any], sample: dict[str, Any] | None) -> Any:
    value: Any = item if ref.namespace == "item" else sample
    if value is None:
        raise MissingValue(ref)
    for step in ref.path:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError):
            raise MissingValue(ref) from None
    return value


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(template: str, item: dict[str, Any], sample: dict[str, Any] | None = None) -> str:
    """``template`` with every placeholder replaced (strings as they are, other values as JSON).

    Raises:
        MissingValue: the item or sample lacks a referenced value.
    """
    return _PLACEHOLDER.sub(lambda m: as_text(lookup(parse_ref(m.group(1)), item, sample)), template)


def whole_ref(template: str) -> Ref | None:
    """The reference if ``template`` is exactly one placeholder (``"{{ item.label }}"``), else None."""
    m = _PLACEHOLDER.fullmatch(template.strip())
    return parse_ref(m.group(1)) if m else None
