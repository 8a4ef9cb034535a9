"""The lab in the browser, end to end, against a server that trains.

Log in -> upload both lab files -> read the report -> create the job -> watch the curve grow
(reloading mid-job shows the same state) -> deploy a checkpoint -> chat with the base model and
the checkpoint side by side, streamed -> delete the deployment. The screenshots in docs/ are
taken here.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("pytest_playwright", reason="the browser tier needs pip install -e '.[browser]'")

from playwright.sync_api import Page, expect  # noqa: E402

from tests.conftest import BASE_MODEL, SAMPLES  # noqa: E402
from tests.server import Server  # noqa: E402
from tests.ui.conftest import DOCS, log_in  # noqa: E402

pytestmark = pytest.mark.browser
expect.set_options(timeout=30_000)  # a busy 2-core machine: Playwright's 5 s default is too tight
TRAINING = 15 * 60_000  # ms: a 12-step job on a busy 2-core machine, generously


def upload(page: Page, name: str) -> str:
    page.set_input_files("#upload-file", str(SAMPLES / name))
    page.click("#upload button[type=submit]")
    expect(page.locator("#upload-result")).to_contain_text(f"{name}: processed")
    return page.locator("#upload-result a").get_attribute("href").rsplit("/", 1)[1]


def points(page: Page) -> int:
    return int(page.locator("#job-chart").get_attribute("data-points") or 0)


def test_the_lab_in_the_browser(page: Page, lab_server: Server):
    url = lab_server.url
    log_in(page, url)
    expect(page.locator("h1")).to_have_text("Overview")

    # -- upload both lab files, read the report ----------------------------------------------------
    page.goto(f"{url}/ui/files")
    training = upload(page, "training_set.jsonl")
    validation = upload(page, "validation_set.jsonl")
    page.click(f"#file-{training} a")
    expect(page.locator("#summary")).to_contain_text("valid")
    expect(page.locator("#truncation")).to_contain_text("0 examples will be truncated", timeout=180_000)
    expect(page.locator("#example-1 .t.on").first).to_be_visible(timeout=120_000)

    # -- create the job ----------------------------------------------------------------------------
    page.click("text=Fine-tune with this file")
    page.select_option("select[name=validation_file]", validation)
    page.fill("input[name=n_epochs]", "2")
    page.fill("input[name=seed]", "105")
    page.fill("input[name=suffix]", "lab")
    expect(page.locator("#resolved")).to_contain_text("12 (12 examples)")
    expect(page.locator("#sdk-snippet")).to_contain_text(f"validation_file='{validation}'")
    page.click("#create-job")
    expect(page).to_have_url(re.compile(r"/ui/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[1]

    # -- watch the curve grow; a reload mid-job shows the same state ------------------------------
    chart = page.locator("#job-chart")
    expect(chart).to_have_attribute("data-points", re.compile(r"^[1-9]"), timeout=TRAINING)
    seen = points(page)
    expect(chart).not_to_have_attribute("data-points", str(seen), timeout=TRAINING)  # more steps arrived
    expect(page.locator("#job-status")).to_have_text("running")
    expect(page.locator("#job-chart canvas").first).to_be_visible()
    before = {"points": points(page), "settings": page.locator("#hyperparameters").inner_text()}
    page.reload()
    expect(page.locator("#job-status")).to_have_text(re.compile("running|succeeded"))
    expect(chart).to_have_attribute("data-points", re.compile(r"^[1-9]"))
    assert points(page) >= before["points"]
    assert page.locator("#hyperparameters").inner_text() == before["settings"]  # resolved values, from the server
    expect(page.locator("#job-events")).to_contain_text("Fine-tuning job started")
    page.goto(f"{url}/ui")  # the overview shows it too, with its loss sparkline
    running = page.locator("#running-jobs")
    if "running" in running.inner_text():
        expect(running.locator("svg.spark polyline")).to_be_visible()
    page.goto(f"{url}/ui/jobs/{job_id}")

    # -- deploy the first checkpoint (end of epoch 1, step 6) --------------------------------------
    checkpoint = page.locator("#ckpt-6")
    expect(checkpoint).to_be_visible(timeout=TRAINING)
    model = checkpoint.locator("[data-deploy]").get_attribute("data-deploy")
    assert model.endswith(":ckpt-step-6")
    checkpoint.locator("[data-deploy]").click()
    expect(page).to_have_url(re.compile(r"/ui/deployments"))
    name = re.sub(r".*:lab:", "lab-", model).replace(":ckpt-", "-")
    row = page.locator(f"#deployment-{name}")
    expect(row).to_have_attribute("data-state", "Succeeded", timeout=180_000)

    # -- chat with the base model and the checkpoint side by side, streamed ------------------------
    page.goto(f"{url}/ui/playground?model={BASE_MODEL}&model={name}&file={validation}")
    expect(page.locator(".pane")).to_have_count(2)
    page.fill("#chat-settings [name=max_tokens]", "24")
    page.fill("#prompt", "What is the capital of Portugal?")
    page.click("#send")
    panes = page.locator(".pane")
    for i in range(2):
        expect(panes.nth(i)).to_have_attribute("data-state", "done", timeout=180_000)
        expect(panes.nth(i).locator(".msg.assistant")).not_to_be_empty()
        expect(panes.nth(i).locator(".stats")).to_contain_text("tokens/s")
        assert int(panes.nth(i).get_attribute("data-chunks")) > 1  # streamed
    page.screenshot(path=str(DOCS / "console-playground.png"), full_page=True)

    # -- delete the deployment ----------------------------------------------------------------------
    page.goto(f"{url}/ui/deployments")
    page.locator(f"#deployment-{name} button.danger").click()
    expect(page.locator(f"#deployment-{name}")).to_have_count(0)

    # -- the finished job: the whole curve, its checkpoints, the best one starred ------------------
    page.goto(f"{url}/ui/jobs/{job_id}")
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=TRAINING)
    expect(chart).to_have_attribute("data-status", "succeeded")
    expect(chart).to_have_attribute("data-points", "12")
    expect(page.locator("#job-checkpoints .star")).to_have_count(1)
    expect(page.locator("#final-model")).to_contain_text(f"ft:{BASE_MODEL}:lab:")
    expect(page.locator("#mlflow")).to_contain_text("tunelab")  # the job's run, in the default experiment
    csv = page.request.get(f"{url}/ui/jobs/{job_id}/metrics.csv").text().splitlines()
    assert csv[0].startswith("step,train_loss") and len(csv) == 13
    page.locator("#job-chart").scroll_into_view_if_needed()
    page.screenshot(path=str(DOCS / "console-job.png"), full_page=True)
