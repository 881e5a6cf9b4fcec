"""``python -m lethe_operator`` (or ``lethe operator``): the metrics endpoint and kopf."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

STAGING_ENV = "LETHE_STAGING_DIR"  # where the operator's temporary files go
STAGING_NAME = "lethe-operator"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def prepare_staging(base: str | None = None) -> Path:
    """A temporary directory of this process's own, under ``<base>/lethe-operator/``
    (``base``: ``$LETHE_STAGING_DIR``, else the system's temporary directory), made the
    default of ``tempfile`` and of the processes it starts (``TMPDIR``).

    The operator reads datasets into memory and stages nothing on disk, but whatever
    a library might write there goes here, and the directories of operators that are
    gone (killed, crashed) are removed on start: a raw dataset copy never outlives the
    process that made it. Directories of live operators (one per process id, other
    replicas on the same node) are left alone."""
    root = Path(base or os.environ.get(STAGING_ENV) or tempfile.gettempdir()) / STAGING_NAME
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for entry in root.iterdir():
        if entry.name.isdigit() and _alive(int(entry.name)) and int(entry.name) != os.getpid():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    own = root / str(os.getpid())
    own.mkdir(mode=0o700)
    os.environ["TMPDIR"] = str(own)
    tempfile.tempdir = str(own)
    return own


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lethe operator")
    p.add_argument("--namespace", action="append", help="watch only these (default: all)")
    p.add_argument(
        "--metrics-port", type=int, default=int(os.environ.get("LETHE_METRICS_PORT", "9090"))
    )
    p.add_argument("--metrics-host", default=os.environ.get("LETHE_METRICS_HOST", "127.0.0.1"))
    p.add_argument(
        "--verbose", action="store_true", help="kopf's debug log (timings of every handler)"
    )
    args = p.parse_args(argv)
    from lethe import agent

    try:  # a bad value would fail every reconcile: refuse to start instead
        agent.port()
    except ValueError as e:
        p.error(str(e))
    staging = prepare_staging()

    import logging
    import warnings

    import kopf
    from prometheus_client import start_http_server

    # kopf's formatter prefixes each message about an object with [namespace/name]
    kopf.configure(log_format="%(asctime)s %(levelname)s %(name)s %(message)s", log_prefix=True)
    if args.verbose:  # kopf's and the operator's own debug lines, not every library's
        for name in ("kopf", "lethe.operator"):
            logging.getLogger(name).setLevel(logging.DEBUG)
    # the local stack's self-signed API server certificate (insecure-skip-tls-verify)
    warnings.filterwarnings("ignore", message="Unverified HTTPS request")

    import lethe_operator.handlers  # noqa: F401 - registers the handlers

    start_http_server(args.metrics_port, addr=args.metrics_host)
    try:
        kopf.run(
            clusterwide=not args.namespace,
            namespaces=args.namespace or (),
            standalone=True,
            liveness_endpoint=os.environ.get("LETHE_LIVENESS"),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
