"""Access control: optional API keys, checked on every /v1 route as `Authorization: Bearer KEY`.

With no key configured every request passes (the default, for a server on loopback). Health, readiness and
metrics (`/healthz`, `/readyz`, `/metrics`) stay open so that probes and scrapers need no secret; so do the
API docs. Keys are compared as SHA-256 digests with `hmac.compare_digest`, every key every time, so the
answer takes the same time whichever key (or how much of one) a caller guessed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
from pathlib import Path
from typing import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("frontend.auth")

PROTECTED_PREFIX = "/v1/"
UNAUTHORIZED = {"detail": "missing or invalid API key (send 'Authorization: Bearer KEY')"}


def read_key_file(path: Path) -> list[str]:
    """Keys from a file, one a line; blank lines and `#` comments are skipped."""
    keys = []
    for line in path.read_text(encoding="utf-8").splitlines():
        key = line.split("#", 1)[0].strip()
        if key:
            keys.append(key)
    return keys


class KeyChecker:
    """Holds only digests of the keys; `allows(header)` says whether an Authorization header carries one."""

    def __init__(self, keys: Iterable[str]):
        self._digests = [hashlib.sha256(key.encode("utf-8")).digest() for key in dict.fromkeys(keys) if key]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def allows(self, authorization: str | None) -> bool:
        if not self._digests:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogatepass")).digest()
        matched = False
        for digest in self._digests:  # no early exit: the time does not depend on which key matched
            matched |= hmac.compare_digest(given, digest)
        return matched


def needs_key(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIX) or path.rstrip("/") == "/v1"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_warning(host: str, keys_enabled: bool) -> str | None:
    """The start-up warning for a server that anyone on the network can use, or None."""
    if keys_enabled or is_loopback(host):
        return None
    return (f"listening on {host} without API keys: anyone who can reach this address can submit, cancel and "
            "download tasks; set --api-key/WAN_API_KEY (or --api-key-file) and put TLS in front (SECURITY.md)")


class BearerAuth:
    """ASGI middleware: 401 for a /v1 request without a valid key; everything else passes through."""

    def __init__(self, app: ASGIApp, checker: KeyChecker):
        self.app = app
        self.checker = checker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.checker.enabled or not needs_key(scope["path"]):
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        if self.checker.allows(authorization):
            await self.app(scope, receive, send)
            return
        payload = json.dumps(UNAUTHORIZED).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()),
                                (b"www-authenticate", b'Bearer realm="wan"')]})
        await send({"type": "http.response.body", "body": payload})
