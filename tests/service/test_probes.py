"""Probes over HTTP on SQLite and PostgreSQL, jobs run by an in-process worker: a probe is uploaded (bad ones are a
4xx with the reason, nothing stored), a training job that names it records the new version's and its parent's scores,
which are those of :func:`peer_model.probe.score_probe` called on the published checkpoints, and they appear in
/v1/versions, on the console's versions page and in ``peerctl versions``; a cancel stops the scoring; a forget job
scores the same way; a probe is deleted unless a live job names it."""
from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from sqlalchemy import func, select

from peer_model.probe import ProbeItem, is_correct, parse_probe, probe_answers, score_probe
from service.api.app import create_app
from service.client import main as peerctl
from service.context import ServiceContext
from service.db.migrate import upgrade
from service.db.models import Job, PoolVersion, Probe
from service.db.session import transaction
from service.jobs.lease import create_job, request_cancel
from service.jobs.train import run_train_job
from service.store.store import Store
from service.worker.inline import InlineWorker

from .conftest import ServerThread, domain_text, tiny_settings, wait_for

MAX_ITEMS = 40
MAX_BYTES = 20_000


def ok(response, status: int = 200) -> dict:
    assert response.status_code == status, response.text
    return response.json()


def jsonl(items: list[dict]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode()


def upload_probe(http, body: bytes, name: str = "probe", content_type: str = "application/jsonl"):
    return http.post("/v1/probes", params={"name": name}, content=body, headers={"Content-Type": content_type})


def wait_job(http, job_id: int) -> dict:
    return wait_for(lambda: (lambda j: j if j["state"] in ("succeeded", "failed", "cancelled") else None)(
        ok(http.get(f"/v1/jobs/{job_id}"))), 180, interval=0.2, what=f"job {job_id}")


def train_on(http, name: str, text: str, options: dict) -> dict:
    """Upload a corpus and follow its ingest and training jobs; the training job."""
    accepted = ok(http.post("/v1/corpora", json={"name": name, "text": text, "train_options": options}), 202)
    ingest = wait_job(http, accepted["job"]["id"])
    assert ingest["state"] == "succeeded", ingest["error"]
    train = wait_job(http, ingest["next_job_id"])
    assert train["state"] == "succeeded", train["error"]
    return train


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def service(request, tmp_path_factory):
    database = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    settings = tiny_settings(tmp_path_factory.mktemp("home"), database, max_probe_items=MAX_ITEMS,
                             max_probe_bytes=MAX_BYTES)
    upgrade(settings.resolved_database_url)
    with InlineWorker(settings) as worker, ServerThread(create_app(settings, dispatch=worker.dispatch)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            yield settings, server.url, http


def kept_items(model, prompts: list[str]) -> list[ProbeItem]:
    """Questions the model answers correctly: its own greedy continuation of each prompt, cut before a character
    that is not a letter or digit (ASCII only, so no character is split across a token budget)."""
    items = []
    for prompt, text in zip(prompts, probe_answers(model, model.tokenizer, [ProbeItem(p, "x") for p in prompts],
                                                   max_new_tokens=10)):
        cuts = [k for k in range(1, len(text)) if text[:k + 1].isascii() and text[:k].strip()
                and not text[k].isalnum() and is_correct(text[:k], text)]
        if cuts:
            items.append(ProbeItem(prompt, text[:cuts[-1]], "kept"))
    return items


@pytest.fixture(scope="module")
def probed(service):
    """English trains version 1 into a parent; a probe of what the parent answers ("kept") and of statements of the
    code corpus ("facts") is uploaded; the code corpus then trains the parent into a child, the job naming the probe."""
    settings, _, http = service
    parent_job = train_on(http, "english", domain_text("english"), {"steps": 400})  # answers words
    parent = ok(http.get(f"/v1/versions/{parent_job['result_version_id']}"))
    parent_model = Store(settings.resolved_store_dir).load_model(parent["checkpoint"])
    kept = kept_items(parent_model, ["the cat", "my friend wants", "a dog", "the old man finds", "the", "a dog sees"])
    assert len(kept) >= 3, kept
    code = domain_text("code")
    statements = [s.strip() for s in code.split(";")[:12] if s.strip()]
    facts = [ProbeItem(s.rsplit(" ", 1)[0], s.rsplit(" ", 1)[1], "facts") for s in statements]
    items = facts + kept
    probe = ok(upload_probe(http, jsonl([{"prompt": i.prompt, "answer": i.answer, "kind": i.kind} for i in items]),
                            name="code facts"), 201)
    assert probe["items"] == len(items) and probe["kinds"] == {"facts": len(facts), "kept": len(kept)}
    child_job = train_on(http, "code", code, {"probe": probe["id"], "activate": "always"})
    return probe, items, parent, child_job


def test_a_probe_is_stored_as_uploaded_and_listed(service, probed):
    settings, _, http = service
    probe, items, _, _ = probed
    assert ok(http.get(f"/v1/probes/{probe['id']}")) == probe
    assert probe["id"] in [p["id"] for p in ok(http.get("/v1/probes"))]
    assert parse_probe(Store(settings.resolved_store_dir).read_probe(probe["id"])) == items
    assert "not found" in ok(http.get("/v1/probes/999999"), 404)["detail"]


def test_the_job_records_the_childs_and_the_parents_scores_on_the_probe(service, probed):
    """The recorded scores are those of score_probe on the two published checkpoints, called here."""
    settings, _, http = service
    probe, items, parent, child_job = probed
    child = ok(http.get(f"/v1/versions/{child_job['result_version_id']}"))
    assert child["parent_id"] == parent["id"]
    store = Store(settings.resolved_store_dir)
    expected = {label: score_probe(model, model.tokenizer, items)
                for label, model in (("child", store.load_model(child["checkpoint"])),
                                     ("parent", store.load_model(parent["checkpoint"])))}
    scores = child["probe_scores"]
    assert scores == {"probe": probe["id"], "name": "code facts", "items": len(items), **expected}
    assert list(scores["child"]) == ["facts", "kept", "all"]
    assert scores["parent"]["kept"]["accuracy"] == 1.0  # the parent's own answers, scored by the job
    assert child_job["progress"] == 1.0
    listed = next(v for v in ok(http.get("/v1/versions")) if v["id"] == child["id"])
    assert listed["probe_scores"] == scores
    assert parent["probe_scores"] is None  # its job named no probe


def test_the_console_shows_the_scores_per_kind_child_against_parent(service, probed):
    _, _, http = service
    _, _, parent, child_job = probed
    version_id = child_job["result_version_id"]
    scores = ok(http.get(f"/v1/versions/{version_id}"))["probe_scores"]
    page = http.get("/ui/versions").text
    article = page[page.index(f'id="version-{version_id}"'):]
    article = article[:article.index("</article>")]
    assert f"v{parent['id']}" in article and "code facts" in article
    for kind in ("facts", "kept", "all"):
        row = re.search(rf'<tr data-kind="{kind}">(.*?)</tr>', article, re.S).group(1)
        child, parent_score = scores["child"][kind], scores["parent"][kind]
        assert f"{100 * child['accuracy']:.1f}%" in row and f"{child['correct']}/{child['total']}" in row
        assert f"{100 * parent_score['accuracy']:.1f}%" in row
        assert f"{100 * (child['accuracy'] - parent_score['accuracy']):+.1f} points" in row


def test_peerctl_uploads_a_probe_and_lists_the_scores(service, probed, tmp_path, capsys):
    _, url, _ = service
    path = tmp_path / "arith.jsonl"
    path.write_bytes(jsonl([{"prompt": "2 + 2 =", "answer": "4", "kind": "arithmetic"}]))
    assert peerctl(["--url", url, "probe", "upload", str(path)]) == 0
    uploaded = re.search(r"probe (\d+) \(arith\): 1 items \(arithmetic 1\)", capsys.readouterr().out)
    assert uploaded
    assert peerctl(["--url", url, "probe", "delete", uploaded[1]]) == 0
    assert f"probe {uploaded[1]} (arith) deleted" in capsys.readouterr().out
    assert peerctl(["--url", url, "probe", "delete", uploaded[1]]) != 0
    assert f"probe {uploaded[1]} not found" in capsys.readouterr().err
    assert peerctl(["--url", url, "versions"]) == 0
    assert re.search(r"\d+% \(parent 100%\)|\d+% \(parent \d+%\)", capsys.readouterr().out)
    path.write_bytes(b'{"prompt": "2 + 2 ="}\n')
    assert peerctl(["--url", url, "probe", "upload", str(path)]) == 2
    assert 'line 1: "answer" is missing' in capsys.readouterr().err


@pytest.mark.parametrize("body, content_type, status, message", [
    (b"", "application/jsonl", 422, "holds no item"),
    (b'{"prompt": "a", "answer": "b"}\n{"prompt": "a",\n', "application/jsonl", 422, "line 2: invalid JSON"),
    (b'{"prompt": "a", "answer": ""}', "application/jsonl", 422, 'line 1: "answer" is empty'),
    (b'{"prompt": "a", "answer": "b", "kind": "all"}', "application/jsonl", 422, 'line 1: "kind" must be'),
    (b'{"prompt": "a", "answer": 1}', "application/x-ndjson", 422, 'line 1: "answer" must be a string'),
    (b'{"prompt": "\\ud800", "answer": "b"}', "application/jsonl", 422, "not valid Unicode"),
    (b'{"prompt": "\xff", "answer": "b"}', "application/jsonl", 422, "not valid UTF-8"),
    (b'{"prompt": "a", "answer": "b"}\n' * (MAX_ITEMS + 1), "application/jsonl", 422, "PEER_MAX_PROBE_ITEMS"),
    (b'{"prompt": "a", "answer": "b"}\n' * 1000, "application/jsonl", 413, "PEER_MAX_PROBE_BYTES"),
    (b'{"prompt": "a", "answer": "b"}', "application/json", 422, "a probe is a JSONL body"),
    (b'{"prompt": "a", "answer": "b"}', "text/plain", 422, "a probe is a JSONL body"),
])
def test_a_bad_probe_is_a_4xx_with_the_reason_and_stores_nothing(service, body, content_type, status, message):
    settings, _, http = service
    before = ok(http.get("/v1/probes"))
    assert message in ok(upload_probe(http, body, content_type=content_type), status)["detail"]
    assert ok(http.get("/v1/probes")) == before


def test_a_probe_needs_a_storable_name(service):
    _, _, http = service
    assert ok(http.post("/v1/probes", content=b'{"prompt": "a", "answer": "b"}',
                        headers={"Content-Type": "application/jsonl"}), 422)
    assert ok(upload_probe(http, b'{"prompt": "a", "answer": "b"}', name="a\x00b"), 422)


def test_a_job_naming_an_unknown_probe_is_refused_at_submission(service, probed):
    _, _, http = service
    corpus_id = ok(http.get("/v1/corpora"))[0]["id"]
    jobs = len(ok(http.get("/v1/jobs")))
    for options, message in (({"probe": 999999}, "probe 999999 not found; upload it first"),
                             ({"probe": "first"}, "probe: Input should be a valid integer"),
                             ({"probe": 0}, "probe: Input should be greater than or equal to 1")):
        assert message in ok(http.post("/v1/jobs", json={"corpus_ids": [corpus_id], "options": options}), 422)["detail"]
        assert message in ok(http.post("/v1/corpora", json={"name": "x", "text": "some text", "train_options": options}),
                             422)["detail"]
    assert len(ok(http.get("/v1/jobs"))) == jobs


def test_a_cancel_stops_the_scoring_and_publishes_nothing(service, probed, monkeypatch):
    """Scoring reads the cancel flag with every item's heartbeat: a job cancelled while it scores stops there."""
    import service.jobs.probes as probes

    settings, _, http = service
    probe, items, _, child_job = probed
    ctx = ServiceContext.from_settings(settings)
    try:
        with transaction(ctx.sessions) as session:
            job_id = create_job(session, "train", child_job["corpus_ids"], {"probe": probe["id"], "steps": 2}).id
        answered = []

        def cancelled_while_scoring(model, tokenizer, probe_items, on_item):
            with transaction(ctx.sessions) as session:
                request_cancel(session, job_id)

            def slow(done, total):  # the tiny model answers an item in far less than a heartbeat interval
                answered.append(done)
                time.sleep(0.05)
                on_item(done, total)

            return score_probe(model, tokenizer, probe_items, on_item=slow)

        monkeypatch.setattr(probes, "score_probe", cancelled_while_scoring)
        versions = len(ok(http.get("/v1/versions")))
        run_train_job(ctx, job_id)
        with ctx.sessions() as session:
            job = session.get(Job, job_id)
            assert job.state == "cancelled" and job.result_version_id is None
            assert session.scalar(select(func.count(PoolVersion.id))) == versions
            assert session.scalar(select(func.count(Probe.id))) >= 1
        assert 1 <= len(answered) < len(items)  # the child's scoring stopped; the parent's never started
    finally:
        ctx.close()


def test_garbage_collection_keeps_probes_and_removes_files_no_probe_row_names(service, probed):
    """An upload whose commit failed leaves its file without a row: garbage once past the grace period."""
    from service.store.retention import collect_garbage

    settings, _, _ = service
    probe = probed[0]
    ctx = ServiceContext.from_settings(settings.model_copy(update={"gc_grace_seconds": 0}))
    try:
        ctx.store.write_probe(999_999, b'{"prompt": "a", "answer": "b"}\n')
        time.sleep(0.01)
        removed = collect_garbage(ctx).paths
        assert "probes/999999" in removed and f"probes/{probe['id']}" not in removed
        assert parse_probe(ctx.store.read_probe(probe["id"]))
    finally:
        ctx.close()


def test_a_forget_job_that_names_the_probe_records_the_scores_without_the_corpus_and_before(service, probed):
    """Forgetting the code corpus (its segment masked) from the version that learnt it: the job scores the forgetting
    child and that version on the probe, as score_probe does on the two checkpoints."""
    settings, _, http = service
    probe, items, _, child_job = probed
    learnt = ok(http.get(f"/v1/versions/{child_job['result_version_id']}"))
    code = child_job["corpus_ids"][0]
    unknown = http.post(f"/v1/corpora/{code}/forget",
                        json={"base_version_id": learnt["id"], "options": {"probe": 999999}})
    assert "probe 999999 not found" in ok(unknown, 422)["detail"]
    job = wait_job(http, ok(http.post(f"/v1/corpora/{code}/forget", json={
        "base_version_id": learnt["id"], "options": {"probe": probe["id"], "activate": "never"}}), 202)["id"])
    assert job["state"] == "succeeded", job["error"]
    forgot = ok(http.get(f"/v1/versions/{job['result_version_id']}"))
    store = Store(settings.resolved_store_dir)
    expected = {label: score_probe(model, model.tokenizer, items)
                for label, model in (("child", store.load_model(forgot["checkpoint"])),
                                     ("parent", store.load_model(learnt["checkpoint"])))}
    assert forgot["probe_scores"] == {"probe": probe["id"], "name": "code facts", "items": len(items), **expected}
    assert job["progress"] == 1.0


def test_a_probe_is_deleted_with_its_file_unless_a_live_job_names_it_and_the_scores_stay(service, probed):
    settings, _, http = service
    probe, _, _, child_job = probed
    spare = ok(upload_probe(http, b'{"prompt": "a", "answer": "b"}\n', name="spare"), 201)
    store = Store(settings.resolved_store_dir)
    ctx = ServiceContext.from_settings(settings)
    try:
        with transaction(ctx.sessions) as session:  # queued, never dispatched
            job_id = create_job(session, "train", child_job["corpus_ids"], {"probe": spare["id"]}).id
        refused = ok(http.delete(f"/v1/probes/{spare['id']}"), 409)["detail"]
        assert f"queued or running jobs [{job_id}] name it" in refused
        assert ok(http.get(f"/v1/probes/{spare['id']}")) == spare and store.read_probe(spare["id"])
        with transaction(ctx.sessions) as session:
            request_cancel(session, job_id)
    finally:
        ctx.close()
    assert ok(http.delete(f"/v1/probes/{spare['id']}")) == spare
    assert "not found" in ok(http.get(f"/v1/probes/{spare['id']}"), 404)["detail"]
    assert not store.files.exists(store.probe_key(spare["id"]))
    assert "not found" in ok(http.delete(f"/v1/probes/{spare['id']}"), 404)["detail"]
    ok(http.delete(f"/v1/probes/{probe['id']}"))  # the scores it gave stay with the version
    child = ok(http.get(f"/v1/versions/{child_job['result_version_id']}"))
    assert child["probe_scores"]["probe"] == probe["id"] and child["probe_scores"]["name"] == "code facts"
