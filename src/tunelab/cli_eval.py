"""``tunelab eval run``: one eval run per model on the same data, through the API, side by side.

    tunelab eval run --eval eval_... --data-source ds.json --model BASE --model ft:...
    tunelab eval run --items items.jsonl --criteria criteria.json --messages messages.json --model A --model B

The server's workers sample and grade (the same code as ``client.evals.runs.create``); this
command waits, then prints each metric per model with the difference from the first model and its
95% paired bootstrap confidence interval (pass rates also with a Wilson interval), so that a
difference that is noise shows as one: an interval that contains 0.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tunelab.store.eval_lifecycle import EvalRunStatus

app = typer.Typer(help="Evaluate models: the Evals API from the command line.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _items(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["item"] if set(r) <= {"item", "sample"} and "item" in r else r for r in rows]


def _item_schema(items: list[dict]) -> dict:
    """A schema of the fields every item has (strings stay strings), for an eval made from a file."""
    keys = set.intersection(*(set(i) for i in items)) if items else set()
    return {"type": "object", "properties": {k: {} for k in sorted(keys)}, "required": sorted(keys)}


class Api:
    def __init__(self, url: str, key: str) -> None:
        import httpx

        self.http = httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=300)

    def call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            try:
                e = r.json()["error"]
                message = f"{e['message']}" + (f" (param: {e['param']})" if e.get("param") else "")
            except (ValueError, KeyError):
                message = r.text
            err.print(f"[red]error:[/red] {method} {path}: {r.status_code} {message}")
            raise typer.Exit(1)
        return r.json()

    def pages(self, path: str) -> list[dict]:
        items, after = [], None
        while True:
            page = self.call("GET", path, params={"limit": 1000, **({"after": after} if after else {})})
            items += page["data"]
            if not page.get("has_more") or not page["data"]:
                return items
            after = page["data"][-1]["id"]


@app.command("run")
def run(
    model: Annotated[
        list[str], typer.Option("--model", "-m", help="A model id or deployment; repeat it (first = baseline).")
    ],
    eval_id: Annotated[str | None, typer.Option("--eval", help="An existing eval's id.")] = None,
    data_source: Annotated[
        Path | None, typer.Option(help="JSON of a run's data_source (completions; 'model' is filled in per model).")
    ] = None,
    items: Annotated[Path | None, typer.Option(help="JSONL of items (or {'item': ...} rows).")] = None,
    criteria: Annotated[
        Path | None, typer.Option(help="JSON list of testing criteria (with --items, no --eval).")
    ] = None,
    messages: Annotated[
        Path | None, typer.Option(help="JSON list of template messages, e.g. with {{item.text}}.")
    ] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (with --messages).")] = 0.0,
    max_tokens: Annotated[int | None, typer.Option(help="max_completion_tokens (with --messages).")] = None,
    url: Annotated[str, typer.Option(envvar="TUNELAB_URL", help="The API's base URL.")] = "http://127.0.0.1:8000/v1",
    api_key: Annotated[str | None, typer.Option(envvar="TUNELAB_API_KEY", help="The API key.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the runs.")] = 3600,
) -> None:
    """Start one run per model on the same data and print the metrics side by side."""
    from tunelab.evals.compare import side_by_side

    api = Api(url, api_key or os.environ.get("OPENAI_API_KEY", ""))
    if eval_id is None:
        if items is None or criteria is None:
            err.print("[red]error:[/red] give --eval, or --items and --criteria to create an eval")
            raise typer.Exit(2)
        rows = _items(items)
        body = {
            "name": items.stem,
            "data_source_config": {"type": "custom", "item_schema": _item_schema(rows)},
            "testing_criteria": _load_json(criteria),
        }
        eval_id = api.call("POST", "/evals", json=body)["id"]
        err.print(f"created eval {eval_id}")
    ev = api.call("GET", f"/evals/{eval_id}")
    if data_source is not None:
        source = _load_json(data_source)
    elif items is not None and messages is not None:
        source = {
            "type": "completions",
            "input_messages": {"type": "template", "template": _load_json(messages)},
            "sampling_params": {"temperature": temperature, "max_completion_tokens": max_tokens},
            "source": {"type": "file_content", "content": [{"item": i} for i in _items(items)]},
        }
    else:
        err.print("[red]error:[/red] give --data-source, or --items and --messages")
        raise typer.Exit(2)
    runs = [
        api.call("POST", f"/evals/{eval_id}/runs", json={"name": m, "data_source": {**source, "model": m}})
        for m in model
    ]
    deadline = time.time() + timeout
    while not all(EvalRunStatus(r["status"]).is_finished for r in runs):
        if time.time() > deadline:
            err.print("[red]error:[/red] the runs did not finish in time: " + ", ".join(r["id"] for r in runs))
            raise typer.Exit(1)
        time.sleep(2)
        runs = [api.call("GET", f"/evals/{eval_id}/runs/{r['id']}") for r in runs]
        done = ", ".join(f"{r['model']}: {r['result_counts']['total']}" for r in runs)
        err.print(f"graded so far: {done}", end="\r")
    err.print()
    for r in runs:
        if r["status"] != "completed":
            err.print(f"[red]error:[/red] run {r['id']} on {r['model']} {r['status']}: {r.get('error')}")
            raise typer.Exit(1)
    outputs = [api.pages(f"/evals/{eval_id}/runs/{r['id']}/output_items") for r in runs]
    table = Table(title=f"{ev['name']} ({eval_id}): {len(outputs[0])} items")
    table.add_column("metric")
    for i, m in enumerate(model):
        table.add_column(m, justify="right")
        if i:
            table.add_column(f"diff vs {model[0]} (95% CI)", justify="right")
    for row in side_by_side(ev["testing_criteria"], outputs):
        cells = [row.metric]
        for i, value in enumerate(row.values):
            interval = row.intervals[i]
            cells.append(f"{value:.3f}" + (f" [{interval.low:.3f}, {interval.high:.3f}]" if interval else ""))
            if i:
                d = row.diffs[i]
                cells.append(f"{d[0]:+.3f} [{d[1].low:+.3f}, {d[1].high:+.3f}]" if d else "")
        table.add_row(*cells)
    out.print(table)
    for r in runs:
        out.print(f"{r['model']}: run {r['id']}  {r['report_url']}")
