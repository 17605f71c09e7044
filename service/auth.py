"""Bearer-token access control.

Tokens come from configuration and are kept only as sha256 hashes. A request's owner is the first 12 hex digits
of its token's hash: stable across restarts, stored with each job and policy, and useless for recovering the
token. With no tokens configured auth is off and the owner is None (every record is visible).
"""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import ApiError
from service.settings import hash_token

OWNER_HEX = 12


def owner_of(token_hash: str) -> str:
    return token_hash[:OWNER_HEX]


def current_owner(request: Request) -> str | None:
    """FastAPI dependency: the caller's owner id, None when auth is off; 401 JSON for a missing or unknown token."""
    hashes: frozenset[str] = request.app.state.settings.token_hashes
    if not hashes:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'", headers=challenge)
    presented = hash_token(token.strip())
    # Constant-time comparison against every configured hash, so timing does not reveal a near match.
    if not any(hmac.compare_digest(presented, known) for known in hashes):
        raise ApiError(401, "invalid bearer token", headers=challenge)
    return owner_of(presented)
