"""The harness's own caches (dense baselines, sensitivity tables): never trusted when damaged.

An entry that fails its check (a checksum, or loading it) is renamed aside, with a warning,
and rebuilt; it is never deleted (it may be the only copy of hours of training) and never used.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def set_aside(path: Path, reason: str) -> Path:
    """Rename a damaged cache file to ``<name>.damaged-<time>`` beside it, and warn."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    path.replace(aside)
    log.warning("cache file %s is damaged (%s): set aside as %s and rebuilt", path, reason, aside.name)
    return aside


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
