"""API keys: who is calling.

Keys are off by default (a local server needs none). They are on once any key
is configured, through ``CHATSTREAM_API_KEYS`` (comma-separated keys, hashed as
soon as they are read) or ``CHATSTREAM_API_KEYS_FILE`` (one SHA-256 hex digest
per line, as ``chatstream hash-key`` prints; ``#`` starts a comment). Only
digests are kept in memory.

A caller presents a key as ``Authorization: Bearer <key>``, or, where a
browser cannot set headers (``EventSource``), as the ``access_token`` query
parameter; the request log never shows either. The caller's identity is a
short id derived from the digest: it owns the sessions and runs it creates.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from chatstream.errors import Unauthorized
from chatstream.store.base import SessionRef

QUERY_PARAMETER = "access_token"


def digest(key: str) -> str:
    """The SHA-256 hex digest chatstream stores for a key."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sends a request: the API key's id ("" when keys are off), and from where."""

    id: str
    address: str

    def session(self, session_id: str) -> SessionRef:
        """One of the caller's sessions: each key has its own namespace of ids."""
        return SessionRef(self.id, session_id)

    @property
    def identity(self) -> str:
        """Whom limits count against: the key, or without keys the client's address."""
        return self.id or f"ip:{self.address}"


class KeyRing:
    """The digests of the accepted keys; empty means keys are off."""

    def __init__(self, digests: set[str]) -> None:
        self._digests = {d.lower() for d in digests}

    @classmethod
    def load(cls, keys: tuple[str, ...], keys_file: str) -> KeyRing:
        digests = {digest(k) for k in keys if k}
        if keys_file:
            for line in Path(keys_file).read_text().splitlines():
                entry = line.split("#", 1)[0].strip()
                if not entry:
                    continue
                if len(entry) != 64 or any(c not in "0123456789abcdefABCDEF" for c in entry):
                    raise ValueError(
                        f"{keys_file}: every line must be a SHA-256 hex digest "
                        "(chatstream hash-key KEY prints one)"
                    )
                digests.add(entry)
        return cls(digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, key: str) -> str | None:
        """The caller id for a key, or None when the key is not accepted."""
        candidate = digest(key)
        # compare_digest on every entry: no early exit that would time the match.
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(candidate, known)
        return "k" + candidate[:16] if found else None

    def caller(self, request: Request) -> Caller:
        """Who sends the request; 401 for a missing or wrong key."""
        address = request.client.host if request.client else "unknown"
        if not self.enabled:
            return Caller("", address)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else ""
        key = key or request.query_params.get(QUERY_PARAMETER, "")
        identity = self.identify(key) if key else None
        if identity is None:
            raise Unauthorized(
                "A valid API key is required: send `Authorization: Bearer <key>`."
                if not key
                else "The API key is not valid."
            )
        return Caller(identity, address)
