"""The playground: 1-3 models side by side on one prompt, streamed, and the validation prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse

from tunelab.api import chat, deployments, files
from tunelab.api.deps import State
from tunelab.api.errors import InvalidRequest
from tunelab.api.protocol import ChatCompletionRequest
from tunelab.data.formats import iter_chat_examples
from tunelab.ui import views
from tunelab.ui.render import PageRoute, page
from tunelab.ui.session import Checked, Console

router = APIRouter(route_class=PageRoute, include_in_schema=False)
data = APIRouter(include_in_schema=False)  # what the page's chat module calls
MAX_PANES = 3


@router.get("/playground")
def playground(
    request: Request,
    state: State,
    session: Console,
    model: Annotated[list[str], Query()] = [],  # noqa: B006
    file: str = "",
) -> HTMLResponse:
    ready = [d.model_dump() for d in deployments.deployments_of(state, session.principal)]
    tuned = [f for f in files.list_files(state, session.principal, purpose="fine-tune").data if f.status == "processed"]
    context = {
        "session": session,
        "deployments": ready,
        "choices": views.model_choices(state, session.principal),
        "panes": (model or [""])[:MAX_PANES],
        "files": tuned,
        "file": file,
    }
    return page(request, "playground.html", context)


@data.post("/chat/completions")
async def chat_completions(request: Request, state: State, session: Checked, body: ChatCompletionRequest) -> Response:
    """The API's own chat route, called with the session's principal (same validation, same stream)."""
    return await chat.chat_completions(request, state, session.principal, body)


@data.get("/files/{file_id}/prompts")
def prompts(
    state: State, session: Console, file_id: str, limit: Annotated[int, Query(ge=1, le=100)] = 10
) -> dict[str, Any]:
    """A chat file's prompts (every message before the last assistant turn) and their reference answers."""
    path = Path(files.file_content(state, session.principal, file_id).path)
    found = []
    try:
        for line, example in iter_chat_examples(path):
            messages = example["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is not None:
                found.append({"line": line, "messages": messages[:last], "reference": messages[last].get("content")})
            if len(found) == limit:
                break
    except ValueError as e:
        raise InvalidRequest(f"File {file_id} has no chat prompts to run: {e}", param="file") from None
    return {"object": "list", "data": found}
