"""Gateway API keys: their format, generation and the digest under which they are stored.

A key is 32 random bytes, so a plain SHA-256 digest is enough (no slow hash needed to resist guessing),
and it lets ext_authz look a key up in one indexed read. The format check runs before any lookup, so
malformed credentials never reach the database.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

PREFIX = "sk-gw-"
_KEY_RE = re.compile(r"sk-gw-[A-Za-z0-9_-]{43}")


def generate() -> str:
    return PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def digest(key: str) -> bytes | None:
    """The stored digest of a well-formed key, or None for anything that is not one of our keys."""
    if _KEY_RE.fullmatch(key) is None:
        return None
    return hashlib.sha256(key.encode()).digest()


def hint(key: str) -> str:
    """What may be shown after creation: enough to recognise a key, never enough to use it."""
    return f"{PREFIX}...{key[-4:]}"


def bearer_token(authorization: str) -> str | None:
    """The token of a single `Bearer` credential; None when the header is absent, repeated or malformed."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token or " " in token or "," in token:
        return None
    return token
