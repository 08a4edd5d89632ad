"""``peer-service``: api, worker, migrate, serve (the embedded default: everything on this machine), and client
(a running service from a terminal: ``peer-service client --help``)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys

from .settings import Settings


def cmd_migrate(args, settings: Settings) -> None:
    from .migrate import upgrade

    upgrade(settings.resolved_database_url)
    print(f"database at head: {settings.resolved_database_url}")


def cmd_api(args, settings: Settings) -> None:
    import uvicorn

    from .api.app import create_app

    uvicorn.run(create_app(settings), host=args.host or settings.host, port=args.port or settings.port,
                log_level=args.log_level.lower())


def worker_argv(queues: str, concurrency: int, pool: str, log_level: str, embedded: bool) -> list[str]:
    argv = ["worker", "--queues", queues, "--concurrency", str(concurrency), "--pool", pool,
            "--loglevel", log_level, "--hostname", f"{queues.replace(',', '+')}@%h"]
    if embedded:  # the filesystem transport has no broadcast: no mingle, gossip or heartbeats
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    return argv


def cmd_worker(args, settings: Settings) -> None:
    from .worker.app import make_celery

    app = make_celery(settings)
    app.worker_main(worker_argv(args.queues, args.concurrency, args.pool, args.log_level, settings.embedded))


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def cmd_serve(args, settings: Settings) -> None:
    """Migrate, start one worker process per queue, and run the API here; stop the workers on exit."""
    cmd_migrate(args, settings)
    # uvicorn re-raises SIGTERM after its graceful shutdown; as SystemExit it reaches the finally below
    signal.signal(signal.SIGTERM, _exit_on_signal)
    env = {**os.environ, "PEER_HOME": str(settings.home)}
    workers = [subprocess.Popen([sys.executable, "-m", "service.cli", "--log-level", args.log_level, "worker",
                                 "--queues", queue], env=env)
               for queue in ("ingest", "train")]
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
    from . import client

    p = sub.add_parser("client", help="talk to a running service over HTTP (generate, upload, jobs, versions, ...)",
                       description=client.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    client.add_arguments(p)
    args = parser.parse_args(argv)
    if args.command == "client":  # no PEER_* server settings and no log lines: only the client's output
        return client.run(args)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except Exception as exc:  # pydantic ValidationError: a bad PEER_* variable
        parser.exit(2, f"peer-service: invalid settings: {exc}\n")
    args.func(args, settings)


if __name__ == "__main__":
    sys.exit(main())
