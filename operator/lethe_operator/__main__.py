"""``python -m lethe_operator`` (or ``lethe operator``): the metrics endpoint and kopf."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lethe operator")
    p.add_argument("--namespace", action="append", help="watch only these (default: all)")
    p.add_argument(
        "--metrics-port", type=int, default=int(os.environ.get("LETHE_METRICS_PORT", "9090"))
    )
    p.add_argument("--metrics-host", default=os.environ.get("LETHE_METRICS_HOST", "127.0.0.1"))
    args = p.parse_args(argv)

    import warnings

    import kopf
    from prometheus_client import start_http_server

    # kopf's formatter prefixes each message about an object with [namespace/name]
    kopf.configure(log_format="%(asctime)s %(levelname)s %(name)s %(message)s", log_prefix=True)
    # the local stack's self-signed API server certificate (insecure-skip-tls-verify)
    warnings.filterwarnings("ignore", message="Unverified HTTPS request")

    import lethe_operator.handlers  # noqa: F401 - registers the handlers

    start_http_server(args.metrics_port, addr=args.metrics_host)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        standalone=True,
        liveness_endpoint=os.environ.get("LETHE_LIVENESS"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
