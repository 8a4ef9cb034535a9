"""Fixtures of the integration tests: one server for the session, its SDK client, the lab files uploaded."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI

from tests.conftest import SAMPLES
from tests.server import Server, start_server, stop_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("srv") / "data")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server: Server) -> OpenAI:
    return server.openai()


@pytest.fixture(scope="session")
def uploaded_lab_files(client: OpenAI) -> tuple[str, str]:
    """The bundled sample data uploaded once: (training file id, validation file id)."""
    ids = []
    for name in ("training_set.jsonl", "validation_set.jsonl"):
        with (SAMPLES / name).open("rb") as f:
            ids.append(client.files.create(file=f, purpose="fine-tune").id)
    return ids[0], ids[1]
