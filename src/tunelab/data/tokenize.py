"""Chat example → ``input_ids`` and ``labels`` with the model's own chat template.

The loss mask is derived from the template, not hardcoded for one model family: for every
trained assistant message we render the conversation up to the turn *with the generation
prompt* (``<|im_start|>assistant\\n`` for ChatML) and up to the end of the turn. The characters
in between are that turn's answer plus the template's end-of-turn marker; trailing whitespace
the template adds after the marker (ChatML's ``\\n``) is not trained because the model never
generates it. Both renderings must be prefixes of the full rendering (the *prefix property*);
templates that rewrite earlier turns (e.g. dropping reasoning from past turns) are refused.

The full text is tokenized once, exactly as at inference time, and a token is trained when it
starts inside a trained character span (token offsets from the fast tokenizer).

Pure (the tokenizer is passed in), so the trainer, the API and the console share it: the console
shades the tokens that ``token_pieces`` marks, the same ones ``tokenize_chat`` labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # labels with this value take no loss (torch cross_entropy's ignore_index)


class TemplateError(ValueError):
    """The chat template cannot be split into per-message spans."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE_INDEX where no loss is taken
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        """Tokens that take loss (what OpenAI bills as trained tokens)."""
        return sum(label != IGNORE_INDEX for label in self.labels)

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    max_length: int | None = None,
    *,
    tools: list[Any] | None = None,
) -> TokenizedExample:
    """Tokenize one chat with labels on the trained assistant turns.

    Args:
        tokenizer: a fast tokenizer with a chat template.
        messages: OpenAI chat messages; an assistant message trains unless it has ``weight: 0``.
        max_length: keep at most this many tokens (the end is cut off).
        tools: the example's tool definitions, for templates that render them.

    Raises:
        TemplateError: the template fails on these messages or does not render them prefix by prefix.
    """
    _text, input_ids, _starts, trained = _encode(tokenizer, messages, tools)
    labels = [token if take else IGNORE_INDEX for token, take in zip(input_ids, trained, strict=True)]
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedExample(input_ids=input_ids, labels=labels, truncated=truncated)


@dataclass(frozen=True)
class PreferencePair:
    """A preference example tokenized for DPO: the input followed by each of its two outputs.

    Only the output's tokens (its end-of-turn marker included) are trained in each sequence.
    """

    chosen: TokenizedExample
    rejected: TokenizedExample

    @property
    def n_trained(self) -> int:
        return self.chosen.n_trained + self.rejected.n_trained

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def tokenize_preference(
    tokenizer: PreTrainedTokenizerBase, example: dict[str, Any], max_length: int | None = None
) -> PreferencePair:
    """Tokenize a preference example (``formats.preference_example`` spelling) with the chat template.

    Assistant turns inside ``input.messages`` are context, not trained; a ``weight`` on an output
    is ignored (DPO compares the two outputs whole).

    Raises:
        TemplateError: as ``tokenize_chat``.
    """
    source = example["input"]
    context = [m | {"weight": 0} if m["role"] == "assistant" else m for m in source["messages"]]
    tools = source.get("tools")

    def with_output(key: str) -> TokenizedExample:
        output = example[key][0] | {"weight": 1}
        return tokenize_chat(tokenizer, [*context, output], max_length, tools=tools)

    return PreferencePair(chosen=with_output("preferred_output"), rejected=with_output("non_preferred_output"))


def token_pieces(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *, tools: list[Any] | None = None
) -> list[tuple[str, bool]]:
    """The rendered chat cut into its tokens: (text, trained) for each token ``tokenize_chat`` makes.

    The texts join to the rendered chat. A character that several tokens share (a byte-level
    tokenizer splitting one emoji) goes to the first of them; the others get "".

    Raises:
        TemplateError: as ``tokenize_chat``.
    """
    text, _ids, starts, trained = _encode(tokenizer, messages, tools)
    bounds: list[int] = []
    for start in starts:  # monotonic, so that the pieces tile the text
        bounds.append(max(start, bounds[-1]) if bounds else 0)
    bounds.append(len(text))
    return [(text[bounds[i] : bounds[i + 1]], trained[i]) for i in range(len(starts))]


def _encode(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[Any] | None
) -> tuple[str, list[int], list[int], list[bool]]:
    """The rendered text, its token ids, each token's start offset and whether it is trained."""
    text, spans = trained_char_spans(tokenizer, messages, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _end in enc["offset_mapping"]]
    trained = [any(lo <= start < hi for lo, hi in spans) for start in starts]
    return text, list(enc["input_ids"]), starts, trained


def trained_char_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[Any] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return the text with the ``[start, end)`` spans that take loss."""
    chat = [template_message(m) for m in messages]
    full = _render(tokenizer, chat, tools, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        prompt = _render(tokenizer, chat[:i], tools, generation_prompt=True)
        upto = _render(tokenizer, chat[: i + 1], tools, generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(prompt)):
            raise TemplateError(
                f"the chat template does not render message {i} as a continuation of the earlier "
                "messages, so its loss mask cannot be found"
            )
        spans.append((len(prompt), len(upto.rstrip())))
    return full, spans


_TEMPLATE_KEYS = ("name", "tool_calls", "tool_call_id")


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI message as chat templates expect it: text content, no tunelab fields (``weight``).

    A tool-calling assistant message may have no content, and content may be a list of parts;
    simple templates can only concatenate strings.
    """
    content = message.get("content") or ""
    if isinstance(content, list):
        content = "".join(part["text"] for part in content if part.get("type") == "text")
    out = {"role": message["role"], "content": content}
    out |= {key: message[key] for key in _TEMPLATE_KEYS if key in message}
    return out


def _render(
    tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, Any]], tools: list[Any] | None, *, generation_prompt: bool
) -> str:
    try:
        text = tokenizer.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)
    except (jinja2.TemplateError, TypeError) as e:  # TypeError: e.g. a template adding str and None
        raise TemplateError(f"the model's chat template failed on this example: {e}") from None
    assert isinstance(text, str)
    return text
