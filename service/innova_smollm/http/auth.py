"""API keys: when SMOLLM_API_KEYS is set, every route but the health probes needs ``Authorization: Bearer <key>``.

The guard sits on the app layer, so it covers the native API, ``/v1``, ``/metrics`` and ``/schema``; a route opts
out only by carrying :data:`PUBLIC` in its ``opt``, which only the health routes do (load balancers, systemd and
the Ansible health check probe them without a key). ``/metrics`` and ``/schema`` need the key: they show traffic
volumes, model details and every limit, and Prometheus sends a bearer token with ``authorization.credentials_file``.

The refusal is an :class:`~innova_smollm.errors.AuthenticationError`, so each API layer answers 401 in its own
shape. The presented key is compared with every configured key in constant time, and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from innova_smollm.errors import AuthenticationError

#: ``opt`` of a route that answers without a key.
PUBLIC: dict[str, Any] = {"public": True}


def api_key_guard(keys: Sequence[str]) -> Guard:
    """A guard accepting any of ``keys``; keys are assumed non-empty (Settings rejects short ones)."""
    expected = tuple(key.encode() for key in keys)

    def require_api_key(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if handler.opt.get("public"):
            return
        presented = bearer_token(connection.headers.get("authorization"))
        if presented is None:
            raise AuthenticationError("this server needs an API key: send the header `Authorization: Bearer <key>`")
        if not key_matches(presented.encode(), expected):
            raise AuthenticationError("the API key in the Authorization header is not valid")

    return require_api_key


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def key_matches(presented: bytes, expected: Sequence[bytes]) -> bool:
    # Compare with every key, without stopping at a match, so the time taken says nothing about which key (if any)
    # is close; compare_digest itself takes the same time whatever the position of the first differing byte.
    matched = False
    for key in expected:
        matched |= hmac.compare_digest(presented, key)
    return matched
