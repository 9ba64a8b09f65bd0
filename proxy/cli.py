"""`dicomweb-edge serve | demo | check-config`."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import logging.config
import os
import resource
import secrets
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from proxy import __version__
from proxy.cache import purges
from proxy.cache.entries import check_live
from proxy.cache.store import DISK_ERRORS, FrameCache
from proxy.config import SETTINGS_ENV, ConfigError, Settings, load, load_file, parse_upstream_flag, to_toml
from proxy.config.schema import LOG_LEVELS
from proxy.coordination import siblings
from proxy.demo.run import run_demo
from proxy.observability import metrics
from proxy.observability.logs import log_config
from proxy.runtime import check_settings
from proxy.upstream.probes import RUN_DIR_ENV

if TYPE_CHECKING:
    import uvicorn
    from uvicorn.supervisors import Multiprocess


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "shutdown_grace": args.shutdown_grace,
        "cache_dir": args.cache_dir,
        "public_url": args.public_url,
        "log_level": args.log_level,
        "viewer_dir": args.viewer,
    }
    if args.upstream:
        overrides["archives"] = [parse_upstream_flag(u) for u in args.upstream]
    return checked(load(args.config, overrides), args.config)


def checked(settings: Settings, source: str | None) -> Settings:
    """`settings` once runtime.check_settings has judged what only the code that uses them can (the [auth]
    table, archive credentials and TLS files); its ConfigError names the file."""
    try:
        check_settings(settings)
    except ConfigError as exc:
        raise ConfigError(f"{source or 'settings'}: {exc}") from None
    return settings


def _supervisor(config: uvicorn.Config, sock: socket.socket) -> Multiprocess:
    """uvicorn's worker supervisor, except that SIGTERM also closes its copy of the listening socket.

    The workers close theirs when they start draining; without this the parent's copy would keep the
    port open and new connections would wait in the backlog, unanswered, until the drain ends.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    logging.getLogger("uvicorn.error").addFilter(_worker_deaths_are_warnings)

    class Supervisor(Multiprocess):
        def terminate_all(self) -> None:
            for s in self.sockets:
                s.close()
            super().terminate_all()

        # /metrics learns which workers serve: at start, and after one died (and was replaced) or a
        # restart (SIGHUP) retired it; a gone worker's gauges leave /metrics.
        def init_processes(self) -> None:
            self._recorded(super().init_processes)

        def keep_subprocess_alive(self) -> None:
            self._recorded(super().keep_subprocess_alive)

        def restart_all(self) -> None:
            self._recorded(super().restart_all)

        def _recorded(self, step: Callable[[], None]) -> None:
            before = [p.pid for p in self.processes]
            step()
            now = [p.pid for p in self.processes]
            if now != before:
                metrics.workers_now(now, gone=set(before) - set(now))

    if "target" in inspect.signature(Multiprocess).parameters:  # uvicorn < 0.52
        run = uvicorn.Server(config).run
        # Only uvicorn < 0.52 takes `target=`: the error (and so the ignore) depends on the installed uvicorn.
        return Supervisor(config, target=run, sockets=[sock])  # type: ignore[call-arg, unused-ignore]  # old uvicorn
    return Supervisor(config, sockets=[sock])


