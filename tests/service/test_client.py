"""``peer-service client`` against a live service over real HTTP (uvicorn on loopback, the embedded SQLite
default, a tiny model, API keys on; jobs run by an in-process worker thread): streamed generation with the
version on stderr, ``upload --wait`` with progress bars to 100% and the new version, ``jobs`` (list, watch,
cancel, a failed job's error), ``versions``, ``activate``, ``usage``; API errors as the API's message with
exit 2, an unreachable service with exit 1, never a traceback."""
from __future__ import annotations

import json
import queue
import sys
import threading

import httpx
import pytest

from service import cli, client
from service.api.app import create_app
from service.context import ServiceContext
from service.db.migrate import upgrade
from service.jobs.forget import run_forget_job
from service.jobs.ingest import run_ingest_job
from service.jobs.train import run_train_job

from .conftest import ServerThread, domain_text, free_port, tiny_settings, wait_for

KEY = "s3cret"


class InlineWorker:
    """The workers' part in a thread of this process: runs dispatched jobs one at a time; ``go`` pauses it."""

    def __init__(self, settings):
        self.settings = settings
        self.jobs: queue.Queue = queue.Queue()
        self.go = threading.Event()
        self.go.set()
        self.idle = threading.Event()
        self.ctx = ServiceContext.from_settings(settings)
        self.thread = threading.Thread(target=self.loop, name="inline-worker", daemon=True)

    def dispatch(self, job) -> None:
        self.idle.clear()
        self.jobs.put((job.kind, job.id))

    def loop(self) -> None:
        run = {"ingest": lambda job_id: run_ingest_job(self.ctx, job_id, self.dispatch),
               "train": lambda job_id: run_train_job(self.ctx, job_id),
               "forget": lambda job_id: run_forget_job(self.ctx, job_id)}
        while True:
            if self.jobs.empty():
                self.idle.set()
            item = self.jobs.get()
            if item is None:
                return
            self.go.wait()
            kind, job_id = item
            try:
                run[kind](job_id)
            except Exception as exc:  # noqa: BLE001 - the job records its own failure; keep serving
                print(f"inline worker: job {job_id} raised {exc!r}", file=sys.stderr)

    def __enter__(self) -> "InlineWorker":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.go.set()
        self.jobs.put(None)
        self.thread.join(timeout=60)
        self.ctx.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    settings = tiny_settings(tmp_path_factory.mktemp("home"), api_keys=[KEY])
    upgrade(settings.resolved_database_url)
    with InlineWorker(settings) as worker:
        with ServerThread(create_app(settings, dispatch=worker.dispatch)) as server:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                yield server.url, http, worker


@pytest.fixture(autouse=True)
def no_client_env(monkeypatch):
    monkeypatch.delenv("PEER_URL", raising=False)
    monkeypatch.delenv("PEER_API_KEY", raising=False)


def peer(url: str, *argv: str, key: str | None = KEY) -> int:
    """``peerctl --url URL [--key KEY] ARGV...`` in process; its exit status."""
    return client.main(["--url", url, *(["--key", key] if key else []), *argv])


def ok(response, status: int = 200):
    assert response.status_code == status, response.text
    return response.json()


class Writes:
    """A stdout that remembers each write: streamed text arrives in several."""

    def __init__(self):
        self.chunks: list[str] = []

    def write(self, text: str) -> int:
        self.chunks.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_generate_streams_the_text_and_reports_the_version(service, capsys, monkeypatch):
    url, http, _ = service
    expected = ok(http.post("/v1/generate", json={"prompt": "the", "max_tokens": 16, "temperature": 0}))
    stdout = Writes()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert peer(url, "generate", "the", "--max-tokens", "16", "--temperature", "0", key=None) == 0
    monkeypatch.undo()
    streamed = "".join(stdout.chunks)
    assert streamed.rstrip("\n") == expected["text"].rstrip("\n")
    assert len([c for c in stdout.chunks if c.strip()]) >= 2  # written as the tokens arrived
    err = capsys.readouterr().err
    assert "[version 1 · 16 tokens · length" in err

    assert peer(url, "generate", "the", "--max-tokens", "16", "--temperature", "0", "--no-stream") == 0
    captured = capsys.readouterr()
    assert captured.out == expected["text"] + "\n" and "[version 1 · 16 tokens" in captured.err

    assert peer(url, "--json", "generate", "the", "--max-tokens", "16", "--temperature", "0", "--seed", "3",
                "--top-k", "5", "--top-p", "0.9", "--stop", "zzz") == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["version"] == 1 and answer["text"] == expected["text"]


