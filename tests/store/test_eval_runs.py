"""The eval run lifecycle on a real SQLite store: claims, transitions that lose races, attempts."""

from __future__ import annotations

from tunelab.store import Store
from tunelab.store import eval_lifecycle as runs
from tunelab.store.eval_lifecycle import EvalRunStatus
from tunelab.store.tables import EvalOutputItemRow, EvalRow, EvalRunRow


def make(store: Store, n: int = 2) -> list[str]:
    store.add(
        EvalRow(
            id="eval_1",
            project_id="p",
            created_at=1,
            updated_at=1,
            name="e",
            data_source_config={"type": "custom", "item_schema": {}},
            testing_criteria=[],
        )
    )
    ids = []
    for i in range(n):
        run = EvalRunRow(
            id=f"evalrun_{i}",
            eval_id="eval_1",
            project_id="p",
            created_at=10 + i,
            name="r",
            model="m",
            data_source={},
            result_counts={},
        )
        ids.append(runs.create(store, run).id)
    return ids


def test_claims_go_oldest_first_once_each_and_count_attempts(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    first, second = make(store)
    a = runs.claim(store, "w1")
    b = runs.claim(store, "w2")
    assert (a.id, b.id) == (first, second) and runs.claim(store, "w3") is None
    assert a.status is EvalRunStatus.IN_PROGRESS and a.worker_id == "w1" and a.attempts == 1
    assert runs.requeue(store, first) and runs.claim(store, "w3").attempts == 2  # the next worker goes on


def test_transitions_only_from_their_states(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    run_id, other = make(store)
    assert not runs.progress(store, run_id, result_counts={"total": 1})  # not claimed yet
    assert not runs.complete(store, run_id, 5)
    runs.claim(store, "w")
    assert runs.progress(store, run_id, result_counts={"total": 1})
    assert runs.cancel(store, run_id, 6)
    assert not runs.progress(store, run_id, result_counts={"total": 2})  # the worker learns it was cancelled
    assert not runs.complete(store, run_id, 7) and not runs.cancel(store, run_id, 7)
    assert store.get(EvalRunRow, run_id).status is EvalRunStatus.CANCELED
    assert runs.fail(store, other, {"code": "x", "message": "y"}, 8)  # a queued run can fail too
    assert store.get(EvalRunRow, other).error == {"code": "x", "message": "y"}


def test_deleting_an_eval_deletes_its_runs_and_items(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    run_id, _ = make(store)
    store.add(
        EvalOutputItemRow(
            id="outputitem_1",
            run_id=run_id,
            eval_id="eval_1",
            created_at=1,
            datasource_item_id=0,
            status="pass",
            errored=False,
            datasource_item={},
            results=[],
            sample={},
        )
    )
    page, more = store.output_items(run_id, after=None, limit=10)
    assert [o.id for o in page] == ["outputitem_1"] and not more
    assert store.delete(EvalRow, "eval_1")
    assert store.get(EvalRunRow, run_id) is None and store.get(EvalOutputItemRow, "outputitem_1") is None
