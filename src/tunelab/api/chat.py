"""Chat completions: ``/v1/chat/completions`` and Azure's ``/openai/deployments/{name}/chat/completions``.

The route shapes wire objects; which model answers, its rate limit and the generation itself are
``serving.chat.ChatService``'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tunelab.api.deps import Caller, State
from tunelab.api.errors import InvalidRequest, error_body
from tunelab.api.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)
from tunelab.serving.engine import Completion
from tunelab.store.db import new_id

router = APIRouter(tags=["chat"])


# A ChatCompletion, or with ``stream`` an event stream of ChatCompletionChunks.
@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(state: State, caller: Caller, body: ChatCompletionRequest) -> Response:
    return await _complete(state, body, body.model)


@router.post("/deployments/{deployment:path}/chat/completions", response_model=ChatCompletion)
async def azure_chat_completions(
    state: State, caller: Caller, deployment: str, body: ChatCompletionRequest
) -> Response:
    return await _complete(state, body, deployment)


async def _complete(state: State, body: ChatCompletionRequest, name: str) -> Response:
    if body.stream and body.n > 1:
        raise InvalidRequest("Streaming supports n=1 only.", param="n")
    messages, params = body.chat_messages(), body.sampling_params()
    admitted = await run_in_threadpool(state.chat.admit, name, messages, params)
    completion_id, created = new_id("chatcmpl"), int(time.time())
    if body.stream:
        prompt_tokens, pieces = state.chat.stream(admitted.model, messages, params)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _sse(
            pieces,
            ChatCompletionChunk(id=completion_id, created=created, model=admitted.model, choices=[]),
            prompt_tokens,
            include_usage,
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=admitted.headers)
    completions, prompt_tokens = await run_in_threadpool(state.chat.generate, admitted.model, messages, params)
    completion = ChatCompletion(
        id=completion_id,
        created=created,
        model=admitted.model,
        choices=[
            Choice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
            for i, c in enumerate(completions)
        ],
        usage=Usage.of(prompt_tokens, sum(c.tokens for c in completions)),
    )
    return JSONResponse(completion.model_dump(), headers=admitted.headers)


def _sse(
    pieces: Iterator[str | Completion], head: ChatCompletionChunk, prompt_tokens: int, include_usage: bool
) -> Iterator[str]:
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return head.model_copy(update={"choices": choices, "usage": usage}).sse(include_usage)

    yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
    try:
        for piece in pieces:
            if isinstance(piece, Completion):
                yield chunk([ChunkChoice(delta=Delta(), finish_reason=piece.finish_reason)])
                if include_usage:
                    yield chunk([], Usage.of(prompt_tokens, piece.tokens))
            else:
                yield chunk([ChunkChoice(delta=Delta(content=piece))])
    except Exception:  # headers are sent: report in-band, the way OpenAI streams errors
        yield f"data: {json.dumps(error_body('generation failed', 'server_error'))}\n\n"
    yield "data: [DONE]\n\n"