def _worker_deaths_are_warnings(record: logging.LogRecord) -> bool:
    """uvicorn's supervisor says "Child process [pid] died" (then starts another) at INFO: an operator's
    WARNING (the message text is uvicorn's; tests/test_ops_e2e.py kills a worker and reads the log)."""
    if record.levelno == logging.INFO and str(record.msg).startswith("Child process [") and \
            str(record.msg).endswith("] died"):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def raise_descriptor_limit() -> tuple[int, int]:
    """The soft limit on open files raised to the hard one (1024 is a common soft limit in containers:
    past it new connections are refused); (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, hard
    return soft, soft


def serve(settings: Settings) -> None:
    """Run uvicorn with `settings` (one process, or `workers` processes sharing the socket).

    SIGTERM stops accepting connections at once, lets in-flight responses finish for up to
    `shutdown_grace` seconds, cuts what is left, and exits.
    """
    import uvicorn


    if not settings.bulk_token_key:  # one for all the workers (they read each other's tokens)
        settings.bulk_token_key = secrets.token_hex(32)
    os.environ[SETTINGS_ENV] = settings.to_json()
    before, now = raise_descriptor_limit()  # (inherited by the workers)
    if settings.workers > 1:
        metrics.workers_directory()
        os.environ[RUN_DIR_ENV] = tempfile.mkdtemp(prefix="dicomweb-edge-run-")  # shared by the workers
    logging.config.dictConfig(log_config(settings))
    logging.getLogger("dicomweb_edge").info("open-file limit %d (soft limit was %d)", now, before)
    config = uvicorn.Config("proxy.runtime:app_from_env", factory=True, host=settings.host, port=settings.port,
                            workers=settings.workers, access_log=False, log_level=settings.log_level.lower(),
                            log_config=log_config(settings),
                            loop="uvloop",
                            http=("httptools" if "server_protocol" in settings.disable
                                  else "proxy.http.protocol:EdgeHttpProtocol"),
                            # Forwarding headers are judged by the proxy itself against trusted_proxies
                            # (target.base_of, limits.client_key): uvicorn's own handling would replace the
                            # peer's address with a forwarded one before any of that runs.
                            proxy_headers=False,
                            # uvicorn's hint says int, but it is asyncio.timeout's seconds: a float works
                            timeout_graceful_shutdown=settings.shutdown_grace,  # type: ignore[arg-type]  # (see above)
                            timeout_keep_alive=max(1, round(settings.keepalive_timeout)),
                            ssl_certfile=settings.tls_cert_file, ssl_keyfile=settings.tls_key_file)
    if settings.workers > 1:
        try:
            _supervisor(config, config.bind_socket()).run()
        finally:
            shutil.rmtree(os.environ[RUN_DIR_ENV], ignore_errors=True)
    else:
        server = uvicorn.Server(config)
        server.run()
        if not server.started:
            sys.exit(3)  # like uvicorn.run: the port could not be bound or the app did not start


def cache_command(args: argparse.Namespace) -> int:
    """`dicomweb-edge cache stats|purge|check`: works on the cache directory; stats and purge with or without
    a running proxy, `check --fix` only without one."""

    directory = args.cache_dir
    if directory is None and args.config:
        directory = load_file(args.config).get("cache_dir")
    if not directory:
        raise ConfigError("no cache directory: pass --cache-dir or a --config with [cache] dir")
    if args.action == "check" and args.fix and (running := siblings.workers_on(directory)):
        raise ConfigError(f"{running} proxy worker(s) serve this cache directory: stop them before check --fix")
    try:
        if args.action == "check" and not args.fix:  # workers may be writing: no write lock held (entries.py)
            return _report(check_live(directory), fixed=False)
        return _cache_action(args, FrameCache(directory))
    except DISK_ERRORS as exc:  # a full disk, a directory that cannot be written, an index that does not read
        print(f"dicomweb-edge cache {args.action}: the cache directory cannot be used: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1


def _report(found: list[str], fixed: bool) -> int:
    print(json.dumps({"problems": len(found), "fixed": fixed, "details": found[:100]}, indent=2))
    return 1 if found and not fixed else 0


def _cache_action(args: argparse.Namespace, cache: FrameCache) -> int:

    try:
        if args.action == "check":
            # With no worker running: diskcache's own check, which corrects what it finds (SQLite's integrity,
            # rows whose file is gone, files no row names, sizes) and vacuums the database. Empty directories
            # are the 256 the layout makes up front (entries.FlatDisk), not a problem.
            found = [m for w in cache.disk.check(fix=True) if not (m := str(w.message)).startswith("empty dir")]
            return _report(found, fixed=True)
        if args.action == "stats":
            stats = cache.stats()
            del stats["memory_entries"], stats["memory_bytes"], stats["held_back_bytes"]  # a running worker's own
            print(json.dumps(stats, indent=2))
        else:
            print(json.dumps({"removed": purges.purge(cache, args.study)}))
    finally:
        cache.close()
    return 0


def describe(s: Settings) -> str:
    """The effective configuration as TOML, for `check-config`: what `serve --config` reads back, with each
    secret printed as `***` (which `serve` refuses: put the secret back, or use a *_file / *_env key)."""
    return to_toml(s)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dicomweb-edge` command."""
    parser = argparse.ArgumentParser(prog="dicomweb-edge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dicomweb-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--upstream", action="append", metavar="NAME=URL",
                   help="an archive's DICOMweb base URL (repeatable; replaces the config's archives)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--shutdown-grace", type=float, metavar="SECONDS",
                   help="on SIGTERM, how long in-flight responses may take to finish (default 30)")
    p.add_argument("--cache-dir")
    p.add_argument("--public-url", help="external base URL used in rewritten URLs")
    p.add_argument("--log-level", choices=LOG_LEVELS)
    p.add_argument("--viewer", metavar="DIR", help="serve this built OHIF dist/ at / (./scripts/fetch-ohif.sh)")

    d = sub.add_parser("demo", help="two sample archives with generated studies, and the proxy in front")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--sample-archives", action="store_true",
                   help="use the built-in sample archives even when Orthanc is installed")
    d.add_argument("--ct-slices", type=int, default=40)
    d.add_argument("--viewer", nargs="?", const="", metavar="DIR",
                   help="serve the OHIF viewer at / (DIR, or the one ./scripts/fetch-ohif.sh fetched)")

    c = sub.add_parser("check-config", help="validate a config file and print the effective settings")
    c.add_argument("file")

    k = sub.add_parser("cache", help="frame cache statistics, purge it (all of it, or one study), or check it")
    k.add_argument("action", choices=["stats", "purge", "check"])
    k.add_argument("--study", help="with purge: only this StudyInstanceUID")
    k.add_argument("--fix", action="store_true", help="with check: correct what it finds (proxy stopped)")
    k.add_argument("--config", help="TOML configuration file (for its cache directory)")
    k.add_argument("--cache-dir")

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            serve(_settings(args))
        elif args.command == "check-config":
            print(describe(checked(load(args.file), args.file)), end="")
        elif args.command == "cache":
            return cache_command(args)
        elif args.command == "demo":

            return run_demo(port=args.port, force_sample=args.sample_archives, ct_slices=args.ct_slices,
                            viewer=args.viewer)
    except ConfigError as exc:
        print(f"dicomweb-edge: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
