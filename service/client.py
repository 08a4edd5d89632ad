"""``peer-service client`` (also ``peerctl``): the service from a terminal, over HTTP.

    peer-service client generate "ROMEO:" --max-tokens 200     # streams the text, the version on stderr
    peer-service client upload jargon.txt --wait                # ingest + training with progress bars
    peer-service client jobs watch 6                            # progress, tokens/s, ETA until it ends
    peer-service client probe upload probe.jsonl                # questions a job scores: upload ... --probe ID
    peer-service client jobs [--state S] | jobs cancel ID | versions | activate ID | usage [--layer L]

Data (generated text, tables, ids) goes to stdout, progress and status to stderr; ``--json`` prints the
API's JSON instead of tables. Exit status: 0 on success, 2 when the API refused the request (4xx: its
``detail`` message on stderr), 1 when the service cannot be reached, answered 5xx, or a followed job failed
or was cancelled; 130 on Ctrl-C (a watched job keeps running).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL_STATES = ("succeeded", "failed", "cancelled")


class ClientError(Exception):
    """A request that did not succeed: printed as ``peer: <message>``, the process exits with ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.message, self.code = message, code


def _detail(response: httpx.Response) -> str:
    """The API's ``detail`` (a string, or FastAPI's list of validation problems), else the body's start."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" if isinstance(d, dict)
                         else str(d) for d in detail)
    return json.dumps(body)[:500]


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code >= 400:
        code = 2 if response.status_code < 500 else 1
        raise ClientError(f"{response.status_code} {response.reason_phrase}: {_detail(response)}", code)


class API:
    """A thin httpx wrapper: the base URL, the bearer key, errors as ClientError."""

    def __init__(self, url: str, key: str | None, timeout: float):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _unreachable(self, exc: httpx.TransportError) -> ClientError:
        if isinstance(exc, httpx.TimeoutException):
            return ClientError(f"the service at {self.url} did not answer in time ({type(exc).__name__}); "
                               f"a larger --timeout may help")
        return ClientError(f"cannot reach the service at {self.url} ({exc or type(exc).__name__}); "
                           f"is it running? (--url or PEER_URL)")

    def request(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        _raise_for_status(response)
        return response.json()

    def get(self, path: str, **params) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, **kwargs) -> Any:
        return self.request("POST", path, **kwargs)

    def events(self, path: str, body: dict):
        """POST ``body`` and yield the server-sent events as (event, data) pairs."""
        try:
            with self.http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_status(response)
                event, data = "message", []
                for line in response.iter_lines():
                    if not line:
                        if data:
                            yield event, json.loads("\n".join(data))
                        event, data = "message", []
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip(" "))
                if data:
                    yield event, json.loads("\n".join(data))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None


# ---------------------------------------------------------------------------------------------- output helpers


def out(text: str | None = "") -> None:
    """A line on stdout (``None``: only flush)."""
    if text is not None:
        print(text, file=sys.stdout)
    sys.stdout.flush()


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def print_json(value: Any) -> None:
    out(json.dumps(value, indent=2, ensure_ascii=False))


def table(headers: list[str], rows: list[list[Any]], indent: str = "") -> None:
    """Columns aligned, ``-`` for None."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for row in [headers] + cells:
        out(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def ids(values: list[int] | None) -> str:
    return ",".join(map(str, values)) if values else "-"


class _JobBar(tqdm):
    """tqdm with an ``{info}`` field (the server's tokens/s, ETA and state) in its bar format."""

    def __init__(self, *args, info: str = "", **kwargs):
        self.info = info  # before tqdm's first display
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self):
        return {**super().format_dict, "info": self.info}


def job_info(job: dict) -> str:
    parts = []
    if job.get("tokens_per_s"):
        parts.append(f"{job['tokens_per_s']:,.0f} tok/s")
    if job["state"] in ("running", "cancelling") and job.get("eta_s") is not None:
        parts.append(f"ETA {duration(job['eta_s'])}")
    parts.append(job["state"])
    return ", ".join(parts)


