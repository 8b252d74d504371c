"""`llm-gateway`: one command for every process and task (DESIGN §3)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shared.logs import configure_logging
from shared.settings import ConfigError

if TYPE_CHECKING:
    from stream_edge.settings import EdgeSettings


def _serve(app_factory: str, host: str, port: int, workers: int = 1) -> None:
    from control_plane.settings import ControlPlaneSettings
    from llm_gateway.gc_tuning import freeze_startup_heap
    from llm_gateway.servers import limits_of, run_loop, serve_all, server_for
    from stream_edge.settings import EdgeSettings

    # Each service validates only what it reads: an edge needs no database or admin token.
    settings: ControlPlaneSettings | EdgeSettings
    if app_factory == "control-plane":
        settings = ControlPlaneSettings.from_env(os.environ)
        settings.require_encryption_key()
    else:
        settings = EdgeSettings.from_env(os.environ)
        settings.route_cipher_keys()  # the `upr` claim's keys: the ring or LLMGW_ROUTE_KEY
        _require_spool(settings)
    from llm_gateway.setting_names import warn_misconfiguration

    warn_misconfiguration(os.environ, settings.catalog)  # a misspelled LLMGW_*, a free model
    graceful = settings.drain_seconds + 10
    if workers > 1:
        from llm_gateway.workers import serve_workers

        if not settings.redis_url:
            raise ConfigError("LLMGW_REDIS_URL is required to run several workers")
        serve_workers(app_factory, settings, host, port, workers, graceful)
        return
    if isinstance(settings, ControlPlaneSettings):
        from control_plane.app import create_app as cp_app

        app = cp_app(settings)
    else:
        from stream_edge.app import create_app as edge_app

        if not settings.redis_url:
            raise ConfigError("LLMGW_REDIS_URL is required to run services as separate processes")
        app = edge_app(settings)
    freeze_startup_heap()
    server = server_for(app, host, port, graceful_seconds=graceful, limits=limits_of(settings))
    run_loop(serve_all([server]))


def _require_spool(settings: EdgeSettings) -> None:
    """The spool keeps the usage reports the store would not take: one the edge cannot
    write loses them (unbilled streams) at the next store outage, so refuse to start."""
    from stream_edge.app import spool_directory
    from stream_edge.spool import probe

    try:
        probe(spool_directory(settings))
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"LLMGW_SPOOL_DIR {settings.spool_dir!r} is not writable ({reason}): usage "
            "reports of streams that end while Redis is down are kept there; give it a "
            "writable volume"
        ) from None


def _migrate() -> None:
    """Apply the migrations to LLMGW_DATABASE_URL (unset: the default SQLite file),
    naming the database migrated and any LLMGW_* variable nothing reads first: a
    misspelled URL variable migrated the default file without a word."""
    import logging

    from control_plane.migrate import head, migrated_line, upgrade
    from control_plane.settings import DEFAULT_DATABASE_URL
    from llm_gateway.setting_names import unknown_settings

    log = logging.getLogger("llmgw.migrate")
    for line in unknown_settings(os.environ):
        log.warning(line)
    database_url = os.environ.get("LLMGW_DATABASE_URL") or DEFAULT_DATABASE_URL
    upgrade(database_url)
    log.info(migrated_line(database_url, head()))


def _mock(host: str, port: int) -> None:
    from llm_gateway.http_guard import ConnectionLimits
    from llm_gateway.servers import run_loop, serve_all, server_for
    from mock_llm.app import create_app

    # The mock reads no settings, but it serves every stream an edge relays: it takes
    # the services' connection cap, so a load test's edge is not capped by its mock.
    cap = os.environ.get("LLMGW_MAX_CONNECTIONS", "")
    limits = ConnectionLimits(max_connections=int(cap)) if cap.isdigit() else None
    run_loop(serve_all([server_for(create_app(), host, port, limits=limits)]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="everything in one process on embedded defaults")
    dev.add_argument("--port-base", type=int, default=8000)
    dev.add_argument("--host", default="127.0.0.1")
    for name, port in (("control-plane", 8000), ("stream-edge", 8001), ("mock-llm", 8002)):
        cmd = sub.add_parser(name, help=f"serve the {name.replace('-', ' ')}")
        cmd.add_argument("--host", default="127.0.0.1")
        cmd.add_argument("--port", type=int, default=port)
        if name != "mock-llm":
            cmd.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    sub.add_parser("migrate", help="apply database migrations")
    from llm_gateway.admin import add_admin_parser

    add_admin_parser(sub)
    from llm_gateway.outbox_cli import add_outbox_parser

    add_outbox_parser(sub)
    from llm_gateway.chat import add_chat_parser

    add_chat_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # JSON lines for the services, text for the commands people run by hand.
        configure_logging(
            os.environ.get("LLMGW_LOG_LEVEL", "INFO"),
            default_format="text" if args.command in ("dev", "admin", "outbox", "chat") else "json",
        )
        if args.command == "dev":
            from llm_gateway.local_hosts import check_local_host

            check_local_host(args.host)  # before the heavy imports: refused at once
            from llm_gateway.dev import run_dev
            from llm_gateway.servers import run_loop

            run_loop(run_dev(args.port_base, args.host))
        elif args.command in ("control-plane", "stream-edge"):
            _serve(args.command, args.host, args.port, args.workers)
        elif args.command == "mock-llm":
            _mock(args.host, args.port)
        elif args.command == "migrate":
            _migrate()
        elif args.command == "admin":
            from llm_gateway.admin import run_admin

            return run_admin(args)
        elif args.command == "outbox":
            from llm_gateway.outbox_cli import run_outbox

            return run_outbox(args)
        elif args.command == "chat":
            from llm_gateway.chat import run_chat

            return run_chat(args)
    except ConfigError as exc:
        print(f"llm-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
