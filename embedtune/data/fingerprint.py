"""The fingerprint of a run's training data: name, size and sha256 of every file, and one sha256 over
all of them (the model card shows it; ``embedtune export`` takes it from a checkpoint)."""

from __future__ import annotations

import hashlib
from typing import IO, Any

from embedtune.data.records import PACKAGE_PREFIX, resolve_files
from embedtune.secrets import scrub_text

CHUNK = 1 << 20  # bytes read at a time when hashing: data files can be larger than memory


def _hash_stream(stream: IO[bytes]) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _hash_file(path: str) -> tuple[int | None, str | None, str | None]:
    """(size, sha256, why not) of a local file or a URL (read through fsspec, as training did)."""
    if "://" not in path:
        with open(path, "rb") as f:
            size, sha = _hash_stream(f)
        return size, sha, None
    try:
        import fsspec

        with fsspec.open(path, "rb") as f:
            size, sha = _hash_stream(f)
        return size, sha, None
    except Exception as exc:  # any filesystem's own error: the card is still written
        return None, None, f"not hashed: {type(exc).__name__}"


def data_fingerprint(files: list[str]) -> dict[str, Any]:
    """Name, size and sha256 of every training file, and one sha256 over all of them.

    ``files`` are the config's ``data.train_files``: globs are expanded and ``embedtune:`` paths
    resolved as for training. The combined hash covers the files' bytes in order (not their
    paths), so the same data moved elsewhere keeps its fingerprint and any changed, added or
    removed byte changes it. It is None when a remote file could not be read.
    """
    entries: list[dict[str, Any]] = []
    for pattern in files:
        for path in resolve_files([pattern]):
            size, sha, note = _hash_file(path)
            entry: dict[str, Any] = {"name": pattern if pattern.startswith(PACKAGE_PREFIX) else scrub_text(path),
                                     "size": size, "sha256": sha}
            if note:
                entry["note"] = note
            entries.append(entry)
    return fingerprint_of(entries)


def fingerprint_of(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The fingerprint of files (name, size, sha256 each, in order): the combined sha256 covers
    their sizes and hashes, and is None when one has no hash."""
    combined: str | None = None
    if all(e["sha256"] for e in entries):
        digest = hashlib.sha256()
        for e in entries:
            digest.update(f"{e['size']} {e['sha256']}\n".encode())
        combined = digest.hexdigest()
    return {"files": entries, "num_files": len(entries),
            "size": sum(e["size"] or 0 for e in entries), "sha256": combined}
