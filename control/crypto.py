"""AES-256-GCM sealing of stored RunPod keys under a versioned master keyring.

The workspace id is bound as associated data, so a ciphertext copied into another workspace's row fails
to open. Every ciphertext records the master-key version that sealed it; rotation adds a new version,
re-seals every row, and only then may old versions be dropped. Nothing here ever puts key material or
plaintext into an exception message or a repr.
"""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_NONCE_BYTES = 12
_KEY_BYTES = 32


class CryptoError(Exception):
    """Raised with a message that is safe to show: it never contains key material."""


@dataclass(frozen=True)
class Sealed:
    key_version: int
    nonce: bytes
    ciphertext: bytes


RUNPOD_CREDENTIAL = "runpod-credential"
HF_TOKEN = "hf-token"


def _associated_data(workspace_id: str, purpose: str) -> bytes:
    # The purpose is bound too, so one workspace's sealed RunPod key cannot be passed off as its
    # Hugging Face token or the other way round.
    return f"gateway/{purpose}/v1/".encode() + workspace_id.encode()


class Keyring:
    """Master keys by version; the highest version seals, every version opens."""

    def __init__(self, keys: dict[int, bytes]) -> None:
        if not keys:
            raise CryptoError("the master keyring is empty")
        for version, key in keys.items():
            if version < 1 or len(key) != _KEY_BYTES:
                raise CryptoError(f"master key version {version} is not a 256-bit key")
        self._keys = dict(keys)

    def __repr__(self) -> str:
        return f"Keyring(versions={sorted(self._keys)})"

    @property
    def current_version(self) -> int:
        return max(self._keys)

    @property
    def versions(self) -> list[int]:
        return sorted(self._keys)

    def seal(self, plaintext: str, workspace_id: str, purpose: str = RUNPOD_CREDENTIAL) -> Sealed:
        version = self.current_version
        nonce = secrets.token_bytes(_NONCE_BYTES)
        ciphertext = AESGCM(self._keys[version]).encrypt(
            nonce, plaintext.encode(), _associated_data(workspace_id, purpose)
        )
        return Sealed(version, nonce, ciphertext)

    def open(self, sealed: Sealed, workspace_id: str, purpose: str = RUNPOD_CREDENTIAL) -> str:
        key = self._keys.get(sealed.key_version)
        if key is None:
            raise CryptoError(f"master key version {sealed.key_version} is not in the keyring")
        try:
            plaintext = AESGCM(key).decrypt(sealed.nonce, sealed.ciphertext, _associated_data(workspace_id, purpose))
        except InvalidTag:
            raise CryptoError("stored credential does not belong to this workspace or was altered") from None
        return plaintext.decode()

    def with_new_version(self) -> Keyring:
        return Keyring({**self._keys, self.current_version + 1: secrets.token_bytes(_KEY_BYTES)})

    def without_versions_below(self, version: int) -> Keyring:
        return Keyring({v: k for v, k in self._keys.items() if v >= version})

    # Serialized form: one `version:base64url(key)` per line, so an operator can see versions and a
    # compose secret can hold the same text.
    def dumps(self) -> str:
        return "".join(
            f"{v}:{base64.urlsafe_b64encode(k).decode()}\n" for v, k in sorted(self._keys.items())
        )

    @classmethod
    def loads(cls, text: str) -> Keyring:
        keys: dict[int, bytes] = {}
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            version, sep, encoded = line.partition(":")
            try:
                if not sep:
                    raise ValueError
                keys[int(version)] = base64.urlsafe_b64decode(encoded)
            except ValueError:
                raise CryptoError(f"master keyring line {lineno} is not `version:base64key`") from None
        return cls(keys)


def load_keyring(inline: str | None, path: Path, create: bool) -> Keyring:
    """The keyring from the inline setting if given, else from `path`, generating it there if allowed."""
    if inline:
        return Keyring.loads(inline)
    if path.exists():
        return Keyring.loads(path.read_text(encoding="utf-8"))
    if not create:
        raise CryptoError(f"no master key: set GATEWAY_MASTER_KEY or create {path}")
    keyring = Keyring({1: secrets.token_bytes(_KEY_BYTES)})
    save_keyring(keyring, path)
    return keyring


def save_keyring(keyring: Keyring, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(keyring.dumps())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
