"""A local stack without Docker: SeaweedFS (a real S3 server) and a Ray head.

``lethe dev up`` starts both under a state directory (default ``.lethe/dev``),
writes ``<state>/env`` with the settings the other commands read, and is
idempotent; ``lethe dev down`` stops exactly the processes it started (each runs
in its own process group, so no other Ray or SeaweedFS on the machine is touched).
Only loopback addresses are used.

The Ray head is a trusted cluster: it is started with the stack's S3 keys in its
environment, which its workers inherit, so no job has to carry them in its runtime_env
(job metadata). The env file also allows the head's Jobs API to an operator started from
it (``LETHE_RAY_ADDRESSES``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lethe.training import disconnect_ray

HOST = "127.0.0.1"
ACCESS_KEY = "lethe-local-access"  # distinct enough to search for in Ray's metadata
SECRET_KEY = "lethe-local-secret"
# A second identity, scoped as a tenant's keys would be: read and write in TENANT_BUCKET,
# read only in SHARED_BUCKET, nothing elsewhere (the stack's own bucket included). For
# trying the security model: a model given these keys cannot make the cluster read or
# change what they do not reach.
TENANT_ACCESS_KEY = "lethe-tenant-access"
TENANT_SECRET_KEY = "lethe-tenant-secret"
TENANT_BUCKET = "lethe-tenant"
SHARED_BUCKET = "lethe-shared"
DEFAULT_STATE = Path(".lethe/dev")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    """A console script of this virtualenv (weed, ray), else one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"{name} not found: install lethe with the 'local' and 'train' extras (make venv)"
        )
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _wait(check: Callable[[], bool], what: str, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    tail = log.read_text()[-2000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not start within {timeout:.0f}s; log {log}:\n{tail}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status < 500)
    except OSError as e:
        return "HTTP Error 4" in str(e) or "HTTP Error 3" in str(e)


@dataclass
class StackState:
    state_dir: str
    s3_endpoint: str
    ray_address: str
    ray_dashboard: str
    bucket: str
    weed_pid: int
    ray_pid: int
    # Defaults so that a stack.json written before these fields existed still loads.
    seaweedfs_master: str = ""  # master HTTP URL: vacuum and volume status (lethe.reclaim)
    seaweedfs_dir: str = ""  # the server's -dir: volume files (*.dat, *.idx) and filer store
    keys_dir: str = ""  # the models' signing and HMAC keys (lethe.certs), made once
    agent_port: int = 0  # the Ray head's retrain agent (lethe.agent); 0: none

    def env(self) -> dict[str, str]:
        out = {
            "LETHE_S3_ENDPOINT": self.s3_endpoint,
            "LETHE_BUCKET": self.bucket,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "RAY_ADDRESS": self.ray_address,
            "RAY_DASHBOARD_ADDRESS": self.ray_dashboard,
            "RAY_AUTH_MODE": "disabled",
            # an operator started from this env may submit to this stack's Ray head
            "LETHE_RAY_ADDRESSES": self.ray_dashboard,
        }
        if self.seaweedfs_master:
            out["LETHE_SEAWEEDFS_MASTER"] = self.seaweedfs_master
        if self.keys_dir:
            out["LETHE_KEYS_DIR"] = self.keys_dir
        # where an operator started from this env finds the head's retrain agent
        out["LETHE_AGENT_PORT"] = str(self.agent_port)
        return out

    def apply(self) -> None:
        os.environ.update(self.env())


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    p = subprocess.Popen(
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    return p.pid


@dataclass(frozen=True)
class SeaweedFS:
    """A started ``weed server``."""

    endpoint: str  # S3
    pid: int
    master: str  # master HTTP URL
    data_dir: Path


def start_seaweedfs(state: Path) -> tuple[str, int]:
    """Start SeaweedFS; returns (S3 endpoint, pid). ``launch_seaweedfs`` tells more."""
    sw = launch_seaweedfs(state)
    return sw.endpoint, sw.pid


def launch_seaweedfs(state: Path) -> SeaweedFS:
    # S3 Object Lock needs nothing at start: buckets created with ObjectLockEnabledForBucket
    # get it (docs/storage-backends.md). The stack's bucket is created without it.
    data = state / "seaweedfs"
    data.mkdir(parents=True, exist_ok=True)
    config = state / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "lethe",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    {
                        "name": "tenant",
                        "credentials": [
                            {"accessKey": TENANT_ACCESS_KEY, "secretKey": TENANT_SECRET_KEY}
                        ],
                        "actions": [
                            *(f"{a}:{TENANT_BUCKET}" for a in ("Read", "Write", "List", "Tagging")),
                            *(f"{a}:{SHARED_BUCKET}" for a in ("Read", "List")),
                        ],
                    },
                ]
            }
        )
    )
    p = {
        name: free_port()
        for name in (
            "master",
            "master.grpc",
            "volume",
            "volume.grpc",
            "filer",
            "filer.grpc",
            "s3",
            "s3.grpc",
        )
    }
    cmd = [
        _tool("weed"),
        "server",
        f"-dir={data}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-s3",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=256",
        "-volume.max=0",
    ]
    for name, port in p.items():
        service, _, grpc = name.partition(".")
        cmd.append(f"-{service}.port{'.grpc' if grpc else ''}={port}")
    log = state / "seaweedfs.log"
    pid = _spawn(cmd, log)
    endpoint = f"http://{HOST}:{p['s3']}"
    _wait(lambda: _http_ok(endpoint), "SeaweedFS S3", 60, log)
    return SeaweedFS(endpoint, pid, f"http://{HOST}:{p['master']}", data)


