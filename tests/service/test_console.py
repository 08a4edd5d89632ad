"""The operator console (/ui) driven in a real headless Chromium (Debian's /usr/bin/chromium, through
Playwright) against the live embedded service: SQLite, the tiny model, jobs run by an in-process worker
thread, API keys on. The tests are one story, in order: a fresh service (untrained banner on every page)
→ an upload from the page trains version 2 (progress bar to 100%) → roll back and forward from the page
→ the playground streams → a grown version's expert heat map → the forgetting matrix.

Skipped only where no browser is installed (scripts/test.sh installs Debian's chromium as root).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.api.app import create_app
from service.db.migrate import upgrade
from service.worker.inline import InlineWorker

from .conftest import ServerThread, domain_text, tiny_settings, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "console-test-key"
PAGES = ["versions", "evaluation", "jobs", "experts", "corpora", "playground"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no browser: /usr/bin/chromium is missing (Debian's "
                                "chromium package; scripts/test.sh installs it when run as root)")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright package is missing (pip install -e .[test])")


def paced(app, seconds: float):
    """The app, with every chunk of an event stream sent ``seconds`` late: the tiny model writes a whole
    answer within one network read, a real one at tens of tokens per second, as this pretends."""
    async def paced_app(scope, receive, send):
        streaming = False

        async def paced_send(message):
            nonlocal streaming
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                streaming = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and streaming and message.get("body"):
                await asyncio.sleep(seconds)
            await send(message)

        await app(scope, receive, paced_send)

    return paced_app


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    settings = tiny_settings(tmp_path_factory.mktemp("home"), api_keys=[KEY], train_steps=400, max_tokens_limit=256)
    upgrade(settings.resolved_database_url)
    with InlineWorker(settings) as worker:
        app = paced(create_app(settings, dispatch=worker.dispatch), 0.01)
        with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60,
                                                      headers={"Authorization": f"Bearer {KEY}"}) as http:
            yield server.url, http


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


@dataclass
class Console:
    """A page with every console message and uncaught error it produced."""

    page: object
    problems: list[str] = field(default_factory=list)

    def assert_clean(self, allowed: tuple[str, ...] = ()) -> None:
        unexpected = [p for p in self.problems if not any(a in p for a in allowed)]
        assert not unexpected, unexpected


@pytest.fixture()
def console(browser, service):
    context = browser.new_context(base_url=service[0], viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(30_000)
    console = Console(page)
    page.on("console", lambda message: message.type == "error" and console.problems.append(
        f"console error: {message.text} ({message.location.get('url', '')})"))
    page.on("pageerror", lambda error: console.problems.append(f"page error: {error}"))
    yield console
    context.close()


def ok(response, status: int = 200):
    assert response.status_code == status, response.text
    return response.json()


def served_version(http) -> int:
    return ok(http.post("/v1/generate", json={"prompt": "a", "max_tokens": 1}))["version"]


def sign_in(page, next_page: str) -> None:
    """The console's sign-in form: the key goes to the server once; the browser keeps only a session cookie."""
    page.goto(f"/ui/login?next=/ui/{next_page}")
    page.fill("#login-key", KEY)
    page.click("#login button[type=submit]")
    page.wait_for_url(f"**/ui/{next_page}")
    assert "signed in as" in page.inner_text("#signed-in")
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script reads the session
    assert page.evaluate("sessionStorage.length + localStorage.length") == 0


def test_every_page_loads_without_errors_and_shows_the_untrained_banner(console):
    page = console.page
    page.goto("/ui")
    assert page.url.endswith("/ui/versions")
    ready = {"versions": "#version-1", "evaluation": "h1", "jobs": "#finished-jobs tr.empty",
             "experts": "#heatmap svg", "corpora": "#upload-form", "playground": "#generate-form"}
    for name in PAGES:
        page.goto(f"/ui/{name}")
        page.wait_for_selector(ready[name])
        assert page.locator("nav a.current").inner_text().lower() == name
        banner = page.locator("#banner")
        assert banner.is_visible() and "the model is untrained" in banner.inner_text()
    page.wait_for_timeout(300)  # late script errors
    console.assert_clean()


