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


def deactivate_labeler(storage: Storage, name: str) -> None:
    registry = _read(storage)
    if name not in registry:
        raise LabelerError(f"no labeler {name!r}")
    registry[name]["active"] = False
    storage.write_json(storage.path(LABELERS_KEY), registry)


def list_labelers(storage: Storage) -> list[Labeler]:
    return [Labeler(n, v["role"]) for n, v in sorted(_read(storage).items()) if v.get("active", True)]


class TokenIndex:
    """Token hash -> labeler, loaded once from storage (``reload()`` after the registry changes)."""

    def __init__(self, storage: Storage, reload_s: float = 0.5) -> None:
        self.storage = storage
        self.reload_s = reload_s
        self.reload()

    def reload(self) -> None:
        self._loaded = time.monotonic()
        self._by_hash = {
            v["token_sha256"]: Labeler(n, v["role"]) for n, v in _read(self.storage).items() if v.get("active", True)
        }

    def lookup(self, token: str | None) -> Labeler | None:
        """The labeler for ``token`` among those loaded (no storage access)."""
        return self._by_hash.get(token_hash(token)) if token else None

    def authenticate(self, token: str | None) -> Labeler | None:
        # A dict lookup by the hash of a 256-bit secret: timing reveals nothing usable about other tokens.
        who = self.lookup(token)
        if who is None and token and time.monotonic() - self._loaded > self.reload_s:
            self.reload()  # labelers created since the last look (by an admin command)
            who = self.lookup(token)
        return who
