"""An optional payload codec: AES-256-GCM over every payload, so workflow histories hold no
plaintext inputs or results (names, commands, environments, status messages).

Enabled by `WARMSTART_TEMPORAL__CODEC_KEY_FILE` (32 raw bytes, or 64 hex digits); every
client and worker of a deployment must use the same key. The Web UI then shows ciphertext
unless it is pointed at a codec server that holds the key (not provided here).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from api.errors import InvalidSpecError

ENCODING = b"binary/encrypted"
_KEY_ID = "encryption-key-id"
_NONCE_BYTES = 12


def load_key(path: str) -> bytes:
    """The 32-byte key in `path`: raw, or as 64 hex digits (whitespace ignored)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise InvalidSpecError(f"codec key file {path}: {err.strerror}") from err
    text = raw.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode())
        except (UnicodeDecodeError, ValueError):
            pass
    if len(raw) == 32:
        return raw
    raise InvalidSpecError(f"codec key file {path}: expected 32 bytes or 64 hex digits")


class EncryptionCodec(PayloadCodec):
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        # Names the key without revealing it, so a payload sealed with another key says so.
        self._key_id = hashlib.sha256(key).hexdigest()[:16].encode()

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._seal(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._open(p) for p in payloads]

    def _seal(self, payload: Payload) -> Payload:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, payload.SerializeToString(), None)
        metadata = {"encoding": ENCODING, _KEY_ID: self._key_id}
        return Payload(metadata=metadata, data=nonce + sealed)

    def _open(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # written without the codec (older runs): left as it is
        key_id = payload.metadata.get(_KEY_ID, b"").decode()
        if key_id != self._key_id.decode():
            raise InvalidSpecError(
                f"payload sealed with key {key_id}, this key is {self._key_id.decode()}"
            )
        try:
            plain = self._aead.decrypt(
                payload.data[:_NONCE_BYTES], payload.data[_NONCE_BYTES:], None
            )
        except InvalidTag as err:
            raise InvalidSpecError(
                "payload failed authentication: altered, or another key"
            ) from err
        return Payload.FromString(plain)
