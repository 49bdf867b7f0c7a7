"""Who is calling: API keys and admin keys from server config, and which routes each may reach.

Keys arrive as `Authorization: Bearer <key>` or, as Anthropic's SDK sends them, `x-api-key: <key>`.
A presented key is hashed and compared with every configured key's hash by hmac.compare_digest,
without stopping at a match, so the time taken says nothing about which key (or how much of one)
was right. Callers are known by name (`key-N` or the name set in config); no message, log line or
metric ever holds a key.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import Enum

from gateway.config import KeyLimits, ServerConfig
from gateway.errors import APIError


class Access(Enum):
    OPEN = "open"          # /health (and the OpenAPI docs, which hold no data)
    API = "api"            # the model API: any key
    OPS = "ops"            # /metrics, /debug/*: any key
    ADMIN = "admin"        # /clear_radix_cache: an admin key, when admin keys are set


OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
OPS_PATHS = frozenset({"/metrics"})
OPS_PREFIXES = ("/debug/",)
ADMIN_PATHS = frozenset({"/clear_radix_cache"})


def access_of(path: str) -> Access:
    """The access class of a path; anything not named here (unknown paths included) is API."""
    if path in OPEN_PATHS:
        return Access.OPEN
    if path in ADMIN_PATHS:
        return Access.ADMIN
    if path in OPS_PATHS or path.startswith(OPS_PREFIXES):
        return Access.OPS
    return Access.API


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its name, whether it holds an admin key, and its per-key limits."""

    name: str
    admin: bool
    limits: KeyLimits | None          # None: unlimited (admin keys)


ANONYMOUS = Caller("anonymous", admin=True, limits=None)      # no keys configured: everything is open


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """The configured keys as (hash, caller) pairs; `enabled` once any key is set."""

    def __init__(self, server: ServerConfig):
        self.entries: list[tuple[bytes, Caller]] = []
        for i, entry in enumerate(server.api_keys, start=1):
            if isinstance(entry, str):
                self.entries.append((_digest(entry), Caller(f"key-{i}", False, server.key_limits)))
            else:
                limits = KeyLimits(**{field: getattr(entry, field) for field in KeyLimits.model_fields})
                self.entries.append((_digest(entry.key), Caller(entry.name or f"key-{i}", False, limits)))
        for i, key in enumerate(server.admin_keys, start=1):
            self.entries.append((_digest(key), Caller(f"admin-{i}", True, None)))
        self.enabled = bool(self.entries)
        # without admin keys, any API key may use the admin routes
        self.admin_separate = bool(server.admin_keys)

    def identify(self, presented: str | None) -> Caller | None:
        """The caller a presented key belongs to, or None; constant time over the configured keys."""
        digest = _digest(presented or "")
        found = None
        for known, caller in self.entries:
            if hmac.compare_digest(digest, known):      # no early exit: every key is compared
                found = caller
        return found

    def authorize(self, path: str, headers: dict[str, str]) -> Caller:
        """The caller of a request for `path`, or an APIError: 401 without a valid key, 403 for an admin
        route with a key that is not an admin key. `headers` are lower-cased names."""
        access = access_of(path)
        if not self.enabled or access is Access.OPEN:
            return ANONYMOUS
        caller = self.identify(presented_key(headers))
        if caller is None:
            raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>' "
                                "(or 'x-api-key: <key>').", code="invalid_api_key")
        if access is Access.ADMIN and self.admin_separate and not caller.admin:
            raise APIError(403, f"This route needs an admin key (server.admin_keys); the key `{caller.name}` is "
                                "an API key.", code="admin_key_required")
        return caller


def presented_key(headers: dict[str, str]) -> str | None:
    """The key a request carries: a Bearer token, else Anthropic's x-api-key header."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key") or None
