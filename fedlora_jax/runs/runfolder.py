"""A run folder's own bookkeeping: the manifest of what this tool wrote there, and the one reader of
the folder's files.

The manifest (`fedlora_manifest.json`) lists every file and folder a run wrote, by path relative to
the run folder and (files) size. `--overwrite` deletes exactly what it lists and refuses, deleting
nothing, when the folder holds anything else or a listed file changed size; a folder without a
manifest is never taken for a run. Each write of the run is wrapped in `writing(out, *paths)`: it
notes the paths as pending first (a kill in the middle leaves files newer than that mark, which are
the tool's), then records what changed under them. orbax writes its checkpoint folders itself; the
checkpoints/ tree is recorded the same way around each save.

Every read of a run folder's file goes through reading.py (`read_json`, `read_rows`,
`check_config_file`, `damaged`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .reading import damaged, read_json  # noqa: F401  (read_json: the manifest's reader)

MANIFEST = "fedlora_manifest.json"
_TOOL = "fedlora_jax"
# a file under a pending path counts as the tool's if it changed after the mark minus this slack
# (file system clocks are coarser than time.time_ns)
_SLACK_NS = 2_000_000_000
# what the top-level outputs of the end of a run are (artifacts, reporting, the model card)
FINAL_OUTPUTS = ("adapter", "merged_model", "base_model", "summary.json", "metrics.png", "metrics.jsonl")
FINAL_OUTPUTS += ("metrics.jsonl.tmp", "metrics.csv", "metrics.csv.tmp")

log = logging.getLogger("fedlora_jax")

# ----------------------------------------------------------------------------- the manifest

MANIFEST_TODO = (
    "the tool cannot tell its files from yours there, so it deletes and resumes nothing; move your files "
    "out and delete the folder yourself, or choose another --out"
)


def _stat(p: Path) -> tuple[bool, int, int]:
    st = p.lstat()
    is_dir = p.is_dir() and not p.is_symlink()
    return is_dir, 0 if is_dir else st.st_size, st.st_mtime_ns


def _walk(root: Path, rel: str) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of `rel` and everything under it (symbolic links are not followed)."""
    top = root / rel
    if not (top.exists() or top.is_symlink()):
        return
    yield rel, top
    if top.is_dir() and not top.is_symlink():
        for dirpath, dirnames, filenames in os.walk(top):
            for name in sorted(dirnames + filenames):
                p = Path(dirpath) / name
                yield p.relative_to(root).as_posix(), p