def test_an_unreachable_service_is_a_clear_message_and_exit_1(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert peer(url, "versions") == 1
    err = capsys.readouterr().err
    assert f"cannot reach the service at {url}" in err and "Traceback" not in err
    assert peer(url, "generate", "x") == 1
    assert "cannot reach the service" in capsys.readouterr().err


def test_api_errors_are_the_detail_message_and_exit_2(service, capsys):
    url, _, _ = service
    assert peer(url, "activate", "1", key="wrong") == 2
    err = capsys.readouterr().err
    assert err.startswith("peer: 401") and "needs an API key" in err and "Traceback" not in err
    assert peer(url, "activate", "1", key=None) == 2
    assert "needs an API key" in capsys.readouterr().err
    assert peer(url, "jobs", "watch", "999") == 2
    err = capsys.readouterr().err
    assert err.startswith("peer: 404") and "999" in err
    assert peer(url, "generate", "x", "--top-p", "0") == 2  # a 422 before any streaming
    assert "top_p" in capsys.readouterr().err
    assert peer(url, "jobs", "--state", "bogus") == 2
    assert "state must be one of" in capsys.readouterr().err


def test_upload_wait_follows_ingest_and_training_to_the_new_version(service, capsys, tmp_path):
    url, http, _ = service
    path = tmp_path / "english.txt"
    path.write_text(domain_text("english"))
    assert peer(url, "upload", str(path), "--wait", "--poll", "0.1", "-o", "activate=always") == 0
    captured = capsys.readouterr()
    jobs = ok(http.get("/v1/jobs"))
    train, ingest = jobs[0], jobs[1]
    assert (ingest["kind"], train["kind"]) == ("ingest", "train") and ingest["next_job_id"] == train["id"]
    assert train["state"] == "succeeded" and train["options"] == {"activate": "always"}
    assert f"corpus {ingest['corpus_ids'][0]} (english, " in captured.err
    # one bar per job, each ending at 100% (tqdm rewrites its line with \r)
    for job in (ingest, train):
        frames = [f for f in captured.err.replace("\n", "\r").split("\r") if f.startswith(f"job {job['id']} ")]
        assert frames and frames[-1].startswith(f"job {job['id']} {job['kind']}: 100%|") \
            and frames[-1].rstrip().endswith("succeeded"), frames
    assert f"job {ingest['id']} (ingest) succeeded; job {train['id']} follows" in captured.out
    assert f"job {train['id']} (train) succeeded: version 2, active" in captured.out.splitlines()[-1]
    assert train["result_version_id"] == 2


def test_upload_without_wait_prints_the_ids_and_json_for_scripts(service, capsys, tmp_path):
    url, http, worker = service
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"text": f"note {i}: the cat sat on the mat."}) + "\n" for i in range(20)))
    assert peer(url, "upload", str(path), "--no-train", "--name", "notes") == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("corpus ") and "(notes, " in line and line.endswith(": queued") and "ingest job" in line
    assert peer(url, "--json", "upload", str(path), "--no-train", "--name", "notes-2", "--wait", "--poll",
                "0.1") == 0
    captured = capsys.readouterr()
    body = json.loads(captured.out)
    corpus = body["corpus"]
    assert corpus["name"] == "notes-2" and corpus["state"] == "ready" and corpus["documents"] == 20
    assert [j["kind"] for j in body["jobs"]] == ["ingest"] and body["jobs"][0]["next_job_id"] is None
    assert "%|" not in captured.err  # no progress bars in --json mode
    wait_for(worker.idle.is_set, 60, what="the worker to finish")


def test_jobs_lists_and_watches_a_finished_job(service, capsys):
    url, http, _ = service
    train = ok(http.get("/v1/jobs", params={"kind": "train", "state": "succeeded"}))[0]
    assert peer(url, "jobs", "watch", str(train["id"]), key=None) == 0
    captured = capsys.readouterr()
    assert f"job {train['id']} train: 100%|" in captured.err and "succeeded" in captured.err
    assert captured.out.startswith(f"job {train['id']} (train) succeeded: version 2")

    assert peer(url, "jobs", key=None) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "KIND", "STATE", "PROGRESS", "CORPORA", "BASE", "RESULT", "TOK/S", "CREATED",
                                "ERROR"]
    row = next(line.split() for line in lines[1:] if line.split()[0] == str(train["id"]))
    assert row[1:7] == ["train", "succeeded", "100%", ",".join(map(str, train["corpus_ids"])),
                        str(train["base_version_id"] or "-"), "2"]

    assert peer(url, "jobs", "--state", "succeeded", "--kind", "train", "--json") == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)] == [train["id"]]
    assert peer(url, "jobs", "show", str(train["id"])) == 0
    assert "result_version_id: 2" in capsys.readouterr().out