def start_ray(state: Path, num_cpus: int | None) -> tuple[str, str, int, int]:
    """Start a Ray head; returns (GCS address, dashboard URL, pid, retrain agent port)."""
    while True:  # a worker port range of our own, off the other ports
        gcs = free_port()
        lo = 30000 + (gcs % 200) * 100
        if gcs not in range(lo, lo + 100):
            break

    def port() -> int:  # a free port outside that range (Ray refuses an overlap)
        while (p := free_port()) in range(lo, lo + 100):
            pass
        return p

    dash, client, agent = port(), port(), port()
    temp = Path(f"/tmp/lethe-ray-{gcs}")
    cmd = [
        _tool("ray"),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={HOST}",
        f"--port={gcs}",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}",
        f"--min-worker-port={lo}",
        f"--max-worker-port={lo + 99}",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
        f"--num-cpus={num_cpus or os.cpu_count() or 2}",
    ]
    # Ports of our own, so that two stacks (tests, a demo, `lethe dev`) never collide.
    for flag in (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
        "node-manager-port",
        "object-manager-port",
    ):
        cmd.append(f"--{flag}={port()}")
    log = state / "ray.log"
    # Ray jobs run `python -m lethe.jobs`: put this virtualenv first on the head's PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # The S3 keys live in the head's environment (every worker inherits the raylet's),
    # never in a job's runtime_env: this head is the stack's trusted cluster.
    env = {
        "RAY_AUTH_MODE": "disabled",
        "PATH": path,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "LETHE_AGENT_PORT": str(agent),  # the retrain service's HTTP API (lethe.agent)
        "LETHE_AGENT_HOST": HOST,
    }
    pid = _spawn(cmd, log, env)
    dashboard = f"http://{HOST}:{dash}"
    _wait(lambda: _http_ok(f"{dashboard}/api/version"), "Ray head", 120, log)
    return f"{HOST}:{gcs}", dashboard, pid, agent


def read_state(state_dir: Path = DEFAULT_STATE) -> StackState | None:
    f = state_dir / "stack.json"
    if not f.exists():
        return None
    st = StackState(**json.loads(f.read_text()))
    if not (_alive(st.weed_pid) and _alive(st.ray_pid)):
        return None
    return st


def ensure_keys(state_dir: Path) -> Path:
    """The local stack's keys (``<state>/keys``): made once, never overwritten."""
    from lethe.certs import HMAC_KEY_FILE, Keys

    where = (state_dir / "keys").resolve()
    if not (where / HMAC_KEY_FILE).exists():
        Keys.generate().save(where)
    return where


def up(
    state_dir: Path = DEFAULT_STATE, bucket: str = "lethe", num_cpus: int | None = None
) -> StackState:
    """Start the stack, or return the running one (idempotent)."""
    existing = read_state(state_dir)
    if existing:
        existing.apply()
        return existing
    down(state_dir)  # clear half-started leftovers
    state_dir.mkdir(parents=True, exist_ok=True)
    sw = launch_seaweedfs(state_dir)
    try:
        ray_address, dashboard, ray_pid, agent_port = start_ray(state_dir, num_cpus)
    except Exception:
        stop_process(sw.pid)
        raise
    st = StackState(
        str(state_dir),
        sw.endpoint,
        ray_address,
        dashboard,
        bucket,
        sw.pid,
        ray_pid,
        seaweedfs_master=sw.master,
        seaweedfs_dir=str(sw.data_dir.resolve()),
        keys_dir=str(ensure_keys(state_dir)),
        agent_port=agent_port,
    )
    (state_dir / "stack.json").write_text(json.dumps(asdict(st), indent=1))
    (state_dir / "env").write_text("".join(f"export {k}={v}\n" for k, v in st.env().items()))
    st.apply()
    from lethe.store import S3Settings, Store

    Store(S3Settings.from_env()).ensure_bucket(versioning=True)
    return st


def stop_process(pid: int) -> None:
    """Stop a server this module spawned (its whole process group): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except OSError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)
            except OSError:
                return
            time.sleep(0.2)


def down(state_dir: Path = DEFAULT_STATE) -> bool:
    f = state_dir / "stack.json"
    if not f.exists():
        return False
    st = json.loads(f.read_text())
    disconnect_ray()
    for key in ("ray_pid", "weed_pid"):
        stop_process(int(st[key]))
    f.unlink()
    return True
