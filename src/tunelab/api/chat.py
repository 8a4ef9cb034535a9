"""Chat completions: ``/v1/chat/completions`` and Azure's ``/openai/deployments/{name}/chat/completions``.

The route shapes wire objects; which model answers, its rate limit and the generation itself are
``serving.chat.ChatService``'s. Nothing here blocks the event loop or holds a thread while a model
generates: the route awaits the engine's ``Generation``, and cancels it the moment its client goes
away (a closed stream, or a disconnect while a non-streamed answer is being made), so an abandoned
request stops at the engine's next decode step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tunelab.api.deps import Caller, Principal, State
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
from tunelab.serving.generation import Cancelled, Completion, Done, Generation
from tunelab.store.db import new_id

router = APIRouter(tags=["chat"])
log = logging.getLogger("tunelab.api")

CLIENT_GONE = 499
"""Logged for a request whose client disconnected before its answer (nginx's convention)."""


# A ChatCompletion, or with ``stream`` an event stream of ChatCompletionChunks.
@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(request: Request, state: State, caller: Caller, body: ChatCompletionRequest) -> Response:
    return await _complete(request, state, caller, body, body.model)


@router.post("/deployments/{deployment:path}/chat/completions", response_model=ChatCompletion)
async def azure_chat_completions(
    request: Request, state: State, caller: Caller, deployment: str, body: ChatCompletionRequest
) -> Response:
    return await _complete(request, state, caller, body, deployment)


async def _complete(
    request: Request, state: State, caller: Principal, body: ChatCompletionRequest, name: str
) -> Response:
    if body.stream and body.n > 1:
        raise InvalidRequest("Streaming supports n=1 only.", param="n")
    params = body.sampling_params()
    limit = state.settings.max_tokens_limit
    if params.max_tokens is not None and params.max_tokens > limit:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise InvalidRequest(f"{param} is {params.max_tokens}; this server allows at most {limit}.", param=param)
    admitted, generation = await state.chat.start(
        name, body.chat_messages(), params, stream=body.stream, project=caller.project_id
    )
    completion_id, created = new_id("chatcmpl"), int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = ChatCompletionChunk(id=completion_id, created=created, model=admitted.model, choices=[])
        events = _sse(generation, head, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers=admitted.headers)
    completions = await _unless_client_leaves(request, generation)
    if completions is None:
        return Response(status_code=CLIENT_GONE)
    completion = ChatCompletion(
        id=completion_id,
        created=created,
        model=admitted.model,
        choices=[
            Choice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
            for i, c in enumerate(completions)
        ],
        usage=Usage.of(generation.prompt_tokens, sum(c.tokens for c in completions)),
    )
    return JSONResponse(completion.model_dump(), headers=admitted.headers)


async def _unless_client_leaves(request: Request, generation: Generation) -> list[Completion] | None:
    """The completions, or None (the generation cancelled) if the client disconnects first."""
    answer = asyncio.ensure_future(generation.wait())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this task is cancelled (server shutdown)
        gone.cancel()
        if not answer.done():
            generation.cancel()
            answer.cancel()
    if answer.cancelled() or isinstance(answer.exception(), Cancelled):
        return None
    return answer.result()


async def _disconnected(request: Request) -> None:
    # The body has been read: what the server sends next is http.disconnect, when the client leaves.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(generation: Generation, head: ChatCompletionChunk, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return head.model_copy(update={"choices": choices, "usage": usage}).sse(include_usage)

    try:
        yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
        async for event in generation:
            if isinstance(event, Done):
                yield chunk([ChunkChoice(delta=Delta(), finish_reason=event.completion.finish_reason)])
                if include_usage:
                    yield chunk([], Usage.of(generation.prompt_tokens, event.completion.tokens))
            else:
                yield chunk([ChunkChoice(delta=Delta(content=event.text))])
    except Cancelled:  # by the server (shutdown): say so in-band, as OpenAI streams errors
        yield f"data: {json.dumps(error_body('generation cancelled: the server is shutting down', 'server_error'))}\n\n"
    except Exception:  # headers are sent: report in-band
        log.exception("streamed generation failed")
        yield f"data: {json.dumps(error_body('generation failed', 'server_error'))}\n\n"
    finally:  # the client closed the stream (or any other way out): free the engine's row
        generation.cancel()
    yield "data: [DONE]\n\n"
