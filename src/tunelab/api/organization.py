"""/organization: projects, their API keys and the admin keys (OpenAI's Administration API shapes).

Admin keys manage everything here; a project's owner key may list, create and revoke its own
project's keys. Creating a project key (``POST .../api_keys``) is a tunelab extension: OpenAI
creates them in its dashboard. A new key's ``value`` is in that answer only; it is stored hashed.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from tunelab.api.deps import Caller, Principal, State
from tunelab.api.errors import Forbidden, InvalidRequest, NotFound
from tunelab.api.protocol import (
    AdminApiKey,
    CreateAdminApiKey,
    CreateProject,
    CreateProjectApiKey,
    Cursor,
    KeyDeleted,
    ListPage,
    ModifyProject,
    Project,
    ProjectApiKey,
)
from tunelab.store.keys import CONFIGURED_ADMIN, Role
from tunelab.store.tables import ApiKeyRow, ProjectRow

router = APIRouter(prefix="/organization", tags=["organization"])
Limit = Annotated[int, Query(ge=1, le=100)]


def _admin(caller: Principal) -> None:
    if not caller.is_admin:
        raise Forbidden("Only an admin key may manage the organization's projects and admin keys.")


def _project(state: State, caller: Principal, project_id: str, *, keys: bool = False) -> ProjectRow:
    """A project the caller may manage (``keys``: its keys); 404 for one it may not see."""
    if not (caller.may_manage_keys_of(project_id) if keys else caller.is_admin):
        if caller.project_id == project_id:
            raise Forbidden("This key's role may not manage its project.")
        raise NotFound(f"No such project: {project_id}", param="project_id")
    row = state.keys.project(project_id)
    if row is None:
        raise NotFound(f"No such project: {project_id}", param="project_id")
    return row


def _page(items: list, after: str | None, limit: int) -> tuple[list, bool]:
    """OpenAI's cursor paging over a short list, oldest first."""
    ids = [i.id for i in items]
    start = ids.index(after) + 1 if after in ids else 0
    return items[start : start + limit], len(items) > start + limit


# -- projects --------------------------------------------------------------------------------------
@router.get("/projects")
def list_projects(
    state: State, caller: Caller, after: Cursor | None = None, limit: Limit = 20, include_archived: bool = False
) -> ListPage[Project]:
    _admin(caller)
    rows, more = _page(state.keys.projects(include_archived=include_archived), after, limit)
    return ListPage.of([Project.from_row(r) for r in rows], more)


@router.post("/projects")
def create_project(state: State, caller: Caller, body: CreateProject) -> Project:
    _admin(caller)
    return Project.from_row(state.keys.create_project(body.name))


@router.get("/projects/{project_id}")
def retrieve_project(state: State, caller: Caller, project_id: str) -> Project:
    return Project.from_row(_project(state, caller, project_id))


@router.post("/projects/{project_id}")
def modify_project(state: State, caller: Caller, project_id: str, body: ModifyProject) -> Project:
    _project(state, caller, project_id)
    row = state.keys.rename_project(project_id, body.name)
    assert row is not None
    return Project.from_row(row)


@router.post("/projects/{project_id}/archive")
def archive_project(state: State, caller: Caller, project_id: str) -> Project:
    """Its keys stop working at once; its files, jobs and models stay."""
    _project(state, caller, project_id)
    try:
        row = state.keys.archive_project(project_id)
    except ValueError as e:
        raise InvalidRequest(str(e), param="project_id") from None
    assert row is not None
    return Project.from_row(row)


# -- project API keys ------------------------------------------------------------------------------
def _project_key(state: State, caller: Principal, project_id: str, key_id: str) -> ApiKeyRow:
    _project(state, caller, project_id, keys=True)
    row = state.keys.get(key_id)
    if row is None or row.project_id != project_id:
        raise NotFound(f"No such API key: {key_id}", param="key_id")
    return row


@router.get("/projects/{project_id}/api_keys")
def list_project_keys(
    state: State, caller: Caller, project_id: str, after: Cursor | None = None, limit: Limit = 20
) -> ListPage[ProjectApiKey]:
    _project(state, caller, project_id, keys=True)
    rows, more = _page(state.keys.keys(project_id=project_id), after, limit)
    return ListPage.of([ProjectApiKey.from_row(r) for r in rows], more)


@router.post("/projects/{project_id}/api_keys")
def create_project_key(state: State, caller: Caller, project_id: str, body: CreateProjectApiKey) -> ProjectApiKey:
    if _project(state, caller, project_id, keys=True).archived_at is not None:
        raise InvalidRequest(f"Project {project_id} is archived.", param="project_id")
    row, key = state.keys.create(role=Role(body.role), project_id=project_id, name=body.name)
    return ProjectApiKey.from_row(row, value=key)


@router.get("/projects/{project_id}/api_keys/{key_id}")
def retrieve_project_key(state: State, caller: Caller, project_id: str, key_id: str) -> ProjectApiKey:
    return ProjectApiKey.from_row(_project_key(state, caller, project_id, key_id))


@router.delete("/projects/{project_id}/api_keys/{key_id}")
def delete_project_key(state: State, caller: Caller, project_id: str, key_id: str) -> KeyDeleted:
    """Revoke the key: requests with it get 401 from now on."""
    _project_key(state, caller, project_id, key_id)
    state.keys.revoke(key_id)
    return KeyDeleted(object="organization.project.api_key.deleted", id=key_id)


# -- admin API keys --------------------------------------------------------------------------------
def _admin_key(state: State, key_id: str) -> ApiKeyRow:
    row = state.keys.get(key_id)
    if row is None or row.project_id is not None:
        raise NotFound(f"No such admin API key: {key_id}", param="key_id")
    return row


@router.get("/admin_api_keys")
def list_admin_keys(
    state: State, caller: Caller, after: Cursor | None = None, limit: Limit = 20
) -> ListPage[AdminApiKey]:
    _admin(caller)
    rows, more = _page(state.keys.keys(project_id=None, admin=True), after, limit)
    return ListPage.of([AdminApiKey.from_row(r) for r in rows], more)


@router.post("/admin_api_keys")
def create_admin_key(state: State, caller: Caller, body: CreateAdminApiKey) -> AdminApiKey:
    _admin(caller)
    row, key = state.keys.create(role=Role.ADMIN, project_id=None, name=body.name)
    return AdminApiKey.from_row(row, value=key)


@router.get("/admin_api_keys/{key_id}")
def retrieve_admin_key(state: State, caller: Caller, key_id: str) -> AdminApiKey:
    _admin(caller)
    return AdminApiKey.from_row(_admin_key(state, key_id))


@router.delete("/admin_api_keys/{key_id}")
def delete_admin_key(state: State, caller: Caller, key_id: str) -> KeyDeleted:
    _admin(caller)
    _admin_key(state, key_id)
    if key_id == CONFIGURED_ADMIN:
        raise InvalidRequest("This key is TUNELAB_API_KEY; change or unset that setting instead.", param="key_id")
    if key_id == caller.key_id:
        raise InvalidRequest("A key cannot revoke itself; use another admin key.", param="key_id")
    state.keys.revoke(key_id)
    return KeyDeleted(object="organization.admin_api_key.deleted", id=key_id)