def test_an_upload_from_the_page_trains_a_version_whose_progress_bar_reaches_100(console, service):
    page, (_, http) = console.page, service
    sign_in(page, "corpora")
    page.set_input_files("#upload-file", files=[{"name": "english.txt", "mimeType": "text/plain",
                                                 "buffer": (domain_text("english") * 2).encode()}])
    page.click("#upload-button")
    page.wait_for_selector("#upload-progress[aria-valuenow='100']")
    result = page.locator("#upload-result")
    result.get_by_text("training job").wait_for()
    page.wait_for_function("document.querySelector('#upload-result').textContent.includes('duplicate paragraphs')")
    assert "ready" in result.inner_text()
    job_id = int(result.locator("a[href^='/ui/jobs#job-']").nth(1).inner_text().split()[-1])

    page.goto(f"/ui/jobs#job-{job_id}")
    bar = page.locator(f"#job-{job_id} [role=progressbar]")
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if bar.count():
            seen.append(int(bar.get_attribute("aria-valuenow")))
            if page.locator(f"#job-{job_id}").get_attribute("data-state") == "succeeded" and seen[-1] == 100:
                break
        page.wait_for_timeout(50)
    assert seen and seen[-1] == 100, seen
    assert any(0 < value < 100 for value in seen), f"the bar never showed a value between 0 and 100: {seen}"
    assert seen == sorted(seen), seen
    assert page.locator(f"#job-{job_id} svg.loss polyline").count() == 1  # the loss curve
    assert page.locator("#finished-jobs").locator(f"#job-{job_id}").count() == 1
    page.wait_for_selector("#banner", state="hidden")  # version 2 is trained and active
    job = ok(http.get(f"/v1/jobs/{job_id}"))
    assert job["state"] == "succeeded" and job["result_version_id"] == 2 and job["metrics"]["activated"]
    history = job["metrics"]["loss_history"]
    assert len(history) == 40 and history[-1][0] == 400 and history[-1][1] < history[0][1]
    console.assert_clean()


def test_activation_from_the_page_switches_the_served_version(console, service):
    page, (_, http) = console.page, service
    assert served_version(http) == 2
    page.goto("/ui/versions")
    assert page.locator("#version-2").get_attribute("data-active") == "true"
    page.click("#version-1 button.activate")  # not signed in yet: the API's 401 message is shown
    page.wait_for_selector("#flash.error")
    assert "401" in page.inner_text("#flash") and "API key" in page.inner_text("#flash")
    assert served_version(http) == 2

    sign_in(page, "versions")
    page.click("#version-1 button.activate")
    page.wait_for_selector("#flash.ok")
    assert served_version(http) == 1 and next(v for v in ok(http.get("/v1/versions")) if v["active"])["id"] == 1
    assert page.locator("#version-1").get_attribute("data-active") == "true"
    page.wait_for_selector("#banner", state="visible")  # version 1 is untrained again

    page.click("#version-2 button.activate")
    page.wait_for_selector("#version-2[data-active='true']")
    assert served_version(http) == 2
    activations = ok(http.get("/v1/versions/1"))["activations"]
    assert activations[-1]["reason"] == "activated from the console" and activations[-1]["actor"].startswith("api-key")
    console.assert_clean(allowed=("status of 401",))  # the refused request, on purpose


