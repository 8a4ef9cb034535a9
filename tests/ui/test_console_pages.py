"""One test per console page, in Chromium, against a server without a worker (jobs stay put)."""

from __future__ import annotations

import re
import time

import pytest

pytest.importorskip("pytest_playwright", reason="the browser tier needs pip install -e '.[browser]'")

from playwright.sync_api import Page, expect  # noqa: E402

from tests.conftest import BASE_MODEL, SAMPLES  # noqa: E402
from tests.server import Server  # noqa: E402
from tests.ui.conftest import log_in, session_cookie  # noqa: E402

pytestmark = pytest.mark.browser
expect.set_options(timeout=30_000)  # a busy 2-core machine: Playwright's 5 s default is too tight


@pytest.fixture
def console(page: Page, console_server: Server) -> Page:
    log_in(page, console_server.url)
    expect(page.locator("h1")).to_have_text("Overview")
    return page


def queued_job(server: Server, training_file: str, **kwargs) -> str:
    """A job through the API; with no worker it stays queued."""
    return server.openai().fine_tuning.jobs.create(model=BASE_MODEL, training_file=training_file, **kwargs).id


def test_login_refuses_a_bad_key_then_lets_the_right_one_in(page: Page, console_server: Server):
    page.goto(f"{console_server.url}/ui/files")
    expect(page).to_have_url(re.compile(r"/ui/login\?reason=missing&next=/ui/files"))
    log_in(page, console_server.url, key="not-the-key")
    expect(page.locator("#login-error")).to_contain_text("That API key was not accepted")
    page.goto(f"{console_server.url}/ui/login?next=/ui/files")
    page.fill("#key", console_server.key)
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Files")  # back where it was going
    page.click("#logout")
    expect(page.locator("#login-notice")).to_have_text("You are logged out.")


def test_an_expired_cookie_sends_the_browser_to_the_login_page(page: Page, console_server: Server):
    old = session_cookie(issued_at=time.time() - 13 * 3600)
    page.context.add_cookies([{"name": "tunelab_console", "value": old, "url": f"{console_server.url}/ui"}])
    page.goto(f"{console_server.url}/ui/jobs")
    expect(page.locator("#login-notice")).to_have_text("Your session expired. Log in again.")


def test_a_forged_post_is_refused_with_a_readable_message(console: Page, console_server: Server, lab_files):
    url = f"{console_server.url}/ui/files/{lab_files[0]}/delete"
    forged = console.request.post(url)  # the session cookie, but no CSRF token
    assert forged.status == 403 and "CSRF token is missing or wrong" in forged.text()
    # From the page itself, without the token htmx adds: refused too, and the file is still there.
    status = console.evaluate("u => fetch(u, {method: 'POST'}).then(r => r.status)", url)
    assert status == 403
    assert console_server.openai().files.retrieve(lab_files[0]).status == "processed"


def test_overview(console: Page, console_server: Server):
    expect(console.locator("#running-jobs h2")).to_have_text("Jobs in progress")
    expect(console.locator("#overview-deployments")).to_be_visible()
    expect(console.locator("#recent-events")).to_be_visible()


def test_files_upload_with_progress_and_a_delete_refused_while_a_job_uses_the_file(
    console: Page, console_server: Server
):
    console.goto(f"{console_server.url}/ui/files")
    console.set_input_files("#upload-file", str(SAMPLES / "training_set.jsonl"))
    console.click("#upload button[type=submit]")
    expect(console.locator("#upload-result")).to_contain_text("training_set.jsonl: processed")
    assert console.locator("#upload progress").evaluate("p => p.value") == 100  # the upload reported progress
    file_id = console.locator("#upload-result a").get_attribute("href").rsplit("/", 1)[1]
    row = console.locator(f"#file-{file_id}")
    expect(row).to_contain_text("12")  # examples

    job_id = queued_job(console_server, file_id)
    row.locator("button.danger").click()
    expect(console.locator("#flash")).to_contain_text(f"in use by fine-tuning job {job_id}; cancel it first")
    expect(console.locator(f"#flash a[href='/ui/jobs/{job_id}']")).to_be_visible()  # the job is one click away
    console_server.openai().fine_tuning.jobs.cancel(job_id)
    console.locator(f"#file-{file_id} button.danger").click()
    expect(console.locator(f"#file-{file_id}")).to_have_count(0)