def _percent(job: dict) -> float:
    return 100.0 if job["state"] == "succeeded" else round(100.0 * (job.get("progress") or 0.0), 1)


def follow_job(api: API, job_id: int, poll: float, bar: bool = True) -> dict:
    """Poll GET /v1/jobs/{id} until the job ends; a progress bar on stderr meanwhile. Returns the job."""
    job = api.get(f"/v1/jobs/{job_id}")
    progress = None
    if bar:
        progress = _JobBar(total=100, initial=_percent(job), info=job_info(job), file=sys.stderr, mininterval=0,
                           leave=True, desc=f"job {job_id} {job['kind']}",
                           bar_format="{desc}: {percentage:3.0f}%|{bar:24}| {info}")
    try:
        while job["state"] not in FINAL_STATES:
            time.sleep(poll)
            job = api.get(f"/v1/jobs/{job_id}")
            if progress is not None:
                progress.n = _percent(job)
                progress.info = job_info(job)
                progress.refresh()
        return job
    finally:
        if progress is not None:
            progress.close()


def job_outcome(api: API, job: dict) -> int:
    """One line on stdout about a finished job (its version, or its error); 0 when it succeeded."""
    if job["state"] != "succeeded":
        reason = f": {job['error']}" if job.get("error") else ""
        note(f"peer: job {job['id']} ({job['kind']}) {job['state']}{reason}")
        return 1
    line = f"job {job['id']} ({job['kind']}) succeeded"
    if job.get("result_version_id"):
        version = api.get(f"/v1/versions/{job['result_version_id']}")
        line += f": version {version['id']}, " + ("active" if version["active"] else "not activated")
        if version.get("gate_reason"):
            line += f" (gate: {version['gate_reason']})"
    elif job.get("next_job_id"):
        line += f"; job {job['next_job_id']} follows"
    out(line)
    return 0


# ---------------------------------------------------------------------------------------------- commands


def cmd_generate(api: API, args) -> int:
    body: dict[str, Any] = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
                            "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed, "stop": args.stop}
    body = {k: v for k, v in body.items() if v is not None}
    if args.no_stream or args.json:
        answer = api.post("/v1/generate", json=body)
        if args.json:
            print_json(answer)
            return 0
        out(answer["text"])
        note(f"[version {answer['version']} · {answer['completion_tokens']} tokens · {answer['finish_reason']} · "
             f"{answer['latency_ms']:.0f} ms]")
        return 0
    text = ""
    for event, data in api.events("/v1/generate", {**body, "stream": True}):
        if event == "token":
            text += data["text"]
            sys.stdout.write(data["text"])
            sys.stdout.flush()
        elif event == "done":
            out(None if text.endswith("\n") else "")
            note(f"[version {data['version']} · {data['completion_tokens']} tokens · {data['finish_reason']} · "
                 f"{data['latency_ms']:.0f} ms]")
            return 0
        elif event == "error":
            sys.stdout.write("\n")
            raise ClientError(f"{data.get('message', 'generation failed')} (version {data.get('version')})")
    raise ClientError("the stream ended without a done event")


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except (ValueError, RecursionError):  # not JSON (or nested past Python's limit): the plain string
        return key, value


def _documents(data: bytes, path: str) -> list[str]:
    documents = []
    for number, line in enumerate(data.decode("utf-8").split("\n"), 1):  # not splitlines: U+2028 is no line end
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise ClientError(f"{path}:{number}: not JSON ({exc})", 2) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ClientError(f'{path}:{number}: expected an object with a "text" string', 2)
        documents.append(record["text"])
    return documents


def _read_upload(path: str, name: str | None) -> tuple[bytes, str]:
    """The bytes of an upload's FILE (``-``: standard input) and its name: ``name``, else the file's stem."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror or exc}", 2) from None
    return data, name or ("stdin" if path == "-" else Path(path).stem)


def cmd_upload(api: API, args) -> int:
    path = args.file
    data, name = _read_upload(path, args.name)
    fmt = args.format or ("jsonl" if path.lower().endswith((".jsonl", ".ndjson")) else "text")
    train = not args.no_train
    if args.probe is not None:
        args.option = [*(args.option or []), ("probe", args.probe)]
    if args.option:  # training options travel in the JSON form of the upload
        try:
            content = {"text": data.decode("utf-8")} if fmt == "text" else {"documents": _documents(data, path)}
        except UnicodeDecodeError as exc:
            raise ClientError(f"{path} is not UTF-8 text ({exc})", 2) from None
        accepted = api.post("/v1/corpora", json={"name": name, **content, "train": train,
                                                 "train_options": dict(args.option)})
    else:
        content_type = "application/jsonl" if fmt == "jsonl" else "text/plain; charset=utf-8"
        accepted = api.post("/v1/corpora", params={"name": name, "train": str(train).lower()}, content=data,
                            headers={"Content-Type": content_type})
    corpus, job = accepted["corpus"], accepted["job"]
    if not args.wait:
        if args.json:
            print_json(accepted)
        else:
            out(f"corpus {corpus['id']} ({corpus['name']}, {corpus['raw_bytes']:,} bytes): {corpus['state']}; "
                f"{job['kind']} job {job['id']}: {job['state']}")
        return 0
    if not args.json:
        note(f"corpus {corpus['id']} ({corpus['name']}, {corpus['raw_bytes']:,} bytes); {job['kind']} job {job['id']}")
    jobs, job_id = [], job["id"]
    while job_id is not None:
        finished = follow_job(api, job_id, args.poll, bar=not args.json)
        jobs.append(finished)
        job_id = finished.get("next_job_id") if finished["state"] == "succeeded" else None
    if args.json:
        print_json({"corpus": api.get(f"/v1/corpora/{corpus['id']}"), "jobs": jobs})
        return 0 if all(j["state"] == "succeeded" for j in jobs) else 1
    code = 0
    for finished in jobs:
        code = job_outcome(api, finished) or code
    return code


def cmd_probe(api: API, args) -> int:
    """``probe upload FILE``: a JSONL probe, validated by the service; its id is what ``--probe`` takes.
    ``probe delete ID``: the probe and its file (the versions scored on it keep their scores)."""
    if args.action == "delete":
        probe = api.request("DELETE", f"/v1/probes/{args.probe_id}")
        if args.json:
            print_json(probe)
        else:
            out(f"probe {probe['id']} ({probe['name']}) deleted")
        return 0
    data, name = _read_upload(args.file, args.name)
    probe = api.post("/v1/probes", params={"name": name}, content=data, headers={"Content-Type": "application/jsonl"})
    if args.json:
        print_json(probe)
    else:
        kinds = ", ".join(f"{kind} {count}" for kind, count in probe["kinds"].items())
        out(f"probe {probe['id']} ({probe['name']}): {probe['items']} items ({kinds}); "
            f"train with it: peerctl upload FILE --probe {probe['id']}")
    return 0


def cmd_jobs(api: API, args) -> int:
    action = getattr(args, "action", None)
    if action == "watch":
        job = follow_job(api, args.job_id, args.poll, bar=not args.json)
        if args.json:
            print_json(job)
            return 0 if job["state"] == "succeeded" else 1
        return job_outcome(api, job)
    if action == "cancel":
        job = api.post(f"/v1/jobs/{args.job_id}/cancel")
        if args.json:
            print_json(job)
        else:
            out(f"job {job['id']} ({job['kind']}): {job['state']}")
        return 0
    if action == "show":
        job = api.get(f"/v1/jobs/{args.job_id}")
        if args.json:
            print_json(job)
            return 0
        for key in ("id", "kind", "state", "corpus_ids", "base_version_id", "result_version_id", "next_job_id",
                    "progress", "tokens_per_s", "eta_s", "attempts", "created_at", "started_at", "finished_at",
                    "options", "metrics", "error"):
            value = job.get(key)
            out(f"{key + ':':<19}{json.dumps(value) if isinstance(value, (dict, list)) else value}")
        return 0
    jobs = api.get("/v1/jobs", state=args.state, kind=args.kind, limit=args.limit)
    if args.json:
        print_json(jobs)
        return 0
    table(["ID", "KIND", "STATE", "PROGRESS", "CORPORA", "BASE", "RESULT", "TOK/S", "CREATED", "ERROR"], [
        [j["id"], j["kind"], j["state"], f"{100 * (j['progress'] or 0):.0f}%", ids(j["corpus_ids"]),
         j["base_version_id"], j["result_version_id"],
         f"{j['tokens_per_s']:,.0f}" if j.get("tokens_per_s") else None, j["created_at"][:19].replace("T", " "),
         (j["error"] or "")[:60] or None] for j in jobs])
    return 0


def cmd_versions(api: API, args) -> int:
    versions = api.get("/v1/versions", limit=args.limit)
    if args.json:
        print_json(versions)
        return 0

    def gate(v: dict) -> str:
        decision = {True: "passed", False: "failed", None: ""}[v["gate_passed"]]
        reason = v.get("gate_reason") or ""
        return (f"{decision}: {reason}" if decision and reason else decision or reason or "-")[:80]

    def mean_bpb(v: dict) -> str | None:
        values = list((v.get("evaluation") or {}).values())
        return f"{sum(values) / len(values):.3f}" if values else None

    def probe(v: dict) -> str | None:
        scores = v.get("probe_scores")
        if not scores:
            return None
        return f"{100 * scores['child']['all']['accuracy']:.0f}% (parent {100 * scores['parent']['all']['accuracy']:.0f}%)"

    table(["ID", "PARENT", "ACTIVE", "CORPORA", "STRATEGY", "MEAN BPB", "PROBE", "GATE"], [
        [v["id"], v["parent_id"], "*" if v["active"] else "", ids(v["corpus_ids"]), v["strategy"], mean_bpb(v),
         probe(v), gate(v)] for v in versions])
    return 0


def cmd_activate(api: API, args) -> int:
    body = {"reason": args.reason} if args.reason else None
    version = api.post(f"/v1/versions/{args.version_id}/activate", json=body)
    if args.json:
        print_json(version)
    else:
        out(f"version {version['id']} is active")
    return 0


def cmd_usage(api: API, args) -> int:
    usage = api.get("/v1/experts/utilization", layer=args.layer, version=args.version, top=args.top)
    if args.json:
        print_json(usage)
        return 0
    for layer, stats in usage["layers"].items():
        out(f"version {usage['version']}, layer {layer}: {stats['tokens']:,} tokens observed "
            f"({stats['total_selections']:,} selections)")
        out(f"  experts used      {stats['experts_used']:,} / {stats['num_experts']:,} "
            f"({100 * stats['usage_fraction']:.1f}%)")
        kl = stats.get("kl_from_uniform")
        out("  KL from uniform   " + ("-" if kl is None else
                                       f"{kl:.3f} nats (normalized entropy {stats['normalized_entropy']:.3f})"))
        hottest = ", ".join(f"{expert} ({count:,})" for expert, count in stats.get("hottest", []))
        out(f"  hottest experts   {hottest or '-'}")
        rows = [[i, f"{s['start']}-{s['end'] - 1}", s.get("tag"), ids(s.get("corpus_ids")), f"{s['selections']:,}",
                 f"{100 * s['selection_share']:.1f}%", f"{100 * s['usage_fraction']:.1f}%"]
                for i, s in enumerate(stats["segments"])]
        out("  segments:")
        table(["#", "EXPERTS", "TAG", "CORPORA", "SELECTIONS", "SHARE", "USED"], rows, indent="    ")
        out()
    return 0


# ---------------------------------------------------------------------------------------------- parser


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--url/--key/--json/--timeout; on the subcommands with SUPPRESS defaults, so they go anywhere."""
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument("--url", default=default(os.environ.get("PEER_URL") or DEFAULT_URL),
                        help="the service (default $PEER_URL or %s)" % DEFAULT_URL)
    parser.add_argument("--key", default=default(os.environ.get("PEER_API_KEY") or None),
                        help="API key sent as 'Authorization: Bearer' (default $PEER_API_KEY)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the API's JSON instead of tables")
    parser.add_argument("--timeout", type=float, default=default(30.0), help="seconds per request (default 30)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The client's options and subcommands on ``parser`` (``peer-service client`` or ``peerctl``)."""
    _global_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, suppress=True)
    sub = parser.add_subparsers(dest="client_command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", parents=[common], help="complete a prompt (streamed)")
    p.add_argument("prompt")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--no-stream", action="store_true", help="one JSON request instead of server-sent events")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("upload", parents=[common], help="upload a text or JSONL corpus (trained unless --no-train)")
    p.add_argument("file", help='a UTF-8 text file, a .jsonl file of {"text": ...} lines, or - for stdin')
    p.add_argument("--name", help="corpus name (default: the file name without extension)")
    p.add_argument("--format", choices=["text", "jsonl"], help="default: jsonl for .jsonl/.ndjson, else text")
    p.add_argument("--no-train", action="store_true", help="ingest only, start no training job")
    p.add_argument("--option", "-o", action="append", type=_option, metavar="KEY=VALUE",
                   help="training option (steps=50, activate=always, old_lr_scale=0.1, ...; repeatable)")
    p.add_argument("--probe", type=int, metavar="ID", help="score the new version and its parent on this probe "
                   "(peerctl probe upload); the same as -o probe=ID")
    p.add_argument("--wait", action="store_true", help="follow the ingest and training jobs until they end")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between job polls (default 1)")
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("jobs", parents=[common], help="list jobs; jobs watch|cancel|show ID")
    p.add_argument("--state", help="queued, running, cancelling, succeeded, failed or cancelled")
    p.add_argument("--kind", help="ingest, train or forget")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_jobs)
    actions = p.add_subparsers(dest="action", metavar="[ACTION]")
    q = actions.add_parser("watch", parents=[common], help="a progress bar until the job ends")
    q.add_argument("job_id", type=int)
    q.add_argument("--poll", type=float, default=1.0, help="seconds between polls (default 1)")
    actions.add_parser("cancel", parents=[common], help="cancel a job").add_argument("job_id", type=int)
    actions.add_parser("show", parents=[common], help="one job in detail").add_argument("job_id", type=int)

    p = sub.add_parser("probe", parents=[common], help="probe upload FILE | delete ID: questions a training job scores")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = actions.add_parser("upload", parents=[common], help='upload a JSONL probe ({"prompt", "answer", "kind"} lines)')
    q.add_argument("file", help="a JSONL file, or - for stdin")
    q.add_argument("--name", help="probe name (default: the file name without extension)")
    actions.add_parser("delete", parents=[common], help="delete a probe").add_argument("probe_id", type=int)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("versions", parents=[common], help="versions, the active one marked *")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("activate", parents=[common], help="make a version the active one (also a rollback)")
    p.add_argument("version_id", type=int)
    p.add_argument("--reason")
    p.set_defaults(func=cmd_activate)

    p = sub.add_parser("usage", parents=[common], help="expert usage observed while serving")
    p.add_argument("--layer", type=int)
    p.add_argument("--version", type=int)
    p.add_argument("--top", type=int, default=10, help="hottest experts to show (default 10)")
    p.set_defaults(func=cmd_usage)


def run(args: argparse.Namespace) -> int:
    """Run parsed client arguments; the exit status. API errors and unreachable services are one line on
    stderr, never a traceback."""
    api = API(args.url, args.key, args.timeout)
    try:
        return args.func(api, args)
    except ClientError as exc:
        sys.stdout.flush()
        note(f"peer: {exc.message}")
        return exc.code
    except KeyboardInterrupt:
        note("\npeer: interrupted (a job being watched keeps running)")
        return 130
    except BrokenPipeError:  # `... | head`
        return 0
    finally:
        api.close()


def main(argv: list[str] | None = None) -> int:
    """``peerctl``: the client alone."""
    parser = argparse.ArgumentParser(prog="peerctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
