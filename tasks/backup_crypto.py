"""Encryption and signed manifests of backups.

An archive is encrypted with age (pyrage) to every recipient of the inventory's ``backups:``
section (public keys only: the controller that takes backups cannot read them), while it streams
from the counter: the plaintext never touches the controller's disk, and both the plaintext and
the ciphertext are hashed on the way. Each backup gets a manifest (canonical JSON: device, time,
archive, digests, row counts, the fingerprint's digest, app version, recipients) signed with the
Ed25519 ``signing_key``; a restore trusts a backup only when a key in ``signers`` signed its
manifest and everything it reads matches it, and checks the decrypted tar (bounded: member count,
total size, compression ratio, regular files and directories only, no absolute or '..' names)
before anything reaches a counter.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import pyrage
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from inventory.models import BackupSettings, canonical_json
from inventory.paths import check_private

MANIFEST_FORMAT = "counterops-backup/1"
MAX_MEMBERS = 10_000  # a counter's data directory holds a handful of files
MAX_UNPACKED_BYTES = 8 << 30  # whatever the ratio, more than this is refused
RATIO_FLOOR_BYTES = 64 << 20  # below this any compression ratio is accepted
MAX_RATIO = 200  # unpacked / compressed beyond this (and above the floor): a gzip bomb


class CryptoError(Exception):
    """A key cannot be used, a signature or digest does not match, or decryption failed; the message says which."""


# ----------------------------------------------------------------------------- keys


def _key_text(source: str, what: str) -> str:
    """The content of a key given as a path (0600 or tighter) or ``secret:NAME``."""
    if source.startswith("secret:"):
        from tasks.secrets import SecretError, resolve

        try:
            return resolve(source[len("secret:"):])
        except SecretError as e:
            raise CryptoError(f"backups.{what}: {e}") from None
    path = Path(source)
    try:
        check_private(path)
        return path.read_text(encoding="utf-8")
    except PermissionError as e:
        raise CryptoError(f"backups.{what}: {e}") from None
    except FileNotFoundError:
        raise CryptoError(f"backups.{what}: {path} does not exist (check backups.{what} in the inventory)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CryptoError(f"backups.{what}: {path} cannot be read: {e}") from None


def recipients(settings: BackupSettings) -> list[Any]:
    out = []
    for r in settings.recipients:
        try:
            out.append(pyrage.x25519.Recipient.from_str(r) if r.startswith("age1") else pyrage.ssh.Recipient.from_str(r))
        except Exception as e:
            raise CryptoError(f"backups.recipients: {r[:40]!r} is not a usable public key ({e})") from None
    return out


def recipient_fingerprint(recipient: str) -> str:
    """sha256 of the recipient's public key text (first 32 hex digits): names a key without repeating it."""
    return hashlib.sha256(recipient.encode()).hexdigest()[:32]


