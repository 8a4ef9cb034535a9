"""Chat completions: ``/v1/chat/completions`` and Azure's ``/openai/deployments/{name}/chat/completions``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from tunelab.api.deps import State
from tunelab.api.errors import APIError, InvalidRequest, NotFound, RateLimited
from tunelab.api.protocol import ChatCompletionRequest, Usage
from tunelab.serving.deployer import DeploymentFailed, DeploymentNotFound
from tunelab.serving.engine import Completion, PromptTooLong, SamplingParams
from tunelab.store.db import new_id
from tunelab.store.tables import DeploymentRow

router = APIRouter(tags=["chat"])


@router.post("/chat/completions")
async def chat_completions(state: State, body: ChatCompletionRequest):
    return await _complete(state, body, body.model)


@router.post("/deployments/{deployment:path}/chat/completions")
async def azure_chat_completions(state: State, deployment: str, body: ChatCompletionRequest):
    return await _complete(state, body, deployment)


async def _complete(state: State, body: ChatCompletionRequest, name: str):
    if body.stream and body.n > 1:
        raise InvalidRequest("Streaming supports n=1 only.", param="n")
    try:
        model = await run_in_threadpool(state.deployer.resolve, name)
    except DeploymentNotFound:
        raise NotFound(
            f"The API deployment for this resource does not exist: '{name}'. Create it with the deployments API.",
            param="model", code="DeploymentNotFound",
        ) from None
    except DeploymentFailed as exc:
        raise APIError(str(exc), code="DeploymentFailed") from None
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    params = SamplingParams(
        max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
        top_p=body.top_p, stop=body.stop_list(), seed=body.seed, n=body.n,
    )
    engine = state.deployer.engine
    completion_id, created = new_id("chatcmpl"), int(time.time())
    try:
        headers = _rate_limit(state, name, model, messages, params)
        if body.stream:
            prompt_tokens = engine.prompt_tokens(model, messages)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse(engine.stream(model, messages, params), completion_id, created, model, prompt_tokens, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        completions, prompt_tokens = await run_in_threadpool(engine.generate, model, messages, params)
    except PromptTooLong as exc:
        raise InvalidRequest(str(exc), param="messages", code="context_length_exceeded") from None
    completion_tokens = sum(c.tokens for c in completions)
    return JSONResponse(headers=headers, content={
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            for i, c in enumerate(completions)
        ],
        "usage": Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens).model_dump(),
        "system_fingerprint": None,
    })


def _rate_limit(state: State, name: str, model: str, messages: list[dict], params: SamplingParams) -> dict[str, str]:
    """Count the request against its deployment's capacity (when limits are on); 429 when over it."""
    if state.limiter is None:
        return {}
    deployment = state.store.get(DeploymentRow, name)
    if deployment is None:  # a model called by its id: no deployment, no quota
        return {}
    capacity = int((deployment.sku or {}).get("capacity") or 1)
    tokens = state.deployer.engine.prompt_tokens(model, messages) + (params.max_tokens or 0) * params.n
    decision = state.limiter.take(name, capacity, tokens)
    headers = decision.headers()
    if not decision.allowed:
        raise RateLimited(
            f"Requests to deployment '{name}' have exceeded its {decision.exceeded} rate limit "
            f"({decision.limit_requests} requests, {decision.limit_tokens} tokens per minute at capacity {capacity}). "
            f"Please retry after {headers['retry-after']} seconds.",
            limit=decision.exceeded, headers=headers,
        )
    return headers


def _sse(
    pieces: Iterator[str | Completion], cid: str, created: int, model: str, prompt_tokens: int, include_usage: bool
) -> Iterator[str]:
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}])
    try:
        for piece in pieces:
            if isinstance(piece, Completion):
                yield chunk([{"index": 0, "delta": {}, "finish_reason": piece.finish_reason, "logprobs": None}])
                if include_usage:
                    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=piece.tokens,
                                  total_tokens=prompt_tokens + piece.tokens)
                    yield chunk([], usage.model_dump())
            else:
                yield chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None, "logprobs": None}])
    except Exception:  # headers are sent: report in-band, the way OpenAI streams errors
        yield f"data: {json.dumps({'error': {'message': 'generation failed', 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
    yield "data: [DONE]\n\n"