def test_the_playground_streams_tokens_and_names_the_version(console, service):
    page, (_, http) = console.page, service
    page.goto("/ui/playground")
    page.evaluate("""() => {
        const out = document.querySelector('#output-text');
        window.lengths = [];
        new MutationObserver(() => window.lengths.push(out.textContent.length))
            .observe(out, {childList: true, characterData: true, subtree: true});
    }""")
    page.fill("#prompt", "the cat")
    page.fill("#max_tokens", "200")
    page.fill("#seed", "7")
    page.click("#generate-button")
    page.wait_for_selector("#output-text[data-done='true']")
    text = page.inner_text("#output-text")
    lengths = page.evaluate("window.lengths")
    assert int(page.get_attribute("#output-text", "data-events")) > 1
    assert len(lengths) >= 3 and lengths == sorted(lengths) and lengths[-1] == len(text), lengths
    assert page.inner_text("#answer-version") == f"v{ok(http.get('/v1/status'))['served_version']}" == "v2"
    assert "tokens" in page.inner_text("#answer-stats")
    same = ok(http.post("/v1/generate", json={"prompt": "the cat", "max_tokens": 200, "temperature": 0.8,
                                              "top_p": 0.95, "seed": 7}))
    assert same["text"] == text
    console.assert_clean()


def test_the_expert_heat_map_has_one_cell_per_expert_and_outlines_the_grown_segment(console, service):
    page, (_, http) = console.page, service
    accepted = ok(http.post("/v1/corpora", json={"name": "code", "text": domain_text("code"),
                                                 "train_options": {"steps": 40, "activate": "always"}}), 202)
    ingest = wait_for(lambda: (lambda j: j if j["next_job_id"] else None)(
        ok(http.get(f"/v1/jobs/{accepted['job']['id']}"))), 30, what="the ingest job")
    train = wait_for(lambda: (lambda j: j if j["state"] == "succeeded" else None)(
        ok(http.get(f"/v1/jobs/{ingest['next_job_id']}"))), 60, what="the training job")
    version = train["result_version_id"]
    wait_for(lambda: served_version(http) == version, 10, what="the swap")
    for seed in range(3):
        ok(http.post("/v1/generate", json={"prompt": "def f(x):", "max_tokens": 40, "seed": seed}))
    usage = wait_for(lambda: (lambda u: u if all(layer["tokens"] for layer in u["layers"].values()) else None)(
        ok(http.get(f"/v1/experts/utilization?version={version}"))), 10, what="usage to be flushed")
    layer, info = next(iter(usage["layers"].items()))
    assert len(info["segments"]) == 2 and info["rows"] * info["cols"] == info["num_experts"]

    page.goto(f"/ui/experts?version={version}&layer={layer}")
    page.wait_for_selector("#heatmap svg")
    assert page.locator("#heatmap rect.cell").count() == info["rows"] * info["cols"]
    assert page.locator("#heatmap path.segment").count() == 2
    assert page.locator("#heatmap text.segment-label").nth(1).text_content().startswith("1")
    assert "code" in page.locator("table.segments tbody tr").nth(1).inner_text()
    assert page.inner_text("#usage-fraction") == f"{info['usage_fraction'] * 100:.1f}%"
    page.hover("#heatmap rect.cell >> nth=0")
    assert page.inner_text("#heat-info").startswith("expert 0 ")
    console.assert_clean()


def test_the_forgetting_matrix_shows_the_lineage_and_the_gate(console, service):
    page, (_, http) = console.page, service
    active = next(v for v in ok(http.get("/v1/versions")) if v["active"])
    page.goto("/ui/evaluation")
    rows = page.locator("#forgetting-matrix tbody tr")
    assert [rows.nth(i).get_attribute("data-version") for i in range(rows.count())] == ["1", "2", str(active["id"])]
    assert page.locator("#forgetting-matrix th.corpus-col").count() == 2
    learnt = page.locator(f"#forgetting-matrix tr[data-version='{active['id']}'] td.cell").nth(1)
    assert "●" in learnt.inner_text() and "hsla(142" in learnt.get_attribute("style")  # learnt: bpb went down
    assert active["gate_reason"] in page.inner_text(f"#forgetting-matrix tr[data-version='{active['id']}'] td.gate")
    console.assert_clean()
