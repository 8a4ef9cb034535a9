"""The console's vendored JavaScript and CSS: pinned npm releases, their licences, a checksum manifest.

Nothing is fetched at install or run time: the files live in ``static/vendor`` and ship in the
wheel. A maintainer refreshes them with npm (which reaches the registry):

    python -m tunelab.ui.vendor refresh       # npm pack each pin, check it, write static/vendor
    python -m tunelab.ui.vendor check         # offline: the files match the pins (a unit test runs it)
    python -m tunelab.ui.vendor print-pins    # after changing a version: what the new release holds

``refresh`` writes nothing unless every tarball matches its npm integrity (sha512) and every file
its sha256. ``MANIFEST.sha256`` is in ``sha256sum -c`` format (run inside static/vendor).

Why htmx 2 and not 4: htmx 2 sends requests with XMLHttpRequest, whose upload progress events
(``htmx:xhr:progress``) drive the upload bar; htmx 4 (a rewrite on fetch, which reports no upload
progress, with renamed events and attribute inheritance switched off) was weeks old when the
console was written. 2.0.x is the maintained 2 line. Streams are the console's own module
(``static/chat.js``), so htmx's stream support does not matter here.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

VENDOR = Path(__file__).parent / "static" / "vendor"


@dataclass(frozen=True)
class Pin:
    package: str
    version: str
    integrity: str
    """The tarball's npm integrity (``npm view PKG@VER dist.integrity``)."""
    files: dict[str, tuple[str, str]]
    """Path in the tarball under ``package/`` -> (path under static/vendor, sha256)."""


PINS = (
    Pin(
        "htmx.org",
        "2.0.11",
        "sha512-Thx/WtpeOQqSrqBCw/A1cwGJGg4UrVa3+sW0GmrM3p4gJgO89ecH4qtbnyzDDWFvBTqjnIMCgELTNt636dtamA==",
        {
            "dist/htmx.min.js": ("htmx.min.js", "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"),
            "LICENSE": ("LICENSES/htmx.org.txt", "d3d2456f76414f2456104660ebd65aff1c04cd7966b942bdabd63f3cdb316a38"),
        },
    ),
    Pin(
        "uplot",
        "1.6.32",
        "sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw==",
        {
            "dist/uPlot.iife.min.js": (
                "uPlot.iife.min.js",
                "19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f",
            ),
            "dist/uPlot.min.css": ("uPlot.min.css", "df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04"),
            "LICENSE": ("LICENSES/uplot.txt", "8f989229699b4fe2f1a0432d0e9edc338a8a911e250e2d1b01ecd770a5f5b1bd"),
        },
    ),
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npm_integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def check(dest: Path = VENDOR) -> list[str]:
    """What differs from the pins (empty: every vendored file and the manifest are as pinned)."""
    problems = []
    for name, want in _expected().items():
        path = dest / name
        got = sha256(path.read_bytes()) if path.is_file() else "missing"
        if got != want:
            problems.append(f"{name}: sha256 {got}, pinned {want}")
    manifest = dest / "MANIFEST.sha256"
    if not manifest.is_file() or manifest.read_text() != manifest_text():
        problems.append("MANIFEST.sha256 does not list the pins (run: python -m tunelab.ui.vendor refresh)")
    return problems


def manifest_text() -> str:
    header = [f"# {p.package}@{p.version} {p.integrity}" for p in PINS]
    return "\n".join(header + [f"{digest}  {name}" for name, digest in _expected().items()]) + "\n"


def _expected() -> dict[str, str]:
    return {name: digest for pin in PINS for name, digest in pin.files.values()}


def fetch(pin: Pin, workdir: Path) -> tuple[dict[str, bytes], list[str]]:
    """The pin's files from its npm tarball, and what did not match."""
    out = subprocess.run(
        ["npm", "pack", f"{pin.package}@{pin.version}", "--json", "--ignore-scripts", "--pack-destination", workdir],
        check=True,
        capture_output=True,
        text=True,
        cwd=workdir,
    ).stdout
    tarball = (workdir / json.loads(out)[0]["filename"]).read_bytes()
    problems = [] if npm_integrity(tarball) == pin.integrity else [f"{pin.package}@{pin.version}: tarball integrity"]
    found = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        for member, (name, digest) in pin.files.items():
            extracted = tar.extractfile(f"package/{member}")  # by name: never extractall
            data = extracted.read() if extracted else b""
            if sha256(data) != digest:
                problems.append(f"{pin.package}@{pin.version} {member}: sha256 {sha256(data)}, pinned {digest}")
            found[name] = data
    return found, problems


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "check"
    if command == "check":
        differences = check()
        print("\n".join(differences) or f"ok: {VENDOR} matches the pins")
        return 1 if differences else 0
    if command not in ("refresh", "print-pins"):
        print(__doc__)
        return 2
    staged: dict[str, bytes] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pin in PINS:
            found, bad = fetch(pin, Path(tmp))
            staged |= found
            problems += bad
    if command == "print-pins":
        print("\n".join(f"{sha256(data)}  {name}" for name, data in staged.items()))
        return 0
    if problems:
        print("nothing written:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    for name, data in staged.items():
        (VENDOR / name).parent.mkdir(parents=True, exist_ok=True)
        (VENDOR / name).write_bytes(data)
    (VENDOR / "MANIFEST.sha256").write_text(manifest_text())
    print(f"wrote {len(staged)} files and MANIFEST.sha256 to {VENDOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
