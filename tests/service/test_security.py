"""Security of the HTTP API, through the real app on the embedded SQLite default: API keys with names and
scopes, the audit's actor, cross-site requests, body limits, rate limits and hostile input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.db.migrate import upgrade

from .conftest import ServerThread, tiny_settings

KEYS = ["legacy-secret", "reader:r-secret:read", "gen:g-secret:generate", "trainer:t-secret:train+read",
        "ops:o-secret:admin"]


def bearer(secret: str) -> dict:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One SQLite database for the module's apps (each test builds the app with the settings it needs)."""
    path = tmp_path_factory.mktemp("home")
    upgrade(tiny_settings(path).resolved_database_url)
    return path


def service(home, **overrides) -> TestClient:
    """A TestClient on the app built from tiny settings (SQLite under ``home``); jobs are not dispatched."""
    return TestClient(create_app(tiny_settings(home, **overrides), dispatch=lambda job: None))


@pytest.fixture(scope="module")
def keyed(home):
    with service(home, api_keys=KEYS) as client:
        yield client


CORPUS = {"name": "c", "text": "some text to learn", "train": False}


def test_legacy_secrets_get_every_scope_and_are_named_by_position(keyed):
    assert keyed.post("/v1/corpora", json=CORPUS, headers=bearer("legacy-secret")).status_code == 202
    activated = keyed.post("/v1/versions/1/activate", json={"reason": "rollback drill"},
                           headers=bearer("legacy-secret"))
    assert activated.status_code == 200, activated.text
    assert activated.json()["activations"][-1]["actor"] == "api-key:key-1"


def test_the_audit_records_the_key_name_never_part_of_the_secret(keyed):
    activated = keyed.post("/v1/versions/1/activate", headers=bearer("o-secret"))
    assert activated.status_code == 200, activated.text
    actors = [a["actor"] for a in activated.json()["activations"]]
    assert actors[-1] == "api-key:ops"
    assert not any("o-se" in actor or "lega" in actor for actor in actors)


@pytest.mark.parametrize("secret,method,path,body,allowed", [
    ("r-secret", "get", "/v1/versions", None, True),
    ("r-secret", "post", "/v1/corpora", CORPUS, False),
    ("t-secret", "post", "/v1/corpora", CORPUS, True),
    ("t-secret", "post", "/v1/versions/1/activate", None, False),
    ("g-secret", "post", "/v1/jobs/1/cancel", None, False),
    ("o-secret", "post", "/v1/streams/s/flush", None, False),
])
def test_a_key_without_the_routes_scope_is_forbidden(keyed, secret, method, path, body, allowed):
    response = getattr(keyed, method)(path, headers=bearer(secret), **({"json": body} if body else {}))
    if allowed:
        assert response.status_code < 400, response.text
    else:
        assert response.status_code == 403, response.text
        assert "lacks the" in response.json()["detail"]


def ingest_with_key(client, name: str, secret: str) -> int:
    """A corpus uploaded with ``secret`` and ingested in process (the app dispatches nothing): its id."""
    from service.jobs.ingest import run_ingest_job

    accepted = client.post("/v1/corpora", json={"name": name, "text": "text to learn " * 50, "train": False},
                           headers=bearer(secret))
    assert accepted.status_code == 202, accepted.text
    run_ingest_job(client.app.state.ctx, accepted.json()["job"]["id"], lambda job: None)
    return accepted.json()["corpus"]["id"]


def test_only_an_admin_may_activate_outside_the_gate(keyed):
    """activate "always" (with an old base_version_id: a rollback) is an activation: a train key gets a 403 on
    every route that takes job options and nothing is recorded; "auto" stays a train key's; an admin may."""
    corpus_id = ingest_with_key(keyed, "rights", "t-secret")
    jobs_before = len(keyed.get("/v1/jobs").json())
    corpora_before = len(keyed.get("/v1/corpora").json())
    always = {"activate": "always", "steps": 1}
    for method, path, body in (
            ("post", "/v1/jobs", {"corpus_ids": [corpus_id], "base_version_id": 1, "options": always}),
            ("post", "/v1/corpora", {"name": "r", "text": "some text", "train_options": always}),
            ("post", f"/v1/corpora/{corpus_id}/forget", {"options": always})):
        refused = getattr(keyed, method)(path, json=body, headers=bearer("t-secret"))
        assert refused.status_code == 403 and "'admin' scope" in refused.json()["detail"], (path, refused.text)
    assert len(keyed.get("/v1/jobs").json()) == jobs_before
    assert len(keyed.get("/v1/corpora").json()) == corpora_before
    auto = keyed.post("/v1/jobs", json={"corpus_ids": [corpus_id], "options": {"steps": 1}}, headers=bearer("t-secret"))
    assert auto.status_code == 202, auto.text
    admin = keyed.post("/v1/jobs", json={"corpus_ids": [corpus_id], "options": always}, headers=bearer("legacy-secret"))
    assert admin.status_code == 202, admin.text


def test_mutating_routes_need_a_key_and_reads_do_not_by_default(keyed):
    assert keyed.post("/v1/corpora", json=CORPUS).status_code == 401
    assert keyed.post("/v1/corpora", json=CORPUS, headers=bearer("wrong")).status_code == 401
    assert keyed.get("/v1/versions").status_code == 200
    # the OpenAI client always sends a key: an unknown one on an open route is ignored
    assert keyed.post("/v1/tokenize", json={"text": "a"}, headers=bearer("unused")).status_code == 200


def test_a_non_ascii_bearer_token_is_a_401_not_a_500(keyed):
    for token in ("clé", "🔑", "\u00e9t\u00e9"):
        response = keyed.post("/v1/corpora", json=CORPUS, headers={"Authorization": f"Bearer {token}".encode()})
        assert response.status_code == 401, response.text


def test_require_key_for_all_guards_reading_and_generation(home):
    with service(home, api_keys=KEYS, require_key_for="all") as client:
        assert client.get("/v1/versions").status_code == 401
        assert client.post("/v1/tokenize", json={"text": "a"}).status_code == 401
        assert client.get("/v1/versions", headers=bearer("r-secret")).status_code == 200
        assert client.post("/v1/tokenize", json={"text": "a"}, headers=bearer("r-secret")).status_code == 403
        assert client.post("/v1/tokenize", json={"text": "a"}, headers=bearer("g-secret")).status_code == 200
        assert client.get("/healthz").status_code == 200