def test_a_cancelled_and_a_failed_job_end_a_watch_with_exit_1_and_the_reason(service, capsys, tmp_path):
    url, http, worker = service
    wait_for(worker.idle.is_set, 60, what="the worker to be idle")
    worker.go.clear()  # jobs queue up until the test lets them run
    try:
        path = tmp_path / "later.txt"
        path.write_text(domain_text("code", sentences=40))
        assert peer(url, "upload", str(path)) == 0
        capsys.readouterr()
        queued = ok(http.get("/v1/jobs", params={"state": "queued"}))[0]
        assert peer(url, "jobs", "cancel", str(queued["id"])) == 0
        assert capsys.readouterr().out.strip() == f"job {queued['id']} (ingest): cancelled"
        assert peer(url, "jobs", "cancel", str(queued["id"])) == 2
        assert "409" in capsys.readouterr().err

        path = tmp_path / "broken.txt"
        path.write_text("text whose stored copy will be gone when the ingest job runs\n")
        assert peer(url, "--json", "upload", str(path), "--no-train") == 0
        accepted = json.loads(capsys.readouterr().out)
        worker.ctx.store.corpus_path(accepted["corpus"]["id"], "raw").unlink()
    finally:
        worker.go.set()
    assert peer(url, "jobs", "watch", str(queued["id"])) == 1
    assert f"peer: job {queued['id']} (ingest) cancelled" in capsys.readouterr().err
    assert peer(url, "jobs", "watch", str(accepted["job"]["id"]), "--poll", "0.1") == 1
    err = capsys.readouterr().err
    assert f"peer: job {accepted['job']['id']} (ingest) failed: FileNotFoundError" in err and "Traceback" not in err


def test_versions_mark_the_active_one(service, capsys):
    url, http, _ = service
    assert peer(url, "versions", key=None) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "PARENT", "ACTIVE", "CORPORA", "STRATEGY", "MEAN", "BPB", "PROBE", "GATE"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"1", "2"}
    version_2 = ok(http.get("/v1/versions/2"))
    bpb = sum(version_2["evaluation"].values()) / len(version_2["evaluation"])
    assert rows["2"].split()[:6] == ["2", "1", "*", ",".join(map(str, version_2["corpus_ids"])),
                                     version_2["strategy"], f"{bpb:.3f}"]
    assert "*" not in rows["1"] and "fresh model" in rows["1"]
    assert peer(url, "versions", "--json") == 0
    assert [v["active"] for v in json.loads(capsys.readouterr().out)] == [True, False]


def test_usage_shows_the_layers_and_json_is_the_utilization_endpoint(service, capsys):
    url, http, _ = service
    layer = int(next(iter(ok(http.get("/v1/versions/1"))["experts"])))
    usage = wait_for(lambda: (lambda u: u if u["layers"][str(layer)]["tokens"] > 0 else None)(
        ok(http.get("/v1/experts/utilization", params={"layer": layer, "version": 1}))), 30, what="stored usage")
    assert peer(url, "usage", "--layer", str(layer), "--version", "1", "--json", key=None) == 0
    assert json.loads(capsys.readouterr().out) == usage
    assert peer(url, "usage", "--version", "1", "--top", "3") == 0
    out = capsys.readouterr().out
    stats = usage["layers"][str(layer)]
    assert f"version 1, layer {layer}: {stats['tokens']:,} tokens observed" in out
    assert f"experts used      {stats['experts_used']:,} / {stats['num_experts']:,}" in out
    assert "KL from uniform" in out and f"{stats['kl_from_uniform']:.3f} nats" in out
    hottest = out.split("hottest experts")[1].splitlines()[0]
    assert hottest.strip().startswith(f"{stats['hottest'][0][0]} (") and hottest.count("(") == 3
    assert "segments:" in out and "SELECTIONS" in out
    assert peer(url, "usage", "--layer", "99") == 2
    assert "not a PEER layer" in capsys.readouterr().err


def test_activate_switches_the_served_version_with_the_key_from_the_environment(service, capsys, monkeypatch):
    url, http, _ = service
    monkeypatch.setenv("PEER_URL", url)
    monkeypatch.setenv("PEER_API_KEY", KEY)
    assert client.main(["activate", "1", "--reason", "rollback from the client"]) == 0
    assert capsys.readouterr().out.strip() == "version 1 is active"
    assert [v["id"] for v in ok(http.get("/v1/versions")) if v["active"]] == [1]
    assert ok(http.get("/v1/versions/1"))["activations"][-1]["reason"] == "rollback from the client"
    assert ok(http.post("/v1/generate", json={"prompt": "a", "max_tokens": 2}))["version"] == 1
    assert client.main(["versions"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["1"][2] == "*" and rows["2"][2] != "*"


def test_peer_service_client_subcommand_takes_the_options_before_or_after_the_command(service, capsys):
    url, http, _ = service
    assert cli.main(["client", "--url", url, "--json", "versions"]) == 0
    from_before = json.loads(capsys.readouterr().out)
    assert cli.main(["client", "versions", "--url", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_before == ok(http.get("/v1/versions"))
    assert cli.main(["client", "--url", url, "activate", "2", "--key", KEY, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["active"] is True


def test_upload_reads_jsonl_lines_at_newlines_only():
    """A JSONL document holding U+2028 (JSON may carry it raw) was cut in two by str.splitlines: "not JSON"."""
    data = (json.dumps({"text": "before\u2028after\x85end"}, ensure_ascii=False) + "\n\n").encode()
    assert client._documents(data, "notes.jsonl") == ["before\u2028after\x85end"]


def test_upload_refuses_jsonl_python_cannot_parse_with_a_message(tmp_path):
    for line in ('{"text": "a", "n": ' + "9" * 5000 + "}", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"):
        with pytest.raises(client.ClientError, match="notes.jsonl:1: not JSON"):
            client._documents(line.encode(), "notes.jsonl")