def identities(settings: BackupSettings) -> list[Any]:
    """The age identities of ``backups.identity``: ``AGE-SECRET-KEY-1…`` lines, or an OpenSSH ed25519 private key."""
    text = _key_text(settings.identity, "identity")
    try:
        if "BEGIN OPENSSH PRIVATE KEY" in text:
            return [pyrage.ssh.Identity.from_buffer(text.encode())]
        found = [pyrage.x25519.Identity.from_str(line.strip()) for line in text.splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
    except Exception as e:
        raise CryptoError(f"backups.identity: not an age identity or OpenSSH private key ({type(e).__name__})") from None
    if not found:
        raise CryptoError("backups.identity: holds no AGE-SECRET-KEY-1… line")
    return found


def signing_key(settings: BackupSettings) -> Ed25519PrivateKey:
    text = _key_text(settings.signing_key, "signing_key")
    try:
        key = serialization.load_ssh_private_key(text.encode(), password=None)
    except (ValueError, TypeError) as e:
        raise CryptoError(f"backups.signing_key: not an unencrypted OpenSSH private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CryptoError("backups.signing_key: must be an ed25519 key (ssh-keygen -t ed25519)")
    return key


def public_line(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _signer(line: str) -> Ed25519PublicKey:
    key = serialization.load_ssh_public_key(line.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise CryptoError(f"backups.signers: {line[:40]!r} is not an ed25519 key")
    return key


# ----------------------------------------------------------------------------- manifests


def fingerprint_digest(fingerprint: dict | None) -> str | None:
    return None if fingerprint is None else hashlib.sha256(canonical_json(fingerprint)).hexdigest()


def build_manifest(*, device_id: str, taken_at: str, archive: str, ciphertext_sha256: str, ciphertext_size: int,
                   plaintext_sha256: str, plaintext_size: int, row_counts: dict, fingerprint: dict | None,
                   app_version: str | None, settings: BackupSettings) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "device_id": device_id,
        "taken_at": taken_at,
        "archive": archive,
        "ciphertext": {"sha256": ciphertext_sha256, "size": ciphertext_size},
        "plaintext": {"sha256": plaintext_sha256, "size": plaintext_size},
        "row_counts": dict(sorted(row_counts.items())),
        "fingerprint_sha256": fingerprint_digest(fingerprint),
        "app_version": app_version,
        "recipients": sorted(recipient_fingerprint(r) for r in settings.recipients),
    }


def sign(manifest: dict, key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.sign(canonical_json(manifest))).decode()


def check_signature(manifest: dict, signature: str | None, signers: list[str]) -> str:
    """The signer's public key line when one of ``signers`` signed ``manifest``; CryptoError otherwise."""
    if not signature:
        raise CryptoError("the manifest is not signed")
    try:
        raw = base64.b64decode(signature, validate=True)
    except ValueError:
        raise CryptoError("the manifest's signature is not base64") from None
    data = canonical_json(manifest)
    for line in signers:
        try:
            _signer(line).verify(raw, data)
            return line
        except InvalidSignature:
            continue
    raise CryptoError("the manifest's signature is by none of backups.signers (forged, or changed after signing)")


def sidecar(manifest: dict, signature: str) -> bytes:
    """What is kept next to each copy as ``<archive>.manifest``: the manifest and its signature."""
    return canonical_json({"manifest": manifest, "signature": signature}) + b"\n"


# ----------------------------------------------------------------------------- streams


class HashingReader:
    """Reads from ``f``, hashing and counting what passes; ``progress`` is called with each chunk's size."""

    def __init__(self, f: BinaryIO, progress=None, limit: int | None = None):
        self._f, self.sha256, self.size, self._progress, self._limit = f, hashlib.sha256(), 0, progress, limit

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n if n is not None and n >= 0 else 1 << 20)
        self.sha256.update(data)
        self.size += len(data)
        if self._limit is not None and self.size > self._limit:
            raise CryptoError(f"more than {self._limit} bytes")
        if self._progress is not None:
            self._progress(self.size, 0)
        return data


class HashingWriter:
    def __init__(self, f: BinaryIO):
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def private_file(path: Path) -> BinaryIO:
    """A new file only its owner may read, from its first byte (O_EXCL: never an existing file)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def encrypt_stream(source: BinaryIO, dest: Path, settings: BackupSettings, progress=None) -> dict:
    """Encrypt ``source`` to every recipient into the new 0600 file ``dest`` (fsynced); the digests and sizes."""
    reader = HashingReader(source, progress)
    with private_file(dest) as f:
        writer = HashingWriter(f)
        try:
            pyrage.encrypt_io(reader, writer, recipients(settings))
        except pyrage.EncryptError as e:
            raise CryptoError(f"encryption failed: {e}") from None
        f.flush()
        os.fsync(f.fileno())
    return {"plaintext_sha256": reader.sha256.hexdigest(), "plaintext_size": reader.size,
            "ciphertext_sha256": writer.sha256.hexdigest(), "ciphertext_size": writer.size}


def decrypt_file(source: Path, dest: Path, idents: list[Any], max_bytes: int = MAX_UNPACKED_BYTES) -> str:
    """Decrypt (and authenticate) ``source`` into the new 0600 file ``dest``; the plaintext's sha256."""
    with open(source, "rb") as src, private_file(dest) as f:
        writer = HashingWriter(f)
        try:
            pyrage.decrypt_io(src, writer, idents)
        except pyrage.DecryptError as e:
            raise CryptoError(f"decryption failed: not encrypted to this identity, or damaged ({e})") from None
        if writer.size > max_bytes:
            raise CryptoError(f"decrypts to more than {max_bytes} bytes")
    return writer.sha256.hexdigest()


# ----------------------------------------------------------------------------- the tar inside


def check_tar(path: Path) -> dict:
    """A bounded look at a backup's tar.gz before it is unpacked anywhere: at most MAX_MEMBERS entries,
    regular files and directories only, relative names without '..', and a total size within
    MAX_UNPACKED_BYTES and MAX_RATIO times the archive (a gzip bomb is refused before a byte of it is
    written). Returns members and total bytes; CryptoError says what is wrong."""
    compressed = path.stat().st_size
    limit = min(MAX_UNPACKED_BYTES, max(RATIO_FLOOR_BYTES, compressed * MAX_RATIO))
    members = total = 0
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar:
                members += 1
                if members > MAX_MEMBERS:
                    raise CryptoError(f"the archive holds more than {MAX_MEMBERS} entries")
                name = PurePosixPath(m.name)
                if name.is_absolute() or ".." in name.parts:
                    raise CryptoError(f"the archive holds an unsafe name {m.name!r}")
                if not (m.isreg() or m.isdir()):
                    raise CryptoError(f"the archive holds {m.name!r}, neither a regular file nor a directory")
                total += m.size
                if total > limit:
                    raise CryptoError(f"the archive unpacks to more than {limit} bytes from {compressed} "
                                      "(a decompression bomb, or not a counter's data)")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CryptoError(f"the archive is not a readable tar.gz ({e})") from None
    return {"members": members, "bytes": total}
