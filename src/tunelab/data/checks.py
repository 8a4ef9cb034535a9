"""Structural checks of one example's messages, as the OpenAI fine-tuning API defines them.

Each check returns a list of ``Problem`` (code, message); the caller adds the line number.
Messages are user data, so every field is type-checked before it is used.
"""

from __future__ import annotations

import json
from typing import Any

Problem = tuple[str, str]
"""(code, message) of one error; see docs/data-validation.md for the codes."""

ROLES = ("system", "user", "assistant", "tool", "function")
_COMMON_KEYS = frozenset({"role", "content", "name"})
ALLOWED_KEYS: dict[str, frozenset[str]] = {
    "system": _COMMON_KEYS,
    "user": _COMMON_KEYS,
    "assistant": _COMMON_KEYS | {"weight", "tool_calls", "function_call"},
    "tool": _COMMON_KEYS | {"tool_call_id"},
    "function": _COMMON_KEYS,  # the legacy function-calling reply
}


def check_messages(messages: Any, where: str, *, need_trained: bool) -> list[Problem]:
    """Check a list of chat messages.

    Args:
        messages: the value found under "messages" (anything JSON can hold).
        where: how to name the list in messages, e.g. "messages" or "input.messages".
        need_trained: require an assistant message with weight 1 (chat examples do; the input
            of a preference example does not, its outputs are the trained part).
    """
    if not isinstance(messages, list) or not messages:
        return [("missing_messages", f'"{where}" must be a non-empty list of messages')]
    problems: list[Problem] = []
    call_ids: set[str] = set()
    trained = False
    for i, message in enumerate(messages):
        if _is_plain(message):
            trained = trained or message["role"] == "assistant"
            continue
        problems += check_message(message, f"{where}[{i}]", call_ids)
        if isinstance(message, dict) and message.get("role") == "assistant":
            # An invalid weight is reported as such, not once more as "nothing to train on".
            trained = trained or message.get("weight", 1) != 0
    if need_trained and not trained:
        problems.append(("no_trained_assistant", f'"{where}" has no assistant message with weight 1 to train on'))
    return problems


def _is_plain(message: Any) -> bool:
    """A valid system, user or assistant message with string content and nothing else.

    Nearly every message is one; this one test spares them the full check (validation speed).
    """
    if type(message) is not dict or type(message.get("content")) is not str:
        return False
    role = message.get("role")
    # Comparisons, not set membership: a role may be any JSON value, e.g. an unhashable list.
    return (
        (role == "user" or role == "assistant" or role == "system")
        and message.keys() <= _COMMON_KEYS
        and type(message.get("name", "")) is str
    )


def check_message(message: Any, where: str, call_ids: set[str]) -> list[Problem]:
    """Check one message; ``call_ids`` collects tool call ids for later tool messages."""
    if not isinstance(message, dict):
        return [("invalid_message", f"{where} must be an object, not {_kind(message)}")]
    role = message.get("role")
    if not isinstance(role, str) or role not in ALLOWED_KEYS:
        expected = ", ".join(ROLES)
        found = "no role" if role is None else f"role {_short(role)}"
        return [("unrecognized_role", f"{where} has {found} (expected one of {expected})")]
    problems: list[Problem] = []
    unknown = message.keys() - ALLOWED_KEYS[role]
    if unknown:
        keys = ", ".join(sorted(_short(k) for k in unknown))
        problems.append(("unrecognized_key", f"{where} ({role}) has unrecognized key {keys}"))
    if "name" in message and not isinstance(message["name"], str):
        problems.append(("invalid_message", f'{where}: "name" must be a string'))
    content = message.get("content")
    if content is not None and not _is_text_content(content):
        problems.append(("invalid_content", f'{where}: "content" must be a string or a list of text parts'))
    if role == "assistant":
        problems += _check_assistant(message, where, call_ids)
    elif content is None:
        problems.append(("missing_content", f'{where} ({role}) has no "content"'))
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or call_id not in call_ids:
            problems.append(
                (
                    "orphan_tool_message",
                    f"{where}: tool message answers no earlier tool call"
                    + (f" (tool_call_id {_short(call_id)})" if call_id is not None else " (no tool_call_id)"),
                )
            )
    return problems


def _check_assistant(message: dict[str, Any], where: str, call_ids: set[str]) -> list[Problem]:
    problems: list[Problem] = []
    weight = message.get("weight", 1)
    # bool is an int in Python, but JSON true/false is not a weight.
    if isinstance(weight, bool) or weight not in (0, 1):
        problems.append(("invalid_weight", f'{where}: "weight" must be 0 or 1, not {_short(weight)}'))
    calls = message.get("tool_calls")
    function_call = message.get("function_call")
    if calls is not None:
        problems += _check_tool_calls(calls, f"{where}.tool_calls", call_ids)
    if function_call is not None and not _is_function(function_call):
        problems.append(
            ("invalid_tool_call", f"{where}.function_call must have a string name and JSON string arguments")
        )
    if message.get("content") is None and calls is None and function_call is None:
        problems.append(("missing_content", f'{where} (assistant) has neither "content" nor "tool_calls"'))
    return problems


def _check_tool_calls(calls: Any, where: str, call_ids: set[str]) -> list[Problem]:
    if not isinstance(calls, list) or not calls:
        return [("invalid_tool_call", f"{where} must be a non-empty list")]
    problems: list[Problem] = []
    for j, call in enumerate(calls):
        here = f"{where}[{j}]"
        if not isinstance(call, dict):
            problems.append(("invalid_tool_call", f"{here} must be an object"))
            continue
        if not isinstance(call.get("id"), str) or not call["id"]:
            problems.append(("invalid_tool_call", f'{here} needs a string "id"'))
        else:
            call_ids.add(call["id"])
        if call.get("type") != "function":
            problems.append(("invalid_tool_call", f'{here}: "type" must be "function"'))
        if not _is_function(call.get("function")):
            problems.append(
                ("invalid_tool_call", f'{here}: "function" must have a string name and JSON string arguments')
            )
    return problems


def check_tools(example: dict[str, Any], where: str = "") -> list[Problem]:
    """Check the optional "tools" and "parallel_tool_calls" fields of a chat example."""
    problems: list[Problem] = []
    tools = example.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(_is_tool(tool) for tool in tools)):
        shape = '{"type": "function", "function": {"name": ...}}'
        problems.append(("invalid_tools", f'"{where}tools" must be a list of {shape}'))
    parallel = example.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        problems.append(("invalid_tools", f'"{where}parallel_tool_calls" must be true or false'))
    return problems


def _is_tool(tool: Any) -> bool:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        return False
    function = tool.get("function")
    return isinstance(function, dict) and isinstance(function.get("name"), str) and bool(function["name"])


def _is_function(function: Any) -> bool:
    if not isinstance(function, dict):
        return False
    name, arguments = function.get("name"), function.get("arguments")
    if not isinstance(name, str) or not name or not isinstance(arguments, str):
        return False
    try:
        json.loads(arguments)
    except (ValueError, RecursionError):
        return False
    return True


def _is_text_content(content: Any) -> bool:
    if isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    )


def is_trained(message: dict[str, Any]) -> bool:
    """A checked assistant message the loss is computed on (weight 1, the default)."""
    return bool(message["role"] == "assistant" and message.get("weight", 1) == 1)


def content_text(content: Any) -> str:
    """The text of a checked content value: the string, the text parts joined, or ""."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return ""


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."
