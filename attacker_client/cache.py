"""On-disk response cache: the same image is never sent, nor paid for, twice.

One sqlite3 database (stdlib); one row per image, keyed by the sha256 of (server URL, model, output
mode including ``top_k``, the image's dtype, shape and bytes). The value holds that image's row of
every output tensor of the response (``np.savez`` bytes), so a top-k entry keeps its indices and
probabilities together.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
from pathlib import Path

import numpy as np


def entry_key(base_url: str, model: str, mode: str, image: np.ndarray) -> str:
    """Hex sha256 of (server, model, output mode, image dtype + shape + bytes)."""
    digest = hashlib.sha256()
    for part in (base_url.rstrip("/"), model, mode, str(image.dtype), str(image.shape)):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


class ResponseCache:
    """A sqlite3-backed map of entry key -> {output name: array row}."""

    def __init__(self, path: str | Path) -> None:
        """Open (or create) the cache database at ``path``; a folder gets ``responses.sqlite3`` inside."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / "responses.sqlite3"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        self._db.commit()

    def get_many(self, keys: list[str]) -> dict[str, dict[str, np.ndarray]]:
        """The cached entries among ``keys`` (missing ones are absent from the result)."""
        found: dict[str, dict[str, np.ndarray]] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, value FROM responses WHERE key IN ({marks})", chunk)
            for key, value in rows:
                with np.load(io.BytesIO(value), allow_pickle=False) as data:
                    found[key] = {name: data[name] for name in data.files}
        return found

    def put_many(self, entries: dict[str, dict[str, np.ndarray]]) -> None:
        """Store entries (overwriting equal keys) in one transaction."""
        rows = []
        for key, outputs in entries.items():
            buffer = io.BytesIO()
            np.savez(buffer, **outputs)  # type: ignore[arg-type]  # numpy's stubs type **kwds as bool
            rows.append((key, buffer.getvalue()))
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO responses (key, value) VALUES (?, ?)", rows)

    def __len__(self) -> int:
        """Number of cached images."""
        return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        self._db.close()
