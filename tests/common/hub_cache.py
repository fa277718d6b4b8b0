"""Lay a saved model folder out as the Hub's cache does, to test loading by repo id with no network."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_to_hub_cache(folder: Path, repo_id: str, cache_dir: Path, revision: str = "main") -> Path:
    """Copy ``folder`` into ``cache_dir`` as ``models--org--name/{refs,blobs,snapshots}``.

    Blobs are named by the SHA-256 of their content and snapshot files are relative symlinks to them, as
    ``huggingface_hub`` writes them. Returns the snapshot folder.
    """
    repo_folder = cache_dir / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # a stable fake commit hash
    (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
    (repo_folder / "refs" / revision).write_text(commit)
    snapshot = repo_folder / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo_folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot
