"""``peer-service``: api, worker, migrate, serve (the embedded default: everything on this machine), gc (retention
and garbage collection, once), revoke-sessions (console sign-ins) and client (a running service from a terminal:
``peer-service client --help``)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys

from .logs import setup_logging
from .settings import Settings


def cmd_migrate(args, settings: Settings) -> None:
    from .db.migrate import upgrade

    upgrade(settings.resolved_database_url)
    print(f"database at head: {settings.resolved_database_url}")


def cmd_gc(args, settings: Settings) -> None:
    """The retention policy and garbage collection, once (the workers' housekeeping also runs them)."""
    from .context import ServiceContext
    from .store.retention import apply_retention, collect_garbage

    ctx = ServiceContext.from_settings(settings)
    try:
        verb = "would delete" if args.dry_run else "deleted"
        versions = apply_retention(ctx, dry_run=args.dry_run)
        print(f"retention (PEER_KEEP_VERSIONS={settings.keep_versions}): {verb} versions {versions or 'none'}")
        garbage = collect_garbage(ctx, dry_run=args.dry_run)
        chunks = [path for path in garbage.paths if path.startswith("chunks/")]
        for path in garbage.paths:
            if not path.startswith("chunks/"):
                print(f"  {path}")
        print(f"garbage (older than PEER_GC_GRACE_SECONDS={settings.gc_grace_seconds:g}): {verb} "
              f"{len(garbage.paths) - len(chunks)} paths and {len(chunks)} chunks, {garbage.bytes} bytes")
    finally:
        ctx.close()


def cmd_revoke_sessions(args, settings: Settings) -> None:
    """End console sign-in sessions on the server: every live one, or those of one key (``--key NAME``)."""
    from .api.sessions import revoke_sessions
    from .context import ServiceContext

    ctx = ServiceContext.from_settings(settings)
    try:
        ended = revoke_sessions(ctx.sessions, args.key)
    finally:
        ctx.close()
    print(f"ended {ended} console session{'s' if ended != 1 else ''}" + (f" of key {args.key!r}" if args.key else ""))


def cmd_api(args, settings: Settings) -> None:
    import uvicorn

    from .api.app import create_app

    uvicorn.run(create_app(settings), host=args.host or settings.host, port=args.port or settings.port,
                log_level=args.log_level.lower(), log_config=None,  # uvicorn's lines go through our root handler
                **http_options(settings))


def http_options(settings: Settings) -> dict:
    """uvicorn's options from the settings: idle keep-alive, and which proxies may name the client."""
    return {"timeout_keep_alive": settings.http_keep_alive_seconds, "proxy_headers": True,
            "forwarded_allow_ips": settings.forwarded_allow_ips}


def worker_argv(queues: str, concurrency: int, pool: str, log_level: str, embedded: bool) -> list[str]:
    argv = ["worker", "--queues", queues, "--concurrency", str(concurrency), "--pool", pool,
            "--loglevel", log_level, "--hostname", f"{queues.replace(',', '+')}@%h"]
    if embedded:  # the filesystem transport has no broadcast: no mingle, gossip or heartbeats
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    return argv


def cmd_worker(args, settings: Settings) -> None:
    from .worker.app import make_celery

    app = make_celery(settings)
    argv = worker_argv(args.queues, args.concurrency, args.pool, args.log_level, settings.embedded)
    app.worker_main(["--quiet", *argv] if settings.log_format == "json" else argv)  # the banner is no log line


def worker_metrics_env(settings: Settings, index: int) -> dict[str, str]:
    """The ``index``-th worker of ``serve`` serves its metrics on PEER_WORKER_METRICS_PORT + index (0 stays off)."""
    port = settings.worker_metrics_port
    return {"PEER_WORKER_METRICS_PORT": str(port + index if port else 0)}


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def training_threads(settings: Settings) -> int:
    """Torch threads of serve's training worker: PEER_WORKER_TORCH_THREADS, or the cores the API's decode
    thread leaves (one worker on all cores beside the API oversubscribes them: on 2 cores a training job
    ran at 1,100 tokens/s against 4,700 with one thread each)."""
    return settings.worker_torch_threads or max(1, (os.cpu_count() or 1) - settings.api_torch_threads)


def recover_orphaned_jobs(settings: Settings) -> None:
    """serve owns the workers of its PEER_HOME: a job still running before they start was interrupted with
    the last serve (killed, or stopped mid-bootstrap); it is queued again now, not after PEER_JOB_STALE_SECONDS."""
    from .context import ServiceContext
    from .db.session import transaction
    from .jobs.lease import requeue_running_jobs

    ctx = ServiceContext.from_settings(settings)
    try:
        with transaction(ctx.sessions) as session:
            recovered = requeue_running_jobs(session, 0)
    finally:
        ctx.close()
    if recovered:
        logging.getLogger(__name__).warning("jobs %s were interrupted by the last stop: queued again", recovered)


def cmd_serve(args, settings: Settings) -> None:
    """Migrate, queue again the jobs the last stop interrupted, start one worker process per queue, and run
    the API here; stop the workers on exit (a worker's warm shutdown hands its running job back)."""
    cmd_migrate(args, settings)
    if settings.embedded:
        recover_orphaned_jobs(settings)
    # uvicorn re-raises SIGTERM after its graceful shutdown; as SystemExit it reaches the finally below
    signal.signal(signal.SIGTERM, _exit_on_signal)
    env = {**os.environ, "PEER_HOME": str(settings.home)}
    workers = [subprocess.Popen([sys.executable, "-m", "service.cli", "--log-level", args.log_level, "worker",
                                 "--queues", queue], env={**env, **worker_metrics_env(settings, index),
                                                          "PEER_WORKER_TORCH_THREADS": str(threads)})
               for index, (queue, threads) in enumerate((("ingest", 1), ("train", training_threads(settings))))]
    try:
        cmd_api(args, settings)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()


def schema_refusal(settings: Settings) -> str | None:
    """Why api or worker must not start on this database (not migrated to this code's schema), or None. A
    database that cannot be reached now is not refused here: the processes wait for it as they do mid-run."""
    from sqlalchemy.exc import OperationalError

    from .db.migrate import schema_problem

    try:
        return schema_problem(settings.resolved_database_url)
    except OperationalError as exc:
        logging.getLogger(__name__).warning("could not check the database schema (%s): starting anyway",
                                            str(exc).splitlines()[0])
        return None


def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(prog="peer-service", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("api", cmd_api), ("serve", cmd_serve)):
        p = sub.add_parser(name, help="run the HTTP API" if name == "api" else
                           "embedded default: migrate, workers and API in one command")
        p.add_argument("--host")
        p.add_argument("--port", type=int)
        p.set_defaults(func=func)
    p = sub.add_parser("worker", help="run a Celery worker")
    p.add_argument("--queues", default="ingest,train")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--pool", default="solo", help="solo (default; safe with CUDA) or prefork")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("migrate", help="create or upgrade the database schema")
    p.set_defaults(func=cmd_migrate)
    p = sub.add_parser("gc", help="apply the retention policy and remove unreferenced store files")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("revoke-sessions", help="end console sign-in sessions (every one, or one key's)")
    p.add_argument("--key", help="the name of the key whose sessions end (default: every session)")
    p.set_defaults(func=cmd_revoke_sessions)
    from . import client

    p = sub.add_parser("client", help="talk to a running service over HTTP (generate, upload, jobs, versions, ...)",
                       description=client.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    client.add_arguments(p)
    args = parser.parse_args(argv)
    if args.command == "client":  # no PEER_* server settings and no log lines: only the client's output
        return client.run(args)
    try:
        settings = Settings()
    except Exception as exc:  # pydantic ValidationError: a bad PEER_* variable
        parser.exit(2, f"peer-service: invalid settings: {exc}\n")
    setup_logging(settings.log_format, args.log_level)
    if args.command in ("api", "serve"):
        from .api.bindrule import open_bind_refusal

        refusal = open_bind_refusal(args.host or settings.host, settings)
        if refusal:
            parser.exit(2, f"peer-service: {refusal}\n")
    if args.command in ("api", "worker"):
        refusal = schema_refusal(settings)
        if refusal:
            parser.exit(2, f"peer-service: {refusal}\n")
    args.func(args, settings)


if __name__ == "__main__":
    sys.exit(main())
