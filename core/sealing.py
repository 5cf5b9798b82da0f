"""Encryption at rest of the secrets Conduit must be able to read back (a client's DTLS key;
later the signing keys of its tokens), under one master key.

A :class:`SealingKey` seals a value with AES-256-GCM (``cryptography``'s ``AESGCM``), the
associated data binding it to what it is for (``context``: the purpose and the owner, such as
``dtls-psk:<client id>``): a sealed value copied onto another client's row, or opened for
another purpose, does not open. A sealed value is ``version (1 byte) | key id (4 bytes) |
nonce (12 bytes) | ciphertext and tag``; the key id (a digest of the master key, not the key)
tells "sealed under another master key" apart from "altered or not for this", and opening never
returns garbage: it returns the value or raises :class:`SealError`.

The master key is 32 bytes, written as 64 hex digits: the ``encryption_key`` setting
(``CONDUIT_ENCRYPTION_KEY``), or else the file ``<data_dir>/encryption.key``, made once with
mode 0600 (:func:`master_key`). Losing it loses every sealed value; changing it makes them
unreadable (the error says so).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_FILE: Final = "encryption.key"  # in the data directory, mode 0600
KEY_BYTES: Final = 32
_VERSION: Final = b"\x01"
_NONCE: Final = 12
_KEY_ID: Final = 4
_HEADER: Final = len(_VERSION) + _KEY_ID + _NONCE


class SealError(Exception):
    """A sealed value that cannot be opened, or a master key that cannot be used; the message
    says which and why."""


class SealingKey:
    """The master key, and sealing and opening under it."""

    __slots__ = ("_aead", "key_id")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SealError(f"the master key has {len(key)} bytes; it must have {KEY_BYTES}")
        self._aead = AESGCM(key)
        self.key_id = hashlib.sha256(b"conduit sealing key id\x00" + key).digest()[:_KEY_ID]

    @classmethod
    def generate(cls) -> SealingKey:
        """A key of fresh random bytes (tests; a deployment keeps its key in a file)."""
        return cls(secrets.token_bytes(KEY_BYTES))

    def seal(self, value: bytes, context: str) -> bytes:
        """``value`` encrypted and authenticated, bound to ``context``."""
        nonce = secrets.token_bytes(_NONCE)
        sealed = self._aead.encrypt(nonce, value, context.encode())
        return _VERSION + self.key_id + nonce + sealed

    def open(self, sealed: bytes, context: str) -> bytes:
        """The value sealed under this key for ``context``; :class:`SealError` otherwise."""
        if len(sealed) < _HEADER + 16 or sealed[:1] != _VERSION:
            raise SealError(f"{context}: not a sealed value of a version this Conduit reads")
        if sealed[1 : 1 + _KEY_ID] != self.key_id:
            raise SealError(
                f"{context}: sealed under another master key (key id"
                f" {sealed[1 : 1 + _KEY_ID].hex()}, this one is {self.key_id.hex()}): was"
                " encryption_key or <data_dir>/encryption.key changed?"
            )
        nonce = sealed[1 + _KEY_ID : _HEADER]
        try:
            return self._aead.decrypt(nonce, sealed[_HEADER:], context.encode())
        except InvalidTag:
            raise SealError(
                f"{context}: the sealed value was altered, or was sealed for something else"
            ) from None


def parse_key(text: str, source: str) -> SealingKey:
    """A master key written as 64 hex digits (surrounding white space ignored)."""
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise SealError(
            f"the encryption key from {source} must be {2 * KEY_BYTES} hex digits"
            f" ({KEY_BYTES} bytes; make one with: openssl rand -hex {KEY_BYTES})"
        )
    return SealingKey(key)


def master_key(data_dir: Path, configured: str | None) -> SealingKey:
    """The master key: the configured one, or the one kept in ``<data_dir>/encryption.key``,
    made once (mode 0600, never overwritten). Raises :class:`SealError` for a key that is
    not 64 hex digits, which must not start a server."""
    if configured is not None:
        return parse_key(configured, "the encryption_key setting (CONDUIT_ENCRYPTION_KEY)")
    path = data_dir / KEY_FILE
    if path.exists():
        return parse_key(path.read_text(), str(path))
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return SealingKey(key)
