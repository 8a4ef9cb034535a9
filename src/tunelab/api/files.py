"""/files: upload, list, retrieve, content, delete; fine-tune uploads are validated on arrival."""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from tunelab.api.deps import Member, Principal, State
from tunelab.api.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from tunelab.api.models import get_model
from tunelab.api.protocol import Cursor, FileDeleted, FileExample, FileObject, ListPage
from tunelab.models.catalog import model_source
from tunelab.store.blobs import TooLarge
from tunelab.store.db import new_id, now
from tunelab.store.tables import FileRow

router = APIRouter(tags=["files"])

UPLOAD_PURPOSES = ("fine-tune", "assistants", "batch", "user_data", "evals", "vision")
CHUNK = 1024 * 1024
MAX_FILENAME = 255


def get_file(state: State, caller: Principal, file_id: str) -> FileRow:
    """The caller's file; another project's is as absent as one that never existed."""
    row = state.store.get(FileRow, file_id)
    if row is None or row.project_id != caller.project_id:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return row


def _filename(upload: UploadFile) -> str:
    name = upload.filename or "upload"
    if len(name) > MAX_FILENAME or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidRequest(
            f"The file name must be at most {MAX_FILENAME} characters, without control characters.", param="file"
        )
    return name


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk


@router.post("/files")
async def create_file(
    request: Request,
    state: State,
    caller: Member,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form(max_length=64)],
) -> FileObject:
    limit = state.settings.max_upload_bytes
    if int(request.headers.get("content-length") or 0) > limit + CHUNK:  # reject before reading
        raise PayloadTooLarge(f"File is larger than the {limit}-byte limit.", param="file")
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"'{purpose}' is not a valid purpose; expected one of {', '.join(UPLOAD_PURPOSES)}.", param="purpose"
        )
    filename = _filename(file)
    file_id = new_id("file")
    try:
        size = await state.blobs.write_stream(file_id, _chunks(file), limit)
    except TooLarge:
        raise PayloadTooLarge(f"File is larger than the {limit}-byte limit.", param="file") from None
    row = FileRow(
        id=file_id,
        project_id=caller.project_id,
        created_at=now(),
        filename=filename,
        purpose=purpose,
        bytes=size,
        status="processed" if purpose != "fine-tune" else "uploaded",
        blob=file_id,
    )
    if purpose == "fine-tune":
        report = await run_in_threadpool(_validate, state, file_id)
        row.validation = {k: v for k, v in report.to_dict().items() if k != "path"}  # no server paths
        row.status = "processed" if report.valid else "error"
        row.status_details = None if report.valid else report.summary()
    state.store.add_in_order(row)
    return FileObject.from_row(row)


def _validate(state: State, file_id: str):  # -> FileReport; data/ is imported lazily (heavy tokenizers)
    from tunelab.data.validate import validate_file

    return validate_file(state.blobs.path(file_id))


@router.get("/files")
def list_files(
    state: State,
    caller: Member,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    after: Cursor | None = None,
) -> ListPage[FileObject]:
    where = [FileRow.project_id == caller.project_id] + ([FileRow.purpose == purpose] if purpose else [])
    rows, more = state.store.page(FileRow, after=after, limit=limit, newest_first=order == "desc", where=where)
    return ListPage.of([FileObject.from_row(r) for r in rows], more)


@router.get("/files/{file_id}")
def retrieve_file(state: State, caller: Member, file_id: str) -> FileObject:
    return FileObject.from_row(get_file(state, caller, file_id))


@router.get("/files/{file_id}/content")
def file_content(state: State, caller: Member, file_id: str) -> FileResponse:
    row = get_file(state, caller, file_id)
    return FileResponse(state.blobs.path(row.blob), media_type="application/octet-stream", filename=row.filename)


@router.get("/files/{file_id}/validation")
def file_validation(state: State, caller: Member, file_id: str, model: str | None = None) -> dict:
    """tunelab extension: the whole validation report of a fine-tune file.

    With ``model`` (any model id), the file is counted again with that model's tokenizer and chat
    template and checked against its context, as a job on that model will see it (key "model").
    """
    row = get_file(state, caller, file_id)
    if row.validation is None:
        raise NotFound(f"File {file_id} has no validation report (purpose '{row.purpose}').", param="file_id")
    if model is None:
        return row.validation
    return _report_with_model(state.blobs.path(row.blob), _model_dir(state, caller, model))


@router.get("/files/{file_id}/examples")
def file_examples(
    state: State,
    caller: Member,
    file_id: str,
    model: str,
    after: Annotated[int, Query(ge=0, description="A line number: examples after it.")] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> ListPage[FileExample]:
    """tunelab extension: examples as training tokenizes them with ``model``'s chat template, each
    token with whether it is trained."""
    from tunelab.data.formats import iter_chat_examples
    from tunelab.data.tokenize import TemplateError, token_pieces
    from tunelab.models.folder import context_length, tokenizer_of

    row = get_file(state, caller, file_id)
    if row.status != "processed" or (row.validation or {}).get("format") not in ("chat", "prompt_completion"):
        raise InvalidRequest(
            f"File {file_id} is not a valid chat or prompt/completion file; see its validation report.",
            param="file_id",
        )
    model_dir = _model_dir(state, caller, model)
    with _TOKENIZING:
        tokenizer, max_tokens = tokenizer_of(model_dir), context_length(model_dir)
    examples: list[FileExample] = []
    for line, example in iter_chat_examples(state.blobs.path(row.blob)):
        if line <= after:
            continue
        if len(examples) == limit:
            return ListPage.of(examples, has_more=True)
        try:
            with _TOKENIZING:
                pieces = token_pieces(tokenizer, example["messages"], tools=example.get("tools"))
        except TemplateError as e:
            examples.append(
                FileExample(line=line, tokens=[], n_tokens=0, n_trained=0, max_tokens=max_tokens, error=str(e))
            )
            continue
        examples.append(FileExample.of(line, pieces, max_tokens))
    return ListPage.of(examples)


def _model_dir(state: State, caller: Principal, model: str) -> Path:
    """The folder with ``model``'s tokenizer: its base model's, or its own when fully fine-tuned.
    Another project's model is unknown (404), as everywhere."""
    get_model(state, caller, model)
    return model_source(state.store, model, state.settings.cache_path).model_dir


# A fast tokenizer is not safe to share between threads mid-call, nor is transformers' lazy import
# of it: the API loads and uses tokenizers one request at a time.
_TOKENIZING = threading.Lock()


@functools.lru_cache(maxsize=64)  # a blob never changes: its id is new for every upload
def _report_with_model(path: Path, model_dir: Path) -> dict[str, Any]:
    from tunelab.data.validate import validate_file
    from tunelab.models.folder import context_length, tokenizer_of

    with _TOKENIZING:
        report = validate_file(path, tokenizer=tokenizer_of(model_dir), max_tokens=context_length(model_dir))
    return report.to_dict()


@router.delete("/files/{file_id}")
def delete_file(state: State, caller: Member, file_id: str) -> FileDeleted:
    row = get_file(state, caller, file_id)
    busy = state.store.active_job_using(file_id)
    if busy:
        raise Conflict(f"File {file_id} is in use by fine-tuning job {busy}; cancel it first.", param="file_id")
    state.store.delete(FileRow, file_id)
    state.blobs.delete(row.blob)
    return FileDeleted(id=file_id)
