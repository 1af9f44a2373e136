"""Labelers and their access tokens.

``labelers/labelers.json`` under the storage root maps each labeler's name to the SHA-256 of its
token (tokens are 256-bit random strings, so an unsalted hash is enough; they are never stored in
clear and are shown once, when created), its role (``labeler`` or ``admin``) and whether it is active.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from .storage import LABELERS_KEY, Storage

ROLES = ("labeler", "admin")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class LabelerError(ValueError):
    """Bad labeler name or role."""


@dataclass(frozen=True)
class Labeler:
    name: str
    role: str = "labeler"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _read(storage: Storage) -> dict[str, dict]:
    path = storage.path(LABELERS_KEY)
    return storage.read_json(path) if storage.exists(path) else {}


def create_labeler(storage: Storage, name: str, *, role: str = "labeler", replace: bool = False) -> str:
    """Create a labeler (or a new token for it with ``replace``) and return its token, once."""
    if not _NAME_RE.match(name or ""):
        raise LabelerError(f"labeler name {name!r} is invalid: use 1-64 letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise LabelerError(f"role {role!r} is unknown: use one of {ROLES}")
    registry = _read(storage)
    if name in registry and not replace:
        raise LabelerError(f"labeler {name!r} exists; pass --replace to issue a new token (the old one stops working)")
    token = secrets.token_urlsafe(32)
    registry[name] = {"token_sha256": token_hash(token), "role": role, "active": True, "created_at": time.time()}
    storage.write_json(storage.path(LABELERS_KEY), registry)
    return token


def remove_labeler(storage: Storage, name: str) -> None:
    """Remove ``name`` and its token: a running service refuses the token within ``TokenIndex.reload_s``
    (its answers so far stay stored, under its name)."""
    registry = _read(storage)
    if name not in registry:
        known = ", ".join(sorted(registry)) or "none"
        raise LabelerError(f"no labeler {name!r} (labelers: {known}); `lsun-hitl labelers list` names them")
    del registry[name]
    storage.write_json(storage.path(LABELERS_KEY), registry)


def list_labelers(storage: Storage) -> list[Labeler]:
    return [Labeler(n, v["role"]) for n, v in sorted(_read(storage).items()) if v.get("active", True)]


class TokenIndex:
    """Token hash -> labeler, read again from storage when older than ``reload_s`` seconds, so labelers added,
    removed or given a new token (the old one revoked) take effect in a running service within that time."""

    def __init__(self, storage: Storage, reload_s: float = 1.0) -> None:
        self.storage = storage
        self.reload_s = reload_s
        self.reload()

    def reload(self) -> None:
        self._loaded = time.monotonic()
        self._by_hash = {
            v["token_sha256"]: Labeler(n, v["role"]) for n, v in _read(self.storage).items() if v.get("active", True)
        }

    def stale(self) -> bool:
        """Whether the registry was read more than ``reload_s`` seconds ago (``authenticate`` reads it again)."""
        return time.monotonic() - self._loaded > self.reload_s

    def lookup(self, token: str | None) -> Labeler | None:
        """The labeler for ``token`` among those loaded (no storage access)."""
        return self._by_hash.get(token_hash(token)) if token else None

    def authenticate(self, token: str | None) -> Labeler | None:
        # A dict lookup by the hash of a 256-bit secret: timing reveals nothing usable about other tokens.
        if token and self.stale():
            self.reload()  # the registry as an admin command left it: new labelers in, revoked tokens out
        return self.lookup(token)
