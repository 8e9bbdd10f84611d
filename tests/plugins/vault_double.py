"""A TEST DOUBLE of HashiCorp Vault's HTTP API — no Vault binary can be installed on these machines.

It speaks the subset slipway uses, with Vault's paths, JSON shapes and status codes, so that ``hvac`` talks
to it over real HTTP: token lookup-self / renew-self, AppRole and Kubernetes login, KV v2 read/write,
transit encrypt/decrypt (AES-256-GCM), and ``sys/leases/renew``. Tokens expire after their TTL. Production code
does not know it exists; it is only ever started by the ``vault`` fixture.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


@dataclass
class VaultState:
    root_token: str = field(default_factory=lambda: "hvs." + secrets.token_urlsafe(18))
    token_ttl: int = 3600
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    kv: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    transit: dict[str, bytes] = field(default_factory=dict)
    approles: dict[str, str] = field(default_factory=dict)  # role_id -> secret_id
    k8s_roles: dict[str, str] = field(default_factory=dict)  # role -> accepted service-account jwt
    requests: list[str] = field(default_factory=list)  # "METHOD path" of every request, for assertions
    renewals: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def issue(self) -> dict[str, Any]:
        token = "hvs." + secrets.token_urlsafe(18)
        self.tokens[token] = time.monotonic() + self.token_ttl
        return {"client_token": token, "lease_duration": self.token_ttl, "renewable": True, "policies": ["default"]}


class _Handler(BaseHTTPRequestHandler):
    state: VaultState
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the request line is kept in state.requests
        pass

    def _send(self, status: int, body: dict[str, Any] | None = None) -> None:
        data = json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, *errors: str) -> None:
        self._send(status, {"errors": list(errors)})

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}") if n else {}

    def _token_ok(self) -> str | None:
        token = self.headers.get("X-Vault-Token") or ""
        st = self.state
        if token == st.root_token:
            return token
        exp = st.tokens.get(token)
        if exp is None or exp < time.monotonic():
            self._error(403, "permission denied")
            return None
        return token

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def _route(self, method: str) -> None:
        st = self.state
        path = self.path.split("?", 1)[0]
        st.requests.append(f"{method} {path}")
        body = self._body() if method in ("POST", "PUT") else {}
        with st.lock:
            if m := re.fullmatch(r"/v1/auth/approle/login", path):
                if st.approles.get(body.get("role_id", "")) != body.get("secret_id"):
                    return self._error(400, "invalid role or secret ID")
                return self._send(200, {"auth": st.issue()})
            if m := re.fullmatch(r"/v1/auth/kubernetes/login", path):
                if st.k8s_roles.get(body.get("role", "")) != body.get("jwt"):
                    return self._error(403, "permission denied")
                return self._send(200, {"auth": st.issue()})
            token = self._token_ok()
            if token is None:
                return None
            if path == "/v1/auth/token/lookup-self":
                ttl = 0 if token == st.root_token else int(st.tokens[token] - time.monotonic())
                return self._send(200, {"data": {"ttl": ttl, "renewable": token != st.root_token}})
            if path == "/v1/auth/token/renew-self":
                if token == st.root_token:
                    return self._error(400, "lease is not renewable")
                st.tokens[token] = time.monotonic() + st.token_ttl
                st.renewals += 1
                return self._send(200, {"auth": {"client_token": token, "lease_duration": st.token_ttl,
                                                 "renewable": True}})  # fmt: skip
            if path == "/v1/sys/leases/renew":
                return self._send(200, {"lease_id": body.get("lease_id"), "lease_duration": body.get("increment") or 60,
                                        "renewable": True})  # fmt: skip
            if m := re.fullmatch(r"/v1/([^/]+)/data/(.+)", path):
                key = (m[1], m[2])
                if method == "GET":
                    versions = st.kv.get(key)
                    if not versions:
                        return self._error(404)
                    return self._send(200, {"data": {"data": versions[-1], "metadata": {"version": len(versions),
                                                     "deletion_time": "", "destroyed": False}}})  # fmt: skip
                st.kv.setdefault(key, []).append(dict(body.get("data") or {}))
                return self._send(200, {"data": {"version": len(st.kv[key])}})
            if m := re.fullmatch(r"/v1/([^/]+)/keys/([^/]+)", path):
                st.transit.setdefault(m[2], AESGCM.generate_key(bit_length=256))
                return self._send(204)
            if m := re.fullmatch(r"/v1/([^/]+)/(encrypt|decrypt)/([^/]+)", path):
                if m[2] == "encrypt":
                    k = st.transit.setdefault(m[3], AESGCM.generate_key(bit_length=256))
                    nonce = os.urandom(12)
                    ct = AESGCM(k).encrypt(nonce, base64.b64decode(body["plaintext"]), None)
                    return self._send(200, {"data": {"ciphertext": "vault:v1:" + base64.b64encode(nonce + ct).decode(),
                                                     "key_version": 1}})  # fmt: skip
                k = st.transit.get(m[3])
                raw = str(body.get("ciphertext", ""))
                if k is None or not raw.startswith("vault:v1:"):
                    return self._error(400, "invalid ciphertext")
                blob = base64.b64decode(raw[len("vault:v1:") :])
                try:
                    pt = AESGCM(k).decrypt(blob[:12], blob[12:], None)
                except Exception:
                    return self._error(400, "cipher: message authentication failed")
                return self._send(200, {"data": {"plaintext": base64.b64encode(pt).decode()}})
            return self._error(404, f"no handler for route {path!r}")


class VaultDouble:
    """The test double on a free loopback port; ``url`` is what ``SLIPWAY_VAULT_ADDR`` points at."""

    def __init__(self) -> None:
        self.state = VaultState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="vault-double", daemon=True)

    def __enter__(self) -> VaultDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def put(self, mount: str, path: str, data: dict[str, Any]) -> None:
        with self.state.lock:
            self.state.kv.setdefault((mount, path), []).append(dict(data))
