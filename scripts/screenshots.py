"""Screenshots of the operator console for docs/ (docs/console-*.png, 1280 × 800).

Starts the embedded service in this process (a temporary PEER_HOME, SQLite, a small model, jobs on an
in-process worker thread), lets it bootstrap on Shakespeare, uploads the Jargon File from the corpora page
and Python's documentation through the API, rolls back and forward, sends some traffic, and photographs
every page in Debian's Chromium (/usr/bin/chromium, driven by Playwright). The corpora come from
./data/corpora (or are fetched there from their packages on first use). About two minutes on 2 CPU cores.

    .venv/bin/python scripts/screenshots.py [--out docs]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn
from playwright.sync_api import sync_playwright

from peer_model.corpora import load_corpus
from service.api.app import create_app
from service.db.migrate import upgrade
from service.settings import Settings
from service.worker.inline import InlineWorker

ROOT = Path(__file__).resolve().parents[1]
KEY = "demo-key"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CORPUS_BYTES = 200_000
PROMPTS = ["ROMEO:", "JULIET:\nO ", "hacker (n.): ", "The kernel ", "def main():\n    ", "class Foo:\n",
           "KING HENRY:\n", "To be, or ", "FOO and BAR ", "import os\n"]


def settings_for(home: Path) -> Settings:
    return Settings(home=home, corpora_cache_dir=ROOT / "data" / "corpora", api_keys=[KEY],
                    d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=128, peer_experts=32 * 32, peer_heads=4,
                    peer_top_k=8, peer_d_key=32, train_steps=300, train_batch_size=8, train_seq_len=64,
                    new_experts=320, eval_max_batches=4, bootstrap_corpus="shakespeare",
                    bootstrap_max_bytes=CORPUS_BYTES, bootstrap_steps=600, usage_flush_seconds=0.5,
                    swap_poll_seconds=0.2, job_heartbeat_seconds=0.3)


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def job_done(http: httpx.Client, job_id: int) -> dict:
    return wait(lambda: (lambda j: j if j["state"] in ("succeeded", "failed", "cancelled") else None)(
        http.get(f"/v1/jobs/{job_id}").json()), 600, f"job {job_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    texts = {name: load_corpus(name, ROOT / "data" / "corpora", CORPUS_BYTES)
             for name in ("shakespeare", "jargon", "python-docs")}
    home = Path(tempfile.mkdtemp(prefix="peer-screenshots-"))
    settings = settings_for(home)
    upgrade(settings.resolved_database_url)
    shots = args.out
    shots.mkdir(parents=True, exist_ok=True)

    with InlineWorker(settings) as worker:
        server = uvicorn.Server(uvicorn.Config(create_app(settings, dispatch=worker.dispatch), host="127.0.0.1",
                                               port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait(lambda: server.started, 120, "the server")
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        http = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
            page = browser.new_page(base_url=url, viewport={"width": 1280, "height": 800})
            page.goto("/ui/login")  # the console's actions act as its session
            page.fill("#login-key", KEY)
            page.click("#login button[type=submit]")
            page.wait_for_url("**/ui/versions")

            # the bootstrap job, live, with the untrained banner
            train = wait(lambda: next((j for j in http.get("/v1/jobs?kind=train").json()
                                       if j["state"] == "running" and j["progress"] > 0.35), None), 600,
                         "the bootstrap job to get going")
            page.goto(f"/ui/jobs#job-{train['id']}")
            page.wait_for_selector(f"#job-{train['id']} svg.loss")
            page.screenshot(path=shots / "console-jobs.png")
            job_done(http, train["id"])

            # an upload from the page: progress, ingestion, the training that follows (and one through the API)
            http.post("/v1/streams/notes/documents", json={"documents": [
                "Operators write notes here; past the threshold they become a corpus.", "A second note."]})
            page.goto("/ui/corpora")
            jargon = home / "jargon.txt"
            jargon.write_text(texts["jargon"], encoding="utf-8")
            page.set_input_files("#upload-file", str(jargon))
            page.fill("#upload-name", "jargon")
            page.click("#upload-button")
            page.wait_for_selector("#upload-result:not([hidden])")
            http.post("/v1/corpora?name=python-docs", content=texts["python-docs"].encode(),
                      headers={"content-type": "text/plain"})
            page.wait_for_function("document.querySelector('#upload-result').textContent.includes('→ v')",
                                   timeout=600_000)
            page.wait_for_timeout(1500)  # the table's refresh
            page.screenshot(path=shots / "console-corpora.png")
            wait(lambda: all(j["state"] in ("succeeded", "failed", "cancelled") for j in http.get("/v1/jobs").json()),
                 600, "every job")

            # roll back and forward: the activation history
            versions = http.get("/v1/versions").json()
            active = next(v["id"] for v in versions if v["active"])
            http.post(f"/v1/versions/{active - 1}/activate", json={"reason": "rollback drill"})
            http.post(f"/v1/versions/{active}/activate", json={"reason": "back after the drill"})

            # traffic, so the experts have usage over time
            for round_ in range(4):
                for seed, prompt in enumerate(PROMPTS):
                    http.post("/v1/generate", json={"prompt": prompt, "max_tokens": 48, "temperature": 0.8,
                                                    "seed": round_ * 100 + seed})
                time.sleep(0.6)

            page.goto("/ui/playground")
            page.fill("#prompt", "ROMEO:\n")
            page.fill("#max_tokens", "300")
            page.fill("#seed", "3")
            page.click("#generate-button")
            page.wait_for_selector("#output-text[data-done='true']")
            page.screenshot(path=shots / "console-playground.png")

            layer = next(iter(http.get("/v1/versions").json()[0]["experts"]))
            page.goto(f"/ui/experts?layer={layer}")
            page.wait_for_selector("#heatmap svg")
            page.screenshot(path=shots / "console-experts.png")

            page.goto("/ui/evaluation")
            page.screenshot(path=shots / "console-evaluation.png")
            page.goto("/ui/versions")
            page.screenshot(path=shots / "console-versions.png")
            browser.close()
        http.close()
        server.should_exit = True
        thread.join(timeout=30)
    for path in sorted(shots.glob("console-*.png")):
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
