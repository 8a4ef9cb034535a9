"""Blob storage: uploaded files and job outputs as plain files under one folder."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

TEMP_PREFIX = ".upload-"


class TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._temp = f"{TEMP_PREFIX}{socket.gethostname()}-{os.getpid()}-"

    def sweep_abandoned(self) -> int:
        """Delete the partial uploads of processes on this host that died mid-upload (killed, a
        power cut); returns how many. Uploads in progress elsewhere are left alone."""
        host, swept = socket.gethostname(), 0
        for tmp in self.root.glob(f"{TEMP_PREFIX}{host}-*"):
            pid = tmp.name.removeprefix(f"{TEMP_PREFIX}{host}-").split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)
                swept += 1
        return swept

    def path(self, key: str) -> Path:
        return self.root / key

    async def write_stream(self, key: str, chunks: AsyncIterator[bytes], limit: int) -> int:
        """Stream chunks to ``key`` without holding them in memory; atomic on success.

        Raises:
            TooLarge: more than ``limit`` bytes arrived; nothing is left behind.
        """
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=self._temp)
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(limit)
                    out.write(chunk)
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return size

    def copy_in(self, key: str, source: Path) -> int:
        shutil.copyfile(source, self.path(key))
        return self.path(key).stat().st_size

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