class Manifest:
    """What this tool wrote in a run folder: {relative path: {"size": bytes} | {"dir": true}}, and
    the paths being written now (pending: {path: mark in ns})."""

    def __init__(self, root: Path, entries: dict | None = None, pending: dict | None = None):
        self.root = Path(root)
        self.entries: dict[str, dict] = entries or {}
        self.pending: dict[str, int] = pending or {}

    @property
    def path(self) -> Path:
        return self.root / MANIFEST

    @classmethod
    def create(cls, root: Path, *rels: str) -> Manifest:
        m = cls(root)
        m.record(*rels)
        return m

    @classmethod
    def load(cls, root: str | os.PathLike) -> Manifest:
        root = Path(root)
        data = read_json(root / MANIFEST, dict, MANIFEST_TODO)
        entries, pending = data.get("entries"), data.get("pending", {})
        ok = data.get("tool") == _TOOL and isinstance(entries, dict) and isinstance(pending, dict)
        ok = ok and all(isinstance(v, dict) for v in entries.values())
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in pending.values())
        if not ok:
            raise damaged(root / MANIFEST, "not a manifest of this tool (tool, entries, pending)", MANIFEST_TODO)
        return cls(root, entries, pending)

    def save(self) -> None:
        data = {"tool": _TOOL, "entries": dict(sorted(self.entries.items())), "pending": self.pending}
        tmp = self.path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(data, indent=0))
        os.replace(tmp, self.path)

    def _snapshot(self, rels) -> dict[str, tuple[bool, int, int]]:
        return {r: _stat(p) for rel in rels for r, p in _walk(self.root, rel)}

    def record(self, *rels: str, before: dict | None = None) -> None:
        """Record `rels` and what is under them as the tool's: everything new or changed since the
        snapshot `before` (None: everything), plus what the manifest listed already. Listed paths
        under `rels` that are gone are dropped; the pending marks of `rels` are cleared."""
        for rel in rels:
            gone = [k for k in self.entries if k == rel or k.startswith(rel + "/")]
            for k in gone:
                del self.entries[k]
            for r, p in _walk(self.root, rel):
                st = _stat(p)
                if before is None or before.get(r) != st or r in set(gone):
                    self.entries[r] = {"dir": True} if st[0] else {"size": st[1]}
            self.pending.pop(rel, None)
        self.save()

    def begin(self, *rels: str) -> None:
        """Mark `rels` as being written: a kill before `record` leaves files the manifest does not
        list yet, but newer than this mark."""
        mark = time.time_ns() - _SLACK_NS
        for rel in rels:
            self.pending[rel] = min(self.pending.get(rel, mark), mark)
        self.save()

    def _pending_mark(self, rel: str) -> int | None:
        for p, mark in self.pending.items():
            if rel == p or rel.startswith(p + "/"):
                return mark
        return None

    def problems(self) -> list[str]:
        """What in the folder this tool did not write (or changed since), as 'path (why)'."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in sorted(dirnames + filenames):
                p = Path(dirpath) / name
                rel = p.relative_to(self.root).as_posix()
                if rel in (MANIFEST, MANIFEST + ".tmp"):
                    continue
                is_dir, size, mtime = _stat(p)
                entry = self.entries.get(rel)
                mark = self._pending_mark(rel)
                if mark is not None and (mtime >= mark or entry is not None):
                    continue  # written by a write of the tool that did not finish
                if entry is None:
                    out.append(f"{rel!r}, which this tool did not write")
                elif is_dir != bool(entry.get("dir")):
                    out.append(f"{rel!r}, which is not the {'folder' if entry.get('dir') else 'file'} this tool wrote")
                elif not is_dir and entry.get("size") != size:
                    out.append(
                        f"{rel!r}, which changed since this tool wrote it ({size} bytes, not {entry.get('size')})"
                    )
        return out

    def delete(self) -> list[str]:
        """Delete what the manifest lists (files of the listed size; folders once empty), then the
        manifest. Returns what was left (nothing unless the folder changed after problems())."""
        left = []
        for dirpath, dirnames, filenames in os.walk(self.root, topdown=False):
            for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
                p = Path(dirpath) / name
                rel = p.relative_to(self.root).as_posix()
                if rel in (MANIFEST, MANIFEST + ".tmp"):
                    continue
                entry, mark = self.entries.get(rel), self._pending_mark(rel)
                _, size, mtime = _stat(p)
                if (entry is not None and entry.get("size") == size) or (mark is not None and mtime >= mark):
                    p.unlink()
                else:
                    left.append(rel)
            for name in dirnames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    continue
                try:
                    p.rmdir()
                except OSError:
                    left.append(p.relative_to(self.root).as_posix())
        if not left:
            for name in (MANIFEST, MANIFEST + ".tmp"):
                (self.root / name).unlink(missing_ok=True)
        return left


def _manifest(out: Path) -> Manifest | None:
    return Manifest.load(out) if (Path(out) / MANIFEST).is_file() else None


class Recording:
    """A write of the run into `out/rels` that the manifest will list as the tool's: the paths are
    marked pending now, and `done()` records what changed under them (nothing happens where `out`
    has no manifest: a folder that is not a run of this CLI)."""

    def __init__(self, out: str | os.PathLike, *rels: str):
        self.out, self.rels = Path(out), rels
        m = _manifest(self.out)
        self.active = m is not None
        if self.active:
            self.before = m._snapshot(rels)
            m.begin(*rels)

    def done(self) -> None:
        m = _manifest(self.out) if self.active else None  # read again: other writes recorded meanwhile
        if m is not None:
            try:
                m.record(*self.rels, before=self.before)
            except OSError:  # e.g. a full disk: the pending mark, saved already, still covers these paths
                pass


@contextlib.contextmanager
def writing(out: str | os.PathLike, *rels: str) -> Iterator[None]:
    """`Recording` around a block (not recorded if the block raises: the pending mark stays)."""
    rec = Recording(out, *rels)
    yield
    rec.done()
