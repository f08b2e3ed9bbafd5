"""Which hosts and origins a browser may reach the server from.

Two attacks come through a browser, whichever key the server has or lacks:

* *Cross-site requests*: a page on another site starts a turn with a plain
  ``<img src=http://127.0.0.1:3002/api/chat/stream?message=…>`` or a form POST. The
  browser sends these without asking; it only hides the answer. ``OriginGuard``
  refuses any turn-starting or state-changing request that the browser marks as
  coming from elsewhere (403 ``FORBIDDEN_ORIGIN``), before the body is read.
* *DNS rebinding*: a name of the attacker's turns into 127.0.0.1, so the browser
  treats the loopback server as the attacker's own origin and reads the API. The
  ``Host`` header still carries the attacker's name, so a server bound to loopback
  answers only to its own names (400 ``INVALID_HOST``).

Deliberate departures from what a reader might expect:

* ``Sec-Fetch-Site: same-site`` is another port or subdomain of the same site (another
  local dev server, say), not this origin: it is judged by ``Origin`` like any other
  site, and refused when ``Origin`` is missing.
* A request without ``Host``, ``Origin`` and ``Sec-Fetch-Site`` is no browser's (curl,
  the Python client, Bruno) and passes: both attacks need a browser, and browsers
  always send ``Host``.
* ``CorsPolicy`` answers a refused CORS preflight with the JSON error body that every
  other refusal has, instead of Starlette's ``400 text/plain``.
"""

from __future__ import annotations

import ipaddress

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from chatstream.config import Settings
from chatstream.errors import ErrorCode
from chatstream.server.errors import error_response

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# Reads and preflights change nothing; the stream's GET starts a turn all the same.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_TURN_PATHS = frozenset({"/api/chat/stream"})
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def is_loopback(host: str) -> bool:
    """Whether a bind address only this machine can reach (127.x, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(host: str) -> str:
    """The name in a ``Host`` header, lower case, without its port (``[::1]`` keeps brackets)."""
    host = host.lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.partition(":")[0]


class OriginGuard:
    """Refuse hosts a loopback server does not answer to, and cross-site turns and changes."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.check_host = is_loopback(settings.host)
        # The bind address itself too: a server bound to 127.0.0.2 is reached by that name.
        allowed = (settings.host, *settings.http.allowed_hosts)
        names = {*LOOPBACK_NAMES, *(_bracketed(h.lower()) for h in allowed)}
        self.any_host = "*" in names
        self.host_names = frozenset(n for n in names if not n.startswith("*"))
        # As Starlette's TrustedHostMiddleware reads them: "*.example.com" matches subdomains.
        self.host_suffixes = tuple(n[1:] for n in names if n.startswith("*."))
        self.any_origin = "*" in settings.http.cors_origins
        self.origins = frozenset(_normalized(o) for o in settings.http.cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        if host is not None and self.check_host and not self._host_allowed(host):
            response = error_response(
                400,
                ErrorCode.INVALID_HOST,
                "This server, bound to loopback, answers to localhost, 127.0.0.1, [::1] and "
                "the host names in CHATSTREAM_ALLOWED_HOSTS only.",
            )
            await response(scope, receive, send)
            return
        guarded = scope["method"] not in _SAFE_METHODS or scope["path"] in _TURN_PATHS
        if guarded and self._cross_site(scope, headers, host):
            response = error_response(
                403,
                ErrorCode.FORBIDDEN_ORIGIN,
                "A page on another site may not start turns or change anything here; "
                "list its origin in CHATSTREAM_CORS_ORIGINS to allow it.",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _host_allowed(self, host: str) -> bool:
        name = _host_name(host)
        return self.any_host or name in self.host_names or name.endswith(self.host_suffixes)

    def _cross_site(self, scope: Scope, headers: Headers, host: str | None) -> bool:
        origin = headers.get("origin")
        if origin is None:
            # Only Sec-Fetch-Site tells an <img> or a GET form from another site.
            return headers.get("sec-fetch-site") in ("cross-site", "same-site")
        origin = _normalized(origin)
        if self.any_origin or origin in self.origins:
            return False
        # The server's own origin: what the page it served sends with its POSTs.
        return host is None or origin != _normalized(f"{scope.get('scheme', 'http')}://{host}")


class CorsPolicy(CORSMiddleware):
    """Starlette's CORS, with refused preflights answered by the JSON error body.

    An origin not allowed gets 403 ``FORBIDDEN_ORIGIN``, the answer ``OriginGuard`` gives
    the same origin's turns; an allowed origin asking for a method or header the API does
    not take gets 400 ``INVALID_REQUEST``: it is a malformed request, not a foreign site.
    """

    def preflight_response(self, request_headers: Headers) -> Response:
        """The preflight answer; a refusal says why in ``{"error": {"code", "message"}}``."""
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reasons = bytes(response.body).decode()  # "Disallowed CORS origin, method"
        if self.is_allowed_origin(request_headers["origin"]):
            refusal = error_response(400, ErrorCode.INVALID_REQUEST, f"{reasons} for this server.")
        else:
            refusal = error_response(
                403, ErrorCode.FORBIDDEN_ORIGIN, f"{reasons}: list it in CHATSTREAM_CORS_ORIGINS."
            )
        for name, value in response.headers.items():
            if name.startswith("access-control-") or name == "vary":
                refusal.headers[name] = value
        return refusal


def _bracketed(name: str) -> str:
    # An IPv6 literal appears in Host with brackets.
    return f"[{name}]" if ":" in name and not name.startswith("[") else name


def _normalized(origin: str) -> str:
    # Browsers send "http://host" for port 80; a Host header or a setting may say ":80".
    origin = origin.lower().rstrip("/")
    port = _DEFAULT_PORTS.get(origin.partition("://")[0])
    return origin.removesuffix(port) if port else origin
