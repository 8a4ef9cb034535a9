"""Token counts of one checked example: total and trained-assistant tokens.

Two counters with one method, ``count(conversation) -> (total, assistant) | None``:

- ``TiktokenCounter`` counts as the OpenAI cookbook (and the lab's ``num_tokens_from_messages``)
  does: 3 tokens per message plus its encoded string fields, 1 more for a name, 3 for the reply
  primer. Structured fields the cookbook never met are counted as their strings: text parts,
  tool call names and arguments, tool_call_id, and the tools list as compact JSON.
- ``ModelCounter`` renders the base model's chat template, which is what training really sees.
"""

from __future__ import annotations

import json
from typing import Any

from tunelab.data.checks import ROLES, content_text, is_trained
from tunelab.data.encodings import get_encoding
from tunelab.data.formats import Conversation
from tunelab.data.textcount import TextCounter

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMER_TOKENS = 3


class TiktokenCounter:
    """Counts with a tiktoken encoding (strings and words seen before are not encoded again)."""

    def __init__(self, encoding: str) -> None:
        self.name = encoding
        # encode_ordinary, not encode: special-token text such as "<|endoftext|>" in a user's data
        # is ordinary text to count, not a reason to fail. Otherwise the counts are identical.
        self._tokens = TextCounter(get_encoding(encoding).encode_ordinary).count
        self._per_role = {role: TOKENS_PER_MESSAGE + self._tokens(role) for role in ROLES}

    def count(self, conversation: Conversation) -> tuple[int, int]:
        n = self._tokens
        total = REPLY_PRIMER_TOKENS
        assistant = 0
        for message in conversation.messages:
            role = message["role"]
            content = message.get("content")
            body = n(content if type(content) is str else content_text(content))
            if role == "assistant":
                body += self._call_tokens(message)
                if is_trained(message):
                    assistant += body
            total += self._per_role[role] + body
            if "name" in message:
                total += n(message["name"]) + TOKENS_PER_NAME
            if "tool_call_id" in message:
                total += n(message["tool_call_id"])
        if conversation.tools:
            total += n(json.dumps(conversation.tools, separators=(",", ":"), ensure_ascii=False))
        return total, assistant

    def _call_tokens(self, message: dict[str, Any]) -> int:
        n = self._tokens
        count = 0
        for call in message.get("tool_calls") or ():
            count += n(call["function"]["name"]) + n(call["function"]["arguments"])
        function_call = message.get("function_call")
        if function_call is not None:
            count += n(function_call["name"]) + n(function_call["arguments"])
        return count


class ModelCounter:
    """Counts with a Hugging Face tokenizer and its chat template, as training tokenizes.

    The assistant tokens of a trained turn are the tokens the turn adds to the rendered
    conversation after the generation prompt, so they include the template's end-of-turn marker.
    """

    name = "model"

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def count(self, conversation: Conversation) -> tuple[int, int] | None:
        """(total, assistant), or None when the chat template cannot render the example."""
        messages = [_template_message(m) for m in conversation.messages]
        try:
            total = self._render(messages, conversation.tools, generation_prompt=False)
            assistant = 0
            for i, message in enumerate(conversation.messages):
                if is_trained(message):
                    with_turn = self._render(messages[: i + 1], conversation.tools, generation_prompt=False)
                    before = self._render(messages[:i], conversation.tools, generation_prompt=True)
                    assistant += max(0, with_turn - before)
        except Exception:  # noqa: BLE001 - any template may fail on any user data; reported as a warning
            return None
        return total, assistant

    def _render(self, messages: list[dict[str, Any]], tools: list[Any] | None, *, generation_prompt: bool) -> int:
        text = self._tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )
        # The template writes its own special tokens; add none (as apply_chat_template(tokenize=True)).
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    # Templates expect string content and know nothing of tunelab's "weight".
    shaped = {key: value for key, value in message.items() if key != "weight"}
    if isinstance(message.get("content"), list):
        shaped["content"] = content_text(message["content"])
    return shaped
