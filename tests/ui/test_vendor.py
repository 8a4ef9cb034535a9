"""The vendored JavaScript and CSS are the pinned npm releases, byte for byte, with their licences."""

from __future__ import annotations

import shutil
from pathlib import Path

from tunelab.ui import vendor


def test_vendored_files_match_their_pins():
    assert vendor.check() == []
    licences = {p.name for p in (vendor.VENDOR / "LICENSES").iterdir()}
    assert licences == {"htmx.org.txt", "uplot.txt"}
    assert "Leon Sorokin" in (vendor.VENDOR / "LICENSES" / "uplot.txt").read_text()  # MIT: the notice ships


def test_a_changed_file_is_found(tmp_path: Path):
    copy = tmp_path / "vendor"
    shutil.copytree(vendor.VENDOR, copy)
    with (copy / "uPlot.min.css").open("ab") as f:
        f.write(b" ")
    (copy / "htmx.min.js").unlink()
    problems = vendor.check(copy)
    assert any(p.startswith("uPlot.min.css: sha256") for p in problems)
    assert any(p.startswith("htmx.min.js: sha256 missing") for p in problems)


def test_no_page_loads_anything_from_elsewhere():
    templates = Path(vendor.__file__).parent / "templates"
    for path in [*templates.rglob("*.html"), *(vendor.VENDOR.parent).glob("*.js")]:
        text = path.read_text()
        assert "http://" not in text.replace("http://127.0.0.1", "") and "https://" not in text, path
