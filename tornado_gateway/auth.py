"""Who may use the API: a bearer token, decided once at start-up, checked on every request.

The rule, as Jupyter's server has it:

* ``GATEWAY_TOKEN`` (or the first line of ``GATEWAY_TOKEN_FILE``) set: every ``/api/``
  request but the status endpoint must carry ``Authorization: Bearer <token>``;
* no token, gateway bound to a loopback address: open (the laptop case: only this machine's
  users can reach it);
* no token, gateway bound to any other address: a token is generated, and the URL that carries
  it is printed once (``http://host:port/?token=...``: the web page takes it from there, keeps it
  for the browser tab's session and removes it from the address bar);
* ``GATEWAY_AUTH=none``: open on any address, for deployments that authenticate in front of the
  gateway; a warning says so at every start.

Tokens are compared in constant time and never logged: request lines in logs have their
``token`` query parameter masked (:func:`redact`).
"""
from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from . import errors
from .errors import GatewayError

if TYPE_CHECKING:
    from .config import GatewayConfig

#: GATEWAY_AUTH values.
AUTO, TOKEN, NONE = "auto", "token", "none"
MODES = (AUTO, TOKEN, NONE)

#: Shorter explicit tokens are accepted with a warning: guessable ones are the user's call.
MIN_STRONG_LENGTH = 16

_TOKEN_PARAM = re.compile(r"([?&]token=)[^&#]*", re.IGNORECASE)


class TokenFileError(Exception):
    """``GATEWAY_TOKEN_FILE`` cannot be read or holds no token: the gateway refuses to start
    rather than start open."""


@dataclass(frozen=True)
class Access:
    """The start-up decision: the token requests must carry (None: the API is open), and why."""

    token: Optional[str]
    source: str  # "GATEWAY_TOKEN", "GATEWAY_TOKEN_FILE (path)", "generated", "loopback", "GATEWAY_AUTH=none"

    @property
    def generated(self) -> bool:
        return self.source == "generated"

    def allows(self, authorization: Optional[str]) -> bool:
        """True when the API is open or ``authorization`` is ``Bearer <the token>``
        (the scheme case-insensitive, compared in constant time)."""
        if self.token is None:
            return True
        if not authorization:
            return False
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode("utf-8"),
                                   self.token.encode("utf-8"))

    def check(self, authorization: Optional[str]) -> Optional[GatewayError]:
        """The 401 to answer for a request with this ``Authorization`` header, or None."""
        if self.allows(authorization):
            return None
        return errors.unauthorized(bool(authorization))


OPEN = Access(None, "loopback")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (``127.0.0.0/8``, ``::1``,
    ``localhost``); False for wildcards (``0.0.0.0``, ``::``, empty) and everything else."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def read_token_file(path: str) -> str:
    """The token in ``path``: its first non-empty line, stripped."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    return line.strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError("GATEWAY_TOKEN_FILE=%r cannot be read (%s)." % (path, exc)) from exc
    raise TokenFileError("GATEWAY_TOKEN_FILE=%r holds no token (it is empty)." % path)


def resolve_access(mode: str, host: str, token: Optional[str] = None,
                   token_file: Optional[str] = None,
                   make_token: Callable[[], str] = lambda: secrets.token_urlsafe(32)) -> Access:
    """Decide at start-up who may use the API (the rule in the module docstring).

    ``mode`` is ``GATEWAY_AUTH``: ``auto`` (the rule), ``token`` (a token even on loopback,
    generated when none is given) or ``none``. Raises :class:`TokenFileError` for an unreadable
    or empty token file.
    """
    if mode == NONE:
        return Access(None, "GATEWAY_AUTH=none")
    if token:
        return Access(token, "GATEWAY_TOKEN")
    if token_file:
        return Access(read_token_file(token_file), "GATEWAY_TOKEN_FILE (%s)" % token_file)
    if mode == TOKEN or not is_loopback(host):
        return Access(make_token(), "generated")
    return OPEN


def access_for(config: "GatewayConfig",
               make_token: Callable[[], str] = lambda: secrets.token_urlsafe(32)) -> Access:
    """:func:`resolve_access` for a :class:`~tornado_gateway.config.GatewayConfig`."""
    return resolve_access(config.auth, config.host, config.token, config.token_file,
                          make_token)


def redact(uri: str) -> str:
    """``uri`` with the value of any ``token`` query parameter masked, for logs."""
    return _TOKEN_PARAM.sub(r"\1[redacted]", uri)