def sign_in(client, secret: str) -> str:
    """The console's sign-in: the session cookie's value."""
    signed_in = client.post("/ui/login", data={"key": secret, "next": "/ui/jobs"}, follow_redirects=False)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/ui/jobs", signed_in.text
    return signed_in.cookies["peer_session"]


def test_with_require_key_for_all_the_console_pages_need_a_reading_key_too(home):
    """The pages are rendered from the database: a caller without a reading key is sent to sign in and sees
    nothing; a key with the read scope signs in and reads."""
    with service(home, api_keys=KEYS, require_key_for="all") as client:
        refused = client.get("/ui/versions?x=1", follow_redirects=False)
        assert refused.status_code == 303 and refused.headers["location"] == "/ui/login?next=%2Fui%2Fversions%3Fx%3D1"
        assert "v1" not in refused.text and "fresh model" not in refused.text
        for page in ("/ui", "/ui/jobs", "/ui/experts", "/ui/corpora", "/ui/evaluation", "/ui/playground"):
            assert client.get(page, follow_redirects=False).status_code in (303, 307), page
        login_page = client.get("/ui/login?next=/ui/jobs")
        assert login_page.status_code == 200 and 'value="/ui/jobs"' in login_page.text
        assert client.get("/ui/static/console.css").status_code == 200  # the login page's style

        wrong = client.post("/ui/login", data={"key": "g-secret", "next": "/ui/jobs"}, follow_redirects=False)
        assert wrong.status_code == 401 and "lacks the &#39;read&#39; scope" in wrong.text and "set-cookie" not in wrong.headers
        unknown = client.post("/ui/login", data={"key": "nope"}, follow_redirects=False)
        assert unknown.status_code == 401 and "unknown API key" in unknown.text

        sign_in(client, "r-secret")
        page = client.get("/ui/versions")
        assert page.status_code == 200 and "Sign out" in page.text and "v1" in page.text and "reader" in page.text

        client.post("/ui/logout", headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"})
        assert client.get("/ui/versions", follow_redirects=False).status_code == 303
        assert client.get("/ui/versions", headers=bearer("r-secret")).status_code == 200  # a proxy, curl


def test_the_console_session_is_an_opaque_expiring_revocable_cookie(home, tmp_path):
    """The cookie holds a signed random id, never the key; the server ends it at sign-out (a copy taken before is
    worth nothing), at expiry, when the key's secret changes, or by `peer-service revoke-sessions`."""
    with service(home, api_keys=KEYS, console_session_seconds=60) as client:
        signed_in = client.post("/ui/login", data={"key": "o-secret"}, follow_redirects=False)
        header = signed_in.headers["set-cookie"].lower()
        assert "httponly" in header and "samesite=strict" in header and "path=/" in header and "max-age=60" in header
        assert "secure" not in header  # PEER_PUBLIC_SCHEME=http (the default)
        cookie = signed_in.cookies["peer_session"]
        assert "o-secret" not in cookie and len(cookie) > 40
        client.cookies.clear()
        with_cookie = {"Cookie": f"peer_session={cookie}"}
        # the session acts with its key's scopes on the JSON API too (the console's script calls it)
        activated = client.post("/v1/versions/1/activate", headers=with_cookie)
        assert activated.status_code == 200 and activated.json()["activations"][-1]["actor"] == "api-key:ops"
        assert client.post("/v1/corpora", json=CORPUS, headers=with_cookie).status_code == 403  # ops: admin only
        forged = cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")
        assert client.post("/v1/versions/1/activate", headers={"Cookie": f"peer_session={forged}"}).status_code == 401
        client.post("/ui/logout", headers=with_cookie)
        assert client.post("/v1/versions/1/activate", headers=with_cookie).status_code == 401  # revoked on the server

    with service(home, api_keys=KEYS, console_session_seconds=0.5, public_scheme="https") as client:
        signed_in = client.post("/ui/login", data={"key": "o-secret"}, follow_redirects=False)
        assert "secure" in signed_in.headers["set-cookie"].lower()  # over http: the configured public scheme
        value = signed_in.headers["set-cookie"].split(";")[0].partition("=")[2]  # httpx keeps no Secure cookie
        cookie = {"Cookie": f"peer_session={value}"}
        assert client.post("/v1/versions/1/activate", headers=cookie).status_code == 200
        time.sleep(0.6)
        assert client.post("/v1/versions/1/activate", headers=cookie).status_code == 401  # expired

    with service(home, api_keys=KEYS) as client:
        cookie = {"Cookie": f"peer_session={sign_in(client, 'o-secret')}"}
        client.cookies.clear()
    rotated = [entry.replace("o-secret", "o-rotated") for entry in KEYS]
    with service(home, api_keys=rotated) as client:
        assert client.post("/v1/versions/1/activate", headers=cookie).status_code == 401  # the key's secret changed

    with service(home, api_keys=KEYS) as client:
        ops, reader = sign_in(client, "o-secret"), sign_in(client, "r-secret")
        client.cookies.clear()
        env = {**os.environ, "PEER_HOME": str(home), "PEER_API_KEYS": ",".join(KEYS)}
        revoked = subprocess.run([sys.executable, "-m", "service.cli", "revoke-sessions", "--key", "ops"], env=env,
                                 capture_output=True, text=True)
        assert revoked.returncode == 0 and "of key 'ops'" in revoked.stdout, revoked.stderr
        assert client.post("/v1/versions/1/activate", headers={"Cookie": f"peer_session={ops}"}).status_code == 401
        assert client.get("/v1/versions", headers={"Cookie": f"peer_session={reader}"}).status_code == 200


def test_the_console_keeps_no_key_where_a_script_can_read_it(home):
    """Neither the sign-in page nor the console's script puts the key in web storage; the header names the
    session's key instead of holding an input for it."""
    from pathlib import Path

    from service.ui.rendering import HERE

    static = Path(HERE) / "static"
    for script in static.glob("*.js"):
        text = script.read_text()
        assert "sessionStorage" not in text and "localStorage" not in text, script
    with service(home, api_keys=KEYS) as client:
        assert client.get("/ui/login").status_code == 200 and not (static / "login.js").exists()
        assert 'id="api-key"' not in client.get("/ui/versions").text
        sign_in(client, "t-secret")
        assert "signed in as <b>trainer</b>" in client.get("/ui/versions").text


def test_signing_in_never_redirects_off_the_console(home):
    with service(home, api_keys=KEYS, require_key_for="all") as client:
        for target in ("https://evil.example/", "//evil.example/ui/", "/v1/versions", "/ui\\evil"):
            answer = client.post("/ui/login", data={"key": "r-secret", "next": target}, follow_redirects=False)
            assert answer.headers["location"] == "/ui/versions", target


def test_by_default_the_console_pages_are_open_like_reading(home):
    with service(home, api_keys=KEYS) as client:
        page = client.get("/ui/versions")
        assert page.status_code == 200 and "Sign out" not in page.text


def test_malformed_key_settings_stop_the_start_without_echoing_the_secret():
    from pydantic import ValidationError

    from service.settings import Settings

    for entry, problem in (("n:hunter2:fly", "scopes must be"), ("a:b:c:d", "name:secret:scope"),
                           ("bad name:hunter2:read", "name must be")):
        with pytest.raises(ValidationError) as error:
            Settings(api_keys=entry)
        assert problem in str(error.value) and "hunter2" not in str(error.value)
    with pytest.raises(ValidationError, match="needs PEER_API_KEYS"):
        Settings(require_key_for="all")


# ---- open by default: bind rule, warning, cross-site requests ---------------------------------------------


def test_api_refuses_a_non_loopback_host_without_keys(monkeypatch, tmp_path, capsys):
    from service import cli
    from service.api.bindrule import open_bind_refusal
    from service.settings import Settings

    monkeypatch.setenv("PEER_HOME", str(tmp_path))
    for command in ("api", "serve"):
        with pytest.raises(SystemExit) as exited:
            cli.main([command, "--host", "0.0.0.0"])
        assert exited.value.code == 2
        assert "refusing to listen on '0.0.0.0' without PEER_API_KEYS" in capsys.readouterr().err
    assert open_bind_refusal("127.0.0.1", Settings()) is None and open_bind_refusal("::1", Settings()) is None
    assert open_bind_refusal("0.0.0.0", Settings(api_keys="k")) is None
    assert open_bind_refusal("0.0.0.0", Settings(allow_open=True)) is None
    assert open_bind_refusal("my-host.example", Settings()) is not None


def network_address() -> str | None:
    """An address of this machine that is not loopback (the route to a private network's; nothing is sent)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_the_app_itself_answers_only_loopback_connections_without_keys(home):
    """The bind rule was the CLI's alone: the same app started any other way (uvicorn --factory, an embedding
    program) on 0.0.0.0 served every mutating route to the network."""
    import httpx

    address = network_address()
    if address is None:
        pytest.skip("this machine has no network address besides loopback")
    for settings, from_network in (({}, 403), ({"allow_open": True}, 200), ({"api_keys": KEYS}, 200)):
        with ServerThread(create_app(tiny_settings(home, **settings), dispatch=lambda job: None), host="0.0.0.0") as server:
            assert httpx.get(f"http://127.0.0.1:{server.port}/v1/versions").status_code == 200
            answer = httpx.get(f"http://{address}:{server.port}/v1/versions")
            assert answer.status_code == from_network, (settings, answer.text)
            if from_network == 403:
                assert "answers loopback connections only" in answer.json()["detail"]


def test_with_require_key_for_all_metrics_and_the_api_docs_need_a_reading_key(home):
    with service(home, api_keys=KEYS, require_key_for="all") as client:
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers=bearer("g-secret")).status_code == 403, path
            assert client.get(path, headers=bearer("r-secret")).status_code == 200, path
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200  # probes
    with service(home, api_keys=KEYS) as client:  # reading is open by default: so are they
        assert all(client.get(path).status_code == 200 for path in ("/metrics", "/docs", "/redoc", "/openapi.json"))


def test_an_open_service_says_so_at_start(home, caplog):
    with caplog.at_level("WARNING"), service(home):
        pass
    assert any("PEER_API_KEYS is not set" in record.getMessage() for record in caplog.records)


@pytest.fixture(scope="module")
def open_client(home):
    with service(home) as client:
        yield client


def activations(client) -> int:
    return len(client.get("/v1/versions/1").json()["activations"])


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example"},
    {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site", "Origin": "https://sub.testserver"},
])
def test_cross_site_requests_to_mutating_routes_are_refused(open_client, headers):
    before = activations(open_client)
    refused = open_client.post("/v1/versions/1/activate", headers=headers)  # a bodiless POST: a simple request
    assert refused.status_code == 403 and "cross-site request refused" in refused.json()["detail"]
    upload = open_client.post("/v1/corpora?name=poison", content=b"poisoned text",
                              headers={**headers, "Content-Type": "text/plain"})
    assert upload.status_code == 403
    assert activations(open_client) == before
    assert "poison" not in [c["name"] for c in open_client.get("/v1/corpora").json()]
    assert open_client.get("/v1/versions", headers=headers).status_code == 200  # reading is not refused


@pytest.mark.parametrize("headers", [
    {},  # not a browser
    {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},  # the console
    {"Origin": "http://testserver"},  # a browser without Sec-Fetch-Site
    {"Sec-Fetch-Site": "same-origin", "Origin": "https://public.example"},  # behind a proxy that rewrites Host
])
def test_same_origin_and_non_browser_requests_go_through(open_client, headers):
    assert open_client.post("/v1/versions/1/activate", headers=headers).status_code == 200


def test_allowed_origins_may_call_mutating_routes(home):
    with service(home, allowed_origins="https://console.example") as client:
        allowed = {"Origin": "https://console.example", "Sec-Fetch-Site": "cross-site"}
        assert client.post("/v1/versions/1/activate", headers=allowed).status_code == 200
        assert client.post("/v1/versions/1/activate", headers={"Origin": "https://other.example"}).status_code == 403


# ---- body limits -----------------------------------------------------------------------------------------

REQUEST_LIMIT, CORPUS_LIMIT = 4_000, 50_000


@pytest.fixture(scope="module")
def live(home):
    """Real HTTP (uvicorn on a loopback port): chunked bodies arrive as a client sends them."""
    import httpx

    app = create_app(tiny_settings(home, max_request_bytes=REQUEST_LIMIT, max_corpus_bytes=CORPUS_LIMIT),
                     dispatch=lambda job: None)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def chunks(total: int, size: int = 1000):
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


def corpus_names(http) -> list[str]:
    return [c["name"] for c in http.get("/v1/corpora").json()]


@pytest.mark.parametrize("path", ["/v1/tokenize", "/v1/generate", "/v1/completions", "/v1/chat/completions",
                                  "/v1/streams/s/documents", "/v1/jobs"])
def test_a_declared_body_over_the_limit_is_a_413(live, path):
    body = b'{"text": "' + b"a" * REQUEST_LIMIT + b'"}'
    refused = live.post(path, content=body, headers={"Content-Type": "application/json"})
    assert refused.status_code == 413 and "PEER_MAX_REQUEST_BYTES" in refused.json()["detail"]


def test_a_chunked_body_is_cut_where_it_passes_the_limit(live):
    refused = live.post("/v1/tokenize", content=chunks(REQUEST_LIMIT * 3),
                        headers={"Content-Type": "application/json"})
    assert refused.status_code == 413 and "PEER_MAX_REQUEST_BYTES" in refused.json()["detail"]
    small = live.post("/v1/tokenize", content=iter([b'{"text": ', b'"ab"}']),
                      headers={"Content-Type": "application/json"})
    assert small.status_code == 200 and small.json()["count"] == 2


def test_a_chunked_multipart_upload_without_length_is_cut_and_stores_nothing(live):
    boundary = "b0undary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nhuge\r\n--{boundary}\r\n'
            f'Content-Disposition: form-data; name="file"; filename="huge.txt"\r\n'
            f"Content-Type: text/plain\r\n\r\n").encode()

    def body():
        yield head
        yield from chunks(CORPUS_LIMIT * 10, 4096)
        yield f"\r\n--{boundary}--\r\n".encode()

    refused = live.post("/v1/corpora", content=body(),
                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert refused.status_code == 413 and "request body passes" in refused.json()["detail"]
    assert "huge" not in corpus_names(live)
    accepted = live.post("/v1/corpora", data={"name": "small", "train": "false"},
                         files={"file": ("small.txt", b"a small corpus")})
    assert accepted.status_code == 202, accepted.text


def test_a_json_corpus_body_may_escape_every_non_ascii_character(live):
    """Python's json.dumps writes "é" as "\\u00e9" (6 bytes for 2): a corpus under the limit as JSON was a 413 at the
    body limit (the corpus' bytes plus 64 KiB)."""
    import json

    text = "é" * (CORPUS_LIMIT // 2 - 10)  # 2 bytes each in UTF-8: under the corpus limit
    body = json.dumps({"name": "accents", "text": text, "train": False}).encode()  # ensure_ascii: 3 times that
    assert len(body) > CORPUS_LIMIT + 64 * 1024 and len(text.encode()) <= CORPUS_LIMIT  # over the old body limit
    accepted = live.post("/v1/corpora", content=body, headers={"Content-Type": "application/json"})
    assert accepted.status_code == 202, accepted.text


# ---- caps on what one request may cost -----------------------------------------------------------------


def ingested_corpus(client, name: str) -> int:
    """A corpus uploaded and ingested in process (the app dispatches nothing): its id."""
    from service.jobs.ingest import run_ingest_job

    accepted = client.post("/v1/corpora", json={"name": name, "text": "text to learn " * 50, "train": False})
    assert accepted.status_code == 202, accepted.text
    run_ingest_job(client.app.state.ctx, accepted.json()["job"]["id"], lambda job: None)
    return accepted.json()["corpus"]["id"]


@pytest.fixture(scope="module")
def capped(home):
    """The tiny pool has 256 experts per PEER layer; it may hold 300."""
    with service(home, max_new_experts=1000, max_train_steps=500, max_pool_experts=300) as client:
        yield client


@pytest.mark.parametrize("options,status,message", [
    ({"new_experts": 1001}, 422, "PEER_MAX_NEW_EXPERTS"),
    ({"steps": 501}, 422, "PEER_MAX_TRAIN_STEPS"),
    ({"review_steps": 501}, 422, "PEER_MAX_TRAIN_STEPS"),
    ({"new_experts": 64}, 409, "PEER_MAX_POOL_EXPERTS"),  # 256 + 64 > 300
])
def test_job_options_over_the_caps_are_refused_at_submission(capped, options, status, message):
    corpus_id = ingested_corpus(capped, "capped")
    refused = capped.post("/v1/jobs", json={"corpus_ids": [corpus_id], "options": options})
    assert refused.status_code == status and message in refused.json()["detail"], refused.text
    upload = capped.post("/v1/corpora", json={"name": "with-options", "text": "some text", "train_options": options})
    assert upload.status_code == status and message in upload.json()["detail"], upload.text
    assert capped.post("/v1/jobs", json={"corpus_ids": [corpus_id], "options": {"new_experts": 40}}).status_code == 202


def test_forget_options_over_the_step_cap_are_refused(capped):
    refused = capped.post("/v1/corpora/1/forget", json={"options": {"repair_steps": 501}})
    assert refused.status_code in (409, 422)  # 409 when version 1 does not know corpus 1; never accepted
    assert capped.get("/v1/jobs", params={"kind": "forget"}).json() == []


def test_the_pool_cap_is_checked_again_when_the_job_runs(capped):
    """A job queued while the pool had room (here: created without the API's check) fails with the reason."""
    from service.jobs.lease import create_job
    from service.jobs.train import run_train_job

    ctx = capped.app.state.ctx
    corpus_id = ingested_corpus(capped, "late")
    with ctx.sessions() as session:
        job = create_job(session, "train", [corpus_id], {"new_experts": 64})
        session.commit()
        job_id = job.id
    run_train_job(ctx, job_id)
    job = capped.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "failed" and "PEER_MAX_POOL_EXPERTS" in job["error"]
    assert job["result_version_id"] is None


# ---- hostile input: 4xx, never 500 ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def plain(request, home, tmp_path_factory):
    """The open service on SQLite and on PostgreSQL (where over-long names and surrogates used to be 500s)."""
    if request.param == "sqlite":
        settings = {}
    else:
        pg_home = tmp_path_factory.mktemp("pg-home")
        settings = {"home": pg_home, "database_url": request.getfixturevalue("pg_url")}
    with TestClient(create_app(tiny_settings(**{"home": home, **settings}, max_prompt_chars=500,
                                             max_corpus_bytes=3000), dispatch=lambda job: None)) as client:
        yield client


SURROGATE = "\\ud800"  # as JSON writes it: a lone surrogate, no character


@pytest.mark.parametrize("path,body", [
    ("/v1/generate", f'{{"prompt": "a{SURROGATE}", "max_tokens": 1}}'),
    ("/v1/generate", f'{{"prompt": "a", "max_tokens": 1, "stop": ["{SURROGATE}"]}}'),
    ("/v1/completions", f'{{"model": "peer", "prompt": "{SURROGATE}", "max_tokens": 1}}'),
    ("/v1/chat/completions", f'{{"model": "peer", "messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}'),
    ("/v1/chat/completions",
     f'{{"model": "peer", "messages": [{{"role": "user", "content": [{{"type": "text", "text": "{SURROGATE}"}}]}}]}}'),
    ("/v1/tokenize", f'{{"text": "{SURROGATE}"}}'),
    ("/v1/corpora", f'{{"name": "s", "text": "a{SURROGATE}", "train": false}}'),
    ("/v1/corpora", f'{{"name": "s", "documents": ["ok", "{SURROGATE}"], "train": false}}'),
    ("/v1/corpora", f'{{"name": "{SURROGATE}", "text": "ok", "train": false}}'),
    ("/v1/streams/s/documents", f'{{"documents": ["{SURROGATE}"]}}'),
    ("/v1/versions/1/activate", f'{{"reason": "{SURROGATE}"}}'),
])
def test_a_lone_surrogate_is_a_422(plain, path, body):
    refused = plain.post(path, content=body.encode(), headers={"Content-Type": "application/json"})
    assert refused.status_code == 422, refused.text
    if path not in ("/v1/corpora", "/v1/versions/1/activate"):  # these parse their JSON with pydantic's parser,
        assert "lone surrogate" in refused.json()["detail"]  # which refuses the escape itself


def test_over_long_names_are_a_422_before_the_database(plain):
    assert plain.post(f"/v1/streams/{'s' * 101}/documents", json={"documents": ["text"]}).status_code == 422
    assert plain.post(f"/v1/streams/{'s' * 101}/flush").status_code == 422
    long_name = plain.post("/v1/corpora", data={"name": "n" * 201, "train": "false"},
                           files={"file": ("a.txt", b"some text")})
    assert long_name.status_code == 422 and "at most 200 characters" in long_name.json()["detail"]
    long_file = plain.post("/v1/corpora", data={"train": "false"}, files={"file": ("f" * 300 + ".txt", b"text")})
    assert long_file.status_code == 422
    assert plain.post("/v1/versions/1/activate", json={"reason": "r" * 201}).status_code == 422


def test_a_stream_with_the_longest_name_flushes_into_a_corpus(plain):
    name = "s" * 100
    added = plain.post(f"/v1/streams/{name}/documents", json={"documents": ["a document"]})
    assert added.status_code == 202, added.text
    flushed = plain.post(f"/v1/streams/{name}/flush")
    assert flushed.status_code == 202, flushed.text
    assert flushed.json()["flushed"]["corpus"]["name"].startswith(name + " #")


def test_stream_documents_past_the_corpus_limit_are_refused_before_they_are_stored(plain):
    first = plain.post("/v1/streams/full/documents", json={"documents": ["x" * 2000]})
    assert first.status_code == 202, first.text
    refused = plain.post("/v1/streams/full/documents", json={"documents": ["y" * 600, "z" * 600]})
    assert refused.status_code == 413 and "PEER_MAX_CORPUS_BYTES" in refused.json()["detail"]
    assert plain.get("/v1/streams/full").json()["pending_bytes"] == 2000
    assert plain.post("/v1/streams/full/flush").status_code == 202  # the stream is not stuck


def test_a_job_names_each_corpus_once_and_a_bounded_number_of_them(plain):
    """[c] * 30000 was accepted and trained on the text 30,000 times; more than 65,535 ids were a 500 on
    PostgreSQL (more parameters than it binds)."""
    from service.jobs.ingest import run_ingest_job

    accepted = plain.post("/v1/corpora", json={"name": "once", "text": "text to learn " * 50, "train": False}).json()
    run_ingest_job(plain.app.state.ctx, accepted["job"]["id"], lambda job: None)
    corpus_id, jobs_before = accepted["corpus"]["id"], len(plain.get("/v1/jobs").json())
    for corpus_ids, message in (([corpus_id] * 2, "more than once"), ([corpus_id] * 30_000, "PEER_MAX_JOB_CORPORA"),
                                (list(range(1, 70_001)), "PEER_MAX_JOB_CORPORA")):
        refused = plain.post("/v1/jobs", json={"corpus_ids": corpus_ids})
        assert refused.status_code == 422 and message in refused.json()["detail"], refused.text
    assert len(plain.get("/v1/jobs").json()) == jobs_before
    assert plain.post("/v1/jobs", json={"corpus_ids": [corpus_id]}).status_code == 202


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_documents_holding_a_unicode_line_separator_are_text_not_line_breaks(plain, separator):
    """JSONL lines were split with str.splitlines, which also breaks at U+2028, U+2029 and U+0085: JSON documents
    holding one were "JSONL line 1 is not JSON", and a stream document holding one made every later flush of its
    stream a 422, with no way to remove it."""
    from service.jobs.ingest import run_ingest_job

    document = f"before{separator}after, a document that spans a Unicode line separator"
    ctx = plain.app.state.ctx
    accepted = plain.post("/v1/corpora", json={"name": "separators", "documents": [document, "another"],
                                               "train": False})
    assert accepted.status_code == 202, accepted.text
    run_ingest_job(ctx, accepted.json()["job"]["id"], lambda job: None)
    assert plain.get(f"/v1/corpora/{accepted.json()['corpus']['id']}").json()["state"] == "ready"
    assert separator in ctx.store.read_corpus(accepted.json()["corpus"]["id"], "train") + \
        ctx.store.read_corpus(accepted.json()["corpus"]["id"], "val")
    jsonl = (json.dumps({"text": document}, ensure_ascii=False) + "\n").encode()
    assert plain.post("/v1/corpora?name=raw-jsonl&train=false", content=jsonl,
                      headers={"Content-Type": "application/jsonl"}).status_code == 202
    stream = f"separators-{ord(separator)}"
    assert plain.post(f"/v1/streams/{stream}/documents", json={"documents": [document]}).status_code == 202
    assert plain.post(f"/v1/streams/{stream}/flush").status_code == 202, "the stream is wedged"
    assert plain.post(f"/v1/streams/{stream}/documents", json={"documents": ["later"]}).status_code == 202
    assert plain.post(f"/v1/streams/{stream}/flush").status_code == 202


def test_a_corpus_of_json_documents_counts_the_users_text_not_its_envelope(plain):
    """The limit used to count the JSONL written from the documents ({"text": ...} and a newline, 11 bytes a
    document, and escapes): 2,900 bytes of two-character documents were 21,750 bytes of JSONL, a 413 under a
    3,000-byte limit. A count bounds the documents instead (PEER_MAX_CORPUS_DOCUMENTS)."""
    ctx = plain.app.state.ctx
    documents = ["ab"] * 1450
    accepted = plain.post("/v1/corpora", json={"name": "near the limit", "documents": documents, "train": False})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["corpus"]["documents"] == 1450
    over = plain.post("/v1/corpora", json={"name": "over", "documents": documents + ["x" * 200]})
    assert over.status_code == 413 and "PEER_MAX_CORPUS_BYTES" in over.json()["detail"]
    limited = ctx.settings.model_copy(update={"max_corpus_documents": 1000})
    with TestClient(create_app(limited, dispatch=lambda job: None)) as client:
        refused = client.post("/v1/corpora", json={"name": "many", "documents": documents, "train": False})
        assert refused.status_code == 422 and "PEER_MAX_CORPUS_DOCUMENTS" in refused.json()["detail"]


@pytest.mark.parametrize("body", [
    b'{"name": "n", "documents": ["a", 1]}', b'{"name": "n", "documents": "a"}', b'{"name": "n", "documents": []}',
    b'{"name": "n", "documents": ["a"], "text": "b"}', b'{"name": "n", "documents": ["a"]} trailing',
    b'["a"]', b'{"name": "n", "documents": ["a"', b'{"name": "n", "documents": ["\\ud800"]}',
    b'{"name": "", "documents": ["a"]}', b'{"documents": ["a"]}', b'{"name": "n", "documents": [" "]}',
])
def test_a_malformed_json_upload_is_a_422_and_stores_nothing(plain, body):
    before = len(plain.get("/v1/corpora").json())
    refused = plain.post("/v1/corpora", content=body, headers={"Content-Type": "application/json"})
    assert refused.status_code == 422, refused.text
    assert len(plain.get("/v1/corpora").json()) == before


def test_stream_documents_past_the_corpus_document_count_are_refused_before_they_are_stored(plain):
    """A flush turns every pending document into one corpus: past PEER_MAX_CORPUS_DOCUMENTS it would be refused,
    and the stream stuck."""
    limited = plain.app.state.ctx.settings.model_copy(update={"max_corpus_documents": 3})
    with TestClient(create_app(limited, dispatch=lambda job: None)) as client:
        assert client.post("/v1/streams/counted/documents", json={"documents": ["a", "b"]}).status_code == 202
        refused = client.post("/v1/streams/counted/documents", json={"documents": ["c", "d"]})
        assert refused.status_code == 422 and "PEER_MAX_CORPUS_DOCUMENTS" in refused.json()["detail"]
        assert client.get("/v1/streams/counted").json()["pending_documents"] == 2
        flushed = client.post("/v1/streams/counted/flush")
        assert flushed.status_code == 202 and flushed.json()["flushed"]["corpus"]["documents"] == 2


@pytest.mark.parametrize("method,path,body,files", [
    ("post", "/v1/corpora?name=a%00b&train=false", b"some text", None),
    ("post", "/v1/corpora", {"name": "a\x00b", "text": "some text", "train": False}, None),
    ("post", "/v1/corpora", {"name": "a\x00b", "train": "false"}, {"file": ("f.txt", b"some text")}),
    ("post", "/v1/corpora", b'--b\r\nContent-Disposition: form-data; name="file"; filename="a\x00b.txt"\r\n\r\n'
                            b"some text\r\n--b--\r\n", "multipart/form-data; boundary=b"),
    ("post", "/v1/streams/a%00b/documents", {"documents": ["text"]}, None),
    ("post", "/v1/streams/a%00b/flush", None, None),
    ("get", "/v1/streams/a%00b", None, None),
    ("post", "/v1/streams/nul/documents", {"documents": ["before\x00after"]}, None),
    ("post", "/v1/versions/1/activate", {"reason": "a\x00b"}, None),
])
def test_nul_characters_the_database_would_store_are_a_422(plain, method, path, body, files):
    """PostgreSQL refuses U+0000 in text: a corpus or stream name, a stream document or an activation reason
    holding one was a DataError (500) there."""
    if isinstance(files, dict):
        answer = plain.post(path, data=body, files=files)
    elif isinstance(body, bytes):  # files: the content type of a raw body (httpx escapes NUL in file names)
        answer = plain.post(path, content=body, headers={"Content-Type": files or "text/plain"})
    else:
        answer = getattr(plain, method)(path, **({"json": body} if body is not None else {}))
    assert answer.status_code == 422, answer.text
    assert "NUL" in answer.json()["detail"]
    assert not any("\x00" in c["name"] for c in plain.get("/v1/corpora").json())


@pytest.mark.parametrize("method,path,body", [
    ("get", "/v1/jobs/3000000000", None), ("get", "/v1/versions/2147483648", None),
    ("post", "/v1/jobs/2147483648/cancel", None), ("get", "/v1/corpora/0", None),
    ("get", "/v1/experts/utilization?version=2147483648", None),
    ("get", "/ui/evaluation?version=99999999999999999999", None), ("get", "/ui/experts?version=3000000000", None),
    ("get", "/ui/evaluation?version=0", None),
    ("post", "/v1/jobs", {"corpus_ids": [1], "base_version_id": 0}),
    ("post", "/v1/jobs", {"corpus_ids": [3000000000]}),
    ("post", "/v1/corpora/1/forget", {"base_version_id": 0}),
])
def test_ids_outside_the_id_columns_are_a_422(plain, method, path, body):
    """Ids are 32-bit columns on PostgreSQL: ids in [2^31, 2^63) passed validation and failed there (500, on
    routes that need no key); the console's version parameter had no bound at all; 0 is no id, but a
    base_version_id of 0 counted as unset when validating and was stored."""
    answer = getattr(plain, method)(path, **({"json": body} if body is not None else {}))
    assert answer.status_code == 422, answer.text


HUGE_INTEGER, DEEP = "9" * 5000, "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("content_type,body", [
    ("application/jsonl", f'{{"text": "a", "n": {HUGE_INTEGER}}}\n'),
    ("application/jsonl", f'{{"text": "a", "n": {DEEP}}}\n'),
    ("application/json", f'{{"name": "n", "text": "a", "train_options": {{"seed": {HUGE_INTEGER}}}}}'),
    ("application/json", f'{{"name": "n", "text": "a", "train_options": {{"x": {DEEP}}}}}'),
    ("application/json", f'{{"name": "n", "documents": ["a"], "extra": {DEEP}}}'),
])
def test_jsonl_and_json_that_python_cannot_parse_are_a_422(plain, content_type, body):
    """A 5,000-digit integer (ValueError: past Python's 4,300-digit conversion limit) or 100,000 levels of nesting
    (RecursionError) in a JSONL line were a 500."""
    roomy = plain.app.state.ctx.settings.model_copy(update={"max_corpus_bytes": 1_000_000})
    with TestClient(create_app(roomy, dispatch=lambda job: None)) as client:
        answer = client.post("/v1/corpora?name=parsed&train=false", content=body.encode(),
                             headers={"Content-Type": content_type})
    assert answer.status_code == 422, answer.text


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_first_appends_to_a_new_stream_at_once_all_land(dialect, tmp_path):
    """The stream is created on first use: two first appends at once both inserted it, and the second failed on
    the unique name (500: 42 of 60 racing requests)."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    from .conftest import PG_HOST, create_pg_database, drop_pg_database

    name = create_pg_database() if dialect == "postgresql" else None
    settings = tiny_settings(tmp_path / "home", f"postgresql+psycopg://{PG_HOST}/{name}" if name else None)
    upgrade(settings.resolved_database_url)
    try:
        with ServerThread(create_app(settings, dispatch=lambda job: None)) as server:
            def append(index: int) -> int:
                return httpx.post(f"{server.url}/v1/streams/race-{index % 6}/documents", timeout=60,
                                  json={"documents": [f"document {index}"]}).status_code

            with ThreadPoolExecutor(30) as pool:
                statuses = list(pool.map(append, range(60)))
            assert statuses == [202] * 60, statuses
            streams = httpx.get(f"{server.url}/v1/streams").json()
            assert sorted(s["name"] for s in streams) == [f"race-{i}" for i in range(6)]
            assert all(s["pending_documents"] == 10 for s in streams)
    finally:
        if name:
            drop_pg_database(name)


def test_prompts_over_the_character_limit_are_refused_before_tokenizing(plain):
    text = "a" * 501
    for path, body in (("/v1/tokenize", {"text": text}), ("/v1/generate", {"prompt": text, "max_tokens": 1}),
                       ("/v1/completions", {"model": "peer", "prompt": text, "max_tokens": 1}),
                       ("/v1/chat/completions", {"model": "peer", "messages": [{"role": "user", "content": text}]})):
        refused = plain.post(path, json=body)
        assert refused.status_code == 422 and "PEER_MAX_PROMPT_CHARS" in refused.json()["detail"], path


# ---- rate limits ---------------------------------------------------------------------------------------


def retry_after(response) -> int:
    assert response.status_code == 429, response.text
    return int(response.headers["Retry-After"])


def test_generation_requests_are_limited_per_key_with_retry_after(home):
    with service(home, api_keys=KEYS, rate_limit_generations_per_minute=2) as client:
        for _ in range(2):
            assert client.post("/v1/tokenize", json={"text": "a"}, headers=bearer("g-secret")).status_code == 200
        assert 1 <= retry_after(client.post("/v1/tokenize", json={"text": "a"}, headers=bearer("g-secret"))) <= 30
        # another key, and callers without one (by address), have budgets of their own
        assert client.post("/v1/tokenize", json={"text": "a"}, headers=bearer("legacy-secret")).status_code == 200
        assert client.post("/v1/tokenize", json={"text": "a"}).status_code == 200
        assert client.get("/v1/versions").status_code == 200  # reading is not limited


def test_failed_key_checks_are_limited_per_address_before_any_key_is_compared(home):
    """Guessing keys: after the budget of failed checks, every route needing a key answers 429 to that address,
    the right key included (so a guess that would have passed cannot be told from one that would not);
    routes needing no key are not affected. The budget is per API process, like every rate limit."""
    with service(home, api_keys=KEYS, rate_limit_auth_failures_per_minute=3,
                 rate_limit_auth_failure_buckets=1) as client:
        assert client.post("/v1/versions/1/activate", headers=bearer("o-secret")).status_code == 200  # no charge
        for guess in ("a", "b", "c"):
            assert client.post("/v1/versions/1/activate", headers=bearer(guess)).status_code == 401
        assert client.post("/v1/versions/1/activate").status_code == 401  # no key at all: a failure of its own
        spent = client.post("/v1/versions/1/activate", headers=bearer("o-secret"))
        assert 1 <= retry_after(spent) <= 20 and "PEER_RATE_LIMIT_AUTH_FAILURES_PER_MINUTE" in spent.json()["detail"]
        assert retry_after(client.post("/ui/login", data={"key": "r-secret"}))
        assert client.get("/v1/versions").status_code == 200  # reading needs no key here: nothing compared
        assert client.post("/v1/tokenize", json={"text": "a"}, headers=bearer("wrong")).status_code == 200


def test_unknown_keys_on_open_routes_are_charged_and_a_spent_bucket_tells_nothing(home):
    """Where no key is needed an unknown key is served as no key, but it is a failed check like anywhere else:
    guesses there spend the address's budget, and once it is spent a right key is served as a wrong one (both
    are the address's caller, whose generation budget is spent here: 429 for both), so guessing on open routes
    runs at the same pace as on the others and no answer tells a right guess."""
    with service(home, api_keys=KEYS, rate_limit_auth_failures_per_minute=3, rate_limit_auth_failure_buckets=1,
                 rate_limit_generations_per_minute=1) as client:
        tokenize = lambda secret: client.post("/v1/tokenize", json={"text": "a"}, headers=bearer(secret)).status_code
        assert tokenize("unused") == 200  # the OpenAI client's placeholder: served, as no key (a charged miss)
        for guess in ("guess-1", "guess-2"):
            assert tokenize(guess) == 429  # the address's generation budget is spent
        assert tokenize("g-secret") == 429  # not compared: the failed checks are spent, the right key is a guess
        assert retry_after(client.post("/v1/versions/1/activate", headers=bearer("o-secret")))


def test_wrong_keys_from_an_address_leave_its_valid_keys_usable(home):
    """A NAT or proxy in front of many clients: 31 wrong keys used to lock a valid admin key at the same address out
    for a minute. Failures are charged to the bucket the token hashes to: repeating one wrong key spends its own
    bucket only, and spreading guesses over the buckets does not find a key faster than the budget per bucket."""
    from service.api.security import failure_bucket

    with service(home, api_keys=KEYS, rate_limit_auth_failures_per_minute=30) as client:
        for guess in range(31):
            assert client.post("/v1/versions/1/activate", headers=bearer(f"guess-{guess}")).status_code == 401
        assert client.post("/v1/versions/1/activate", headers=bearer("o-secret")).status_code == 200

        settings, request = client.app.state.ctx.settings, type("Request", (), {"client": None})()
        wrong = next(f"wrong-{i}" for i in range(100)
                     if failure_bucket(request, settings, f"wrong-{i}") != failure_bucket(request, settings, "o-secret"))
        for _ in range(30):
            assert client.post("/v1/versions/1/activate", headers=bearer(wrong)).status_code == 401
        assert retry_after(client.post("/v1/versions/1/activate", headers=bearer(wrong)))
        assert client.post("/v1/versions/1/activate", headers=bearer("o-secret")).status_code == 200


def test_ipv6_clients_are_counted_by_their_64(home):
    """An IPv6 client gets a /64 (2^64 addresses): per address, rotating within it escaped every budget."""
    import httpx

    from service.cli import http_options

    settings = tiny_settings(home, rate_limit_generations_per_minute=1)
    with ServerThread(create_app(settings, dispatch=lambda job: None), **http_options(settings)) as server:
        def tokenize(client: str) -> int:
            return httpx.post(f"{server.url}/v1/tokenize", json={"text": "a"},
                              headers={"X-Forwarded-For": client}).status_code

        assert tokenize("2001:db8:1:2::1") == 200
        assert tokenize("2001:db8:1:2:ffff:ffff:ffff:ffff") == 429  # the same /64
        assert tokenize("2001:db8:1:3::1") == 200  # the next /64
        assert tokenize("::ffff:203.0.113.9") == 200 and tokenize("203.0.113.9") == 429  # IPv4-mapped: the IPv4 one


def test_replicas_charge_one_shared_budget_in_redis(home, redis_url):
    """With Redis (the distributed form's broker) two API processes draw on the same buckets: a caller gets
    the budget once, not once per replica."""
    settings = dict(api_keys=KEYS, rate_limit_generations_per_minute=3, broker_url=redis_url)
    with service(home, **settings) as first, service(home, **settings) as second:
        assert first.app.state.rate_limits.shared
        for client in (first, second, first):
            assert client.post("/v1/tokenize", json={"text": "a"}, headers=bearer("g-secret")).status_code == 200
        assert retry_after(second.post("/v1/tokenize", json={"text": "a"}, headers=bearer("g-secret"))) >= 1
        assert second.post("/v1/tokenize", json={"text": "a"}, headers=bearer("legacy-secret")).status_code == 200


def test_an_unreachable_redis_lets_requests_through_uncounted(home, caplog):
    """Rate limiting must not take the API down with Redis: requests pass, with one warning, and the next
    calls skip Redis for a while instead of each waiting for its timeout."""
    from .conftest import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    with service(home, api_keys=KEYS, rate_limit_generations_per_minute=1, rate_limit_redis_url=dead) as client:
        for _ in range(3):
            assert client.post("/v1/tokenize", json={"text": "a"}, headers=bearer("g-secret")).status_code == 200
    warnings = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
    assert len(warnings) == 1


def test_mutating_requests_are_limited(home):
    with service(home, rate_limit_writes_per_minute=1) as client:
        assert client.post("/v1/versions/1/activate").status_code == 200
        refused = client.post("/v1/versions/1/activate")
        assert retry_after(refused) >= 1 and "PEER_RATE_LIMIT_WRITES_PER_MINUTE" in refused.json()["detail"]


def test_generated_tokens_are_limited_per_minute(home):
    with service(home, rate_limit_tokens_per_minute=10) as client:
        assert client.post("/v1/generate", json={"prompt": "a", "max_tokens": 8}).status_code == 200
        assert retry_after(client.post("/v1/generate", json={"prompt": "a", "max_tokens": 8})) >= 1
        too_many = client.post("/v1/completions", json={"model": "peer", "prompt": "a", "max_tokens": 11})
        assert too_many.status_code == 422 and "PEER_RATE_LIMIT_TOKENS_PER_MINUTE" in too_many.json()["detail"]


@pytest.mark.parametrize("buckets", ["in-process", "redis"])
def test_a_refused_generation_gives_its_tokens_back(home, buckets, request):
    """A generation refused at admission (here a prompt longer than the context window, a 422) was still charged
    its max_tokens: refused requests spent the caller's budget for nothing."""
    redis = {"rate_limit_redis_url": request.getfixturevalue("redis_url")} if buckets == "redis" else {}
    with service(home, rate_limit_tokens_per_minute=10, **redis) as client:
        too_long = "word " * 200  # the tiny model's context is 64 tokens
        for path, body in (("/v1/generate", {"prompt": too_long, "max_tokens": 8}),
                           ("/v1/completions", {"model": "peer", "prompt": too_long, "max_tokens": 8}),
                           ("/v1/chat/completions", {"model": "peer", "max_tokens": 8,
                                                     "messages": [{"role": "user", "content": too_long}]})):
            refused = client.post(path, json=body)
            assert refused.status_code == 422 and "context" in refused.json()["detail"], refused.text
        assert client.post("/v1/generate", json={"prompt": "a", "max_tokens": 8}).status_code == 200
        assert retry_after(client.post("/v1/generate", json={"prompt": "a", "max_tokens": 8})) >= 1


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget(home):
    """The compose front names the client in X-Forwarded-For; the api trusts it from PEER_FORWARDED_ALLOW_IPS
    only (here loopback, where the test connects from), so one client behind the front cannot spend another's
    budget, and a client that is not a trusted proxy cannot choose its own address."""
    import httpx

    from service.cli import http_options

    def tokenize(url: str, client: str) -> int:
        return httpx.post(f"{url}/v1/tokenize", json={"text": "a"}, headers={"X-Forwarded-For": client}).status_code

    for trusted, second_client in (("127.0.0.1,::1", 200), ("10.9.9.9", 429)):
        settings = tiny_settings(home, rate_limit_generations_per_minute=1, forwarded_allow_ips=trusted)
        with ServerThread(create_app(settings, dispatch=lambda job: None), **http_options(settings)) as server:
            assert tokenize(server.url, "203.0.113.1") == 200
            assert tokenize(server.url, "203.0.113.1") == 429
            assert tokenize(server.url, "203.0.113.2") == second_client, trusted