def test_file_report_errors_with_their_lines_tokens_and_the_chat_viewer(
    console: Page, console_server: Server, lab_files
):
    lines = (SAMPLES / "training_set.jsonl").read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "unterminated'
    bad = console_server.openai().files.create(file=("bad.jsonl", "\n".join(lines).encode()), purpose="fine-tune")
    console.goto(f"{console_server.url}/ui/files/{bad.id}")
    expect(console.locator("#errors")).to_contain_text("line 3")
    expect(console.locator("#errors pre.offending")).to_contain_text('"content": "unterminated')

    console.goto(f"{console_server.url}/ui/files/{lab_files[0]}")
    expect(console.locator("#summary")).to_contain_text("valid")
    # The first count in a server loads the tokenizer (and transformers): slow on a busy machine.
    expect(console.locator("#truncation")).to_contain_text("Context: 8,192 tokens.", timeout=180_000)
    expect(console.locator("#truncation")).to_contain_text("0 examples will be truncated")
    expect(console.locator("#histogram .bar")).not_to_have_count(0)
    expect(console.locator("#token-stats")).to_contain_text("model · trained")
    first = console.locator("#example-1")
    expect(first.locator(".t.on").first).to_be_visible(timeout=120_000)  # trained tokens are shaded
    trained = "".join(first.locator(".t.on").all_text_contents())
    assert trained == "Rome. It has only been the capital for a century and a half, so it's easy to miss.<|im_end|>"
    console.click("#more-examples button")
    expect(console.locator("#example-6")).to_be_visible()


def test_new_job_shows_what_auto_resolves_to_and_the_same_call_from_code(
    console: Page, console_server: Server, lab_files
):
    console.goto(f"{console_server.url}/ui/jobs/new?training_file={lab_files[0]}")
    review = console.locator("#review")
    # 12 examples: auto epochs = 100 // 12 = 8; auto batch = 2 (at least 5 steps an epoch)
    expect(review.locator("#resolved")).to_contain_text("auto → 8", timeout=180_000)
    expect(review.locator("#resolved")).to_contain_text("auto → 2")
    console.fill("input[name=n_epochs]", "abc")
    expect(console.locator("#flash")).to_contain_text("n_epochs must be “auto” or a number: got 'abc'.")
    console.fill("input[name=n_epochs]", "2")
    console.fill("input[name=suffix]", "smoke")
    expect(review.locator("#resolved")).to_contain_text("12 (12 examples)")  # steps: 6 per epoch
    expect(console.locator("#flash")).to_be_empty()
    expect(console.locator("#sdk-snippet")).to_contain_text(f"training_file='{lab_files[0]}'")
    expect(console.locator("#sdk-snippet")).to_contain_text("'n_epochs': 2")
    expect(console.locator("#curl-snippet")).to_contain_text('"suffix": "smoke"')
    console.click("#create-job")
    expect(console.locator("#job-status")).to_have_text("queued")
    job_id = console.url.rsplit("/", 1)[1]
    job = console_server.openai().fine_tuning.jobs.retrieve(job_id)
    assert job.user_provided_suffix == "smoke" and job.training_file == lab_files[0]


def test_jobs_table_filters_and_compares(console: Page, console_server: Server, lab_files):
    a = queued_job(console_server, lab_files[0], suffix="alpha", seed=1)
    b = queued_job(console_server, lab_files[0], suffix="beta", seed=2, hyperparameters={"n_epochs": 3})
    console.goto(f"{console_server.url}/ui/jobs")
    console.fill("#job-search", "alpha")
    expect(console.locator(f"#job-{b}")).to_have_count(0)
    expect(console.locator(f"#job-{a}")).to_be_visible()
    expect(console).to_have_url(re.compile(r"q=alpha"))  # the filter survives a reload
    console.reload()
    expect(console.locator(f"#job-{b}")).to_have_count(0)
    console.select_option("select[name=status]", "queued")
    expect(console).to_have_url(re.compile(r"status=queued&model=&q=alpha"))
    expect(console.locator(f"#job-{a}")).to_be_visible()
    console.goto(f"{console_server.url}/ui/jobs?status=queued")  # (a settled page to tick boxes on)
    console.check(f"#job-{a} input[type=checkbox]")
    console.check(f"#job-{b} input[type=checkbox]")
    console.click("#compare")
    expect(console.locator("h1")).to_have_text("Compare 2 jobs")
    expect(console.locator("tr.differs[data-setting=seed]")).to_be_visible()
    expect(console.locator("tr.differs[data-setting=n_epochs]")).to_be_visible()
    expect(console.locator("tr[data-setting=model]")).not_to_have_class("differs")
    expect(console.locator("#compare-chart .empty")).to_be_visible()  # nothing trained yet


