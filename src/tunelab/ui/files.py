"""Files: the table, uploads with progress, delete, and each file's validation report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse

from tunelab.api import files
from tunelab.api.deps import AppState, Principal, State
from tunelab.api.errors import NotFound
from tunelab.api.protocol import FileObject
from tunelab.data.lines import read_lines
from tunelab.ui import views
from tunelab.ui.render import PageRoute, page
from tunelab.ui.session import Checked, Console

router = APIRouter(route_class=PageRoute, include_in_schema=False)
EXAMPLES_PER_PAGE = 5


def _table(state: AppState, caller: Principal) -> dict[str, Any]:
    rows = []
    for f in files.list_files(state, caller).data:
        report = _report(state, caller, f)
        rows.append((f, report["examples"] if report else None))
    return {"rows": rows}


def _report(state: AppState, caller: Principal, f: FileObject, model: str | None = None) -> dict | None:
    try:
        return files.file_validation(state, caller, f.id, model)
    except NotFound:  # not a fine-tune file
        return None


@router.get("/files")
def files_page(request: Request, state: State, session: Console) -> HTMLResponse:
    return page(request, "files.html", {"session": session, **_table(state, session.principal)})


@router.post("/files")
async def upload(
    request: Request,
    state: State,
    session: Checked,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()] = "fine-tune",
) -> HTMLResponse:
    created = await files.create_file(request, state, session.principal, file, purpose)
    context = {"session": session, "uploaded": created, **_table(state, session.principal)}
    return page(request, "partials/files_table.html", context)


@router.post("/files/{file_id}/delete")
def delete(request: Request, state: State, session: Checked, file_id: str) -> HTMLResponse:
    files.delete_file(state, session.principal, file_id)
    return page(request, "partials/files_table.html", {"session": session, **_table(state, session.principal)})


@router.get("/files/{file_id}")
def report_page(request: Request, state: State, session: Console, file_id: str) -> HTMLResponse:
    f = files.retrieve_file(state, session.principal, file_id)
    report = _report(state, session.principal, f)
    lines = {}
    if report and report["errors"]:
        numbers = {e["line"] for e in report["errors"] if e["line"] is not None}
        lines = read_lines(_path(state, session.principal, file_id), numbers)
    bases = views.model_choices(state, session.principal).base
    context = {"session": session, "file": f, "report": report, "lines": lines, "bases": bases}
    return page(request, "file.html", context)


@router.get("/files/{file_id}/tokens")
def tokens(request: Request, state: State, session: Console, file_id: str, model: str) -> HTMLResponse:
    """Token statistics with ``model``'s tokenizer, the histogram with its context cut-off."""
    report = files.file_validation(state, session.principal, file_id, model)
    return page(request, "partials/file_tokens.html", {"report": report, "model": model})


@router.get("/files/{file_id}/examples")
def examples(
    request: Request, state: State, session: Console, file_id: str, model: str, after: int = 0
) -> HTMLResponse:
    """The chat viewer: examples as training tokenizes them, trained tokens shaded."""
    listed = files.file_examples(state, session.principal, file_id, model, after, EXAMPLES_PER_PAGE)
    context = {"examples": listed.data, "more": listed.has_more, "file_id": file_id, "model": model}
    return page(request, "partials/file_examples.html", context)


@router.get("/files/{file_id}/content")
def content(state: State, session: Console, file_id: str) -> FileResponse:
    return files.file_content(state, session.principal, file_id)


def _path(state: AppState, caller: Principal, file_id: str) -> Path:
    return Path(files.file_content(state, caller, file_id).path)
