"""core.sealing: values sealed under the master key open under it, for what they were sealed
for, and nothing else opens (a clear error, never garbage); the key file is made once, 0600."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from core.sealing import KEY_FILE, SealError, SealingKey, master_key, parse_key


def test_round_trip() -> None:
    key = SealingKey.generate()
    sealed = key.seal(b"the value", "dtls-psk:c1")
    assert b"the value" not in sealed
    assert key.open(sealed, "dtls-psk:c1") == b"the value"
    assert key.seal(b"the value", "dtls-psk:c1") != sealed  # a fresh nonce each time


def test_another_master_key_is_refused() -> None:
    sealed = SealingKey.generate().seal(b"the value", "dtls-psk:c1")
    other = SealingKey.generate()
    with pytest.raises(SealError, match="sealed under another master key"):
        other.open(sealed, "dtls-psk:c1")


def test_another_context_is_refused() -> None:
    key = SealingKey.generate()
    sealed = key.seal(b"the value", "dtls-psk:c1")
    with pytest.raises(SealError, match="altered, or was sealed for something else"):
        key.open(sealed, "dtls-psk:c2")


@pytest.mark.parametrize("damage", ["flip", "truncate", "version"])
def test_altered_values_are_refused(damage: str) -> None:
    key = SealingKey.generate()
    sealed = bytearray(key.seal(b"the value", "x"))
    if damage == "flip":
        sealed[-1] ^= 1
    elif damage == "truncate":
        del sealed[20:]
    else:
        sealed[0] = 9
    with pytest.raises(SealError):
        key.open(bytes(sealed), "x")


def test_key_file_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = master_key(data, None)
    path = data / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = master_key(data, None)
    assert again.key_id == first.key_id
    assert again.open(first.seal(b"v", "c"), "c") == b"v"


def test_configured_key(tmp_path: Path) -> None:
    text = "ab" * 32
    assert master_key(tmp_path, text).key_id == parse_key(text, "x").key_id
    assert not (tmp_path / KEY_FILE).exists()  # nothing written when it is configured
    for bad in ("", "ab" * 31, "zz" * 32):
        with pytest.raises(SealError, match="must be 64 hex digits"):
            master_key(tmp_path, bad)