def test_job_detail_pause_resume_cancel(console: Page, console_server: Server, lab_files):
    job_id = queued_job(console_server, lab_files[0], validation_file=lab_files[1], suffix="buttons")
    console.goto(f"{console_server.url}/ui/jobs/{job_id}")
    expect(console.locator("#job-status")).to_have_text("queued")
    expect(console.locator("#hyperparameters")).to_contain_text(lab_files[1])
    expect(console.locator("#job-chart .empty")).to_contain_text("The curves appear with the first training step.")
    console.click("#pause")
    expect(console.locator("#job-status")).to_have_text("paused")
    console.click("#resume")
    expect(console.locator("#job-status")).to_have_text("queued")
    expect(console.locator("#resume")).to_be_disabled()  # what the API would refuse is not offered
    console.click("#cancel")
    expect(console.locator("#job-status")).to_have_text("cancelled")
    expect(console.locator("#cancel")).to_be_disabled()
    expect(console.locator("#job-events")).to_contain_text("cancelled")
    console.select_option("#event-filters select", "warn")
    expect(console.locator("#job-events")).to_contain_text("No events at this level.")
    csv = console.request.get(f"{console_server.url}/ui/jobs/{job_id}/metrics.csv")
    assert csv.ok and csv.text().strip() == "step"  # no steps: the header only


def test_deployments_create_watch_and_delete(console: Page, console_server: Server):
    console.goto(f"{console_server.url}/ui/deployments")
    console.select_option("#deploy-model", BASE_MODEL)
    console.fill("#deploy-name", "smoke-base")
    console.click("#deploy-form button[type=submit]")
    row = console.locator("#deployment-smoke-base")
    expect(row).to_have_attribute("data-state", "Succeeded", timeout=120_000)  # loading shows, then this
    expect(row).to_contain_text("/openai/deployments/smoke-base/chat/completions")
    row.locator("summary").click()
    expect(row.locator("pre")).to_contain_text("model='smoke-base'")
    row.locator("button.danger").click()
    expect(console.locator("#deployment-smoke-base")).to_have_count(0)
    names = [d["name"] for d in _deployments(console_server)]
    assert "smoke-base" not in names


def _deployments(server: Server) -> list[dict]:
    import requests

    url = server.deployment_url("x").rsplit("/", 1)[0]
    return requests.get(url, headers={"Authorization": f"Bearer {server.key}"}).json()["value"]


def test_playground_streams_keeps_its_state_and_runs_the_validation_prompts(
    console: Page, console_server: Server, lab_files
):
    console.goto(f"{console_server.url}/ui/playground?model={BASE_MODEL}&file={lab_files[1]}")
    expect(console.locator("#playground")).to_have_attribute("data-ready", "true")
    console.fill("#chat-settings [name=max_tokens]", "12")
    console.fill("#prompt", "What is the capital of France?")
    console.click("#send")
    pane = console.locator(".pane").first
    expect(pane).to_have_attribute("data-state", "done", timeout=120_000)
    expect(pane.locator(".msg.assistant")).not_to_be_empty()
    expect(pane.locator(".stats")).to_contain_text("time to first token")
    expect(pane.locator(".stats")).to_contain_text("tokens/s")
    assert int(pane.get_attribute("data-chunks")) > 1  # streamed, piece by piece

    console.click("#add-pane")
    expect(console.locator(".pane")).to_have_count(2)
    console.reload()  # the panes come back from the URL, the conversation from this tab's storage
    expect(console.locator(".pane")).to_have_count(2)
    expect(console.locator(".pane").first.locator(".msg.user")).to_have_text("What is the capital of France?")

    console.fill("#prompts-limit", "1")
    console.fill("#chat-settings [name=max_tokens]", "6")
    console.click("#run-prompts")
    expect(console.locator("#prompts-status")).to_have_text("1 prompts answered.", timeout=120_000)
    cells = console.locator("#prompt-results tbody tr").first.locator("td")
    expect(cells).to_have_count(5)  # line, prompt, reference, and one answer per pane
    expect(cells.nth(2)).not_to_be_empty()
    expect(cells.nth(3)).not_to_have_text("…")
