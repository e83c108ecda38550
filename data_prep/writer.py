"""Shard writer: ``<prefix>-%06d.tar`` shards written atomically, plus ``index.json``.

Each shard is written under a temporary name (``.<name>.tmp`` in the same folder) and renamed
to its final name only once it is complete, so a final name never holds a truncated shard.

When the ``with`` block ends in an exception (a bad frame, Ctrl-C, a crash in a worker), the
writer deletes the temporary file *and* the shards it completed in this run and writes no
index: the folder is left as it was found, and a rerun needs no ``--overwrite``. A process that
is killed outright (SIGKILL, power loss) can leave complete shards and a stale temporary file
but never an index.json, so the training side and the checker see the run as incomplete.

With ``overwrite``, the data set already in the folder stays until the new one is complete:
finished shards wait under hidden names (``.<name>.done``), and only a successful close
deletes the old shards and index and renames the new ones into place. It lists what it deletes
in ``.replacing.json`` first (removed once the new index is written), so a rerun with
``overwrite`` after a stop in the middle still replaces the old set's remaining shards.

``index.json`` (written atomically on a successful close) is what the training side reads for
epoch lengths: ``{"schema": 1, "total": N, "shards": [{"name", "samples", "bytes"}, ...]}``.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

from .files import atomic_write_bytes, fsync_dir
from .schema import SCHEMA_VERSION, check_key

INDEX_NAME = "index.json"
# What a closing overwrite is replacing, written before it deletes anything and removed once the new
# index is in place: a rerun after an interrupted replacement still knows the old set's shards.
REPLACING_NAME = ".replacing.json"
# Fixed member metadata so the same samples always give byte-identical shards.
_MTIME = 0
_MODE = 0o444
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def existing_outputs(out_dir: Path) -> list[Path]:
    """Files in ``out_dir`` that make it a non-empty shard folder."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = sorted(out_dir.glob("*.tar"))
    if (out_dir / INDEX_NAME).exists():
        found.append(out_dir / INDEX_NAME)
    return found


def _own_shard(name: str, prefix: str, suffix: str = ".tar") -> bool:
    """``<prefix>-NNNNNN.tar`` exactly: a glob ``<prefix>-*.tar`` would take ``<prefix>-else-000000.tar``
    of another prefix for one of this data set's."""
    return re.fullmatch(re.escape(prefix) + r"-\d{6}" + re.escape(suffix), name) is not None


def _replaced_outputs(out_dir: Path, prefix: str) -> list[Path]:
    """What ``overwrite`` replaces: this prefix's shards, the shards the old index lists, the index.

    Any other ``*.tar`` is refused rather than deleted or kept: the folder gets one index, and a
    shard it does not list (left by a killed run with another prefix) would still be read by a
    ``*.tar`` pattern, every frame twice."""
    found = {p for p in out_dir.glob("*.tar") if _own_shard(p.name, prefix)}
    try:
        found.update(out_dir / s["name"] for s in read_index(out_dir)["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no readable index: only the prefix's shards
    try:  # an earlier overwrite stopped halfway: its index is gone, its list of what it replaced is not
        found.update(out_dir / name for name in json.loads((out_dir / REPLACING_NAME).read_text())
                     if isinstance(name, str) and name.endswith(".tar") and "/" not in name)
    except (OSError, ValueError, TypeError):
        pass
    foreign = sorted(p.name for p in set(out_dir.glob("*.tar")) - found)
    if foreign:
        raise FileExistsError(f"{out_dir} holds {len(foreign)} shard(s) of no known data set ({foreign[0]} first: not "
                              f"'{prefix}-*.tar' and not in its index.json); remove them or choose another folder")
    index = [out_dir / INDEX_NAME] if (out_dir / INDEX_NAME).exists() else []
    return index + sorted(found)


class ShardWriter:
    """Write webdataset samples into rolling, atomically renamed tar shards.

    ``max_samples``: samples per shard. ``max_bytes``: a shard is closed before a sample that
    would push it past this size (a single larger sample still gets a shard of its own).
    ``overwrite=False`` refuses (FileExistsError) a folder that already holds ``*.tar`` or
    index.json; ``overwrite=True`` replaces the old data set (``<prefix>-*.tar``, the shards its
    index.json lists, the index) when the new one closes successfully.
    """

    MIN_BYTES = 4 * _RECORD  # room for a header, one small member and the end-of-archive blocks

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int = 300 * 2**20,
        overwrite: bool = False,
    ) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_bytes < self.MIN_BYTES:
            raise ValueError(f"max_bytes must be >= {self.MIN_BYTES}, got {max_bytes}")
        # letters, digits, '_', '-', '.' only: a glob character (* ? [) would make the overwrite's
        # match of this data set's shards take another data set's too
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", prefix or ""):
            raise ValueError(f"bad shard prefix {prefix!r}: use letters, digits, '_', '-' and '.' (not first)")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise NotADirectoryError(f"{self.out_dir}: exists and is not a folder")
        self.prefix = prefix
        self.max_samples = int(max_samples)
        self.max_bytes = int(max_bytes)
        old = existing_outputs(self.out_dir)
        if old and not overwrite:
            tars = [p.name for p in old if p.suffix == ".tar"]
            held = (f"{len(tars)} shard(s), {tars[0]} first" if tars else ", ".join(p.name for p in old))
            raise FileExistsError(f"{self.out_dir} already holds shards ({held}); choose an empty folder or overwrite")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._replaces = _replaced_outputs(self.out_dir, prefix) if overwrite else []
        # Temporary files of an earlier killed run are garbage by construction.
        for suffix in (".tar.tmp", ".tar.done"):
            for p in self.out_dir.glob(f".*{suffix}"):
                if _own_shard(p.name[1:], prefix, suffix):
                    p.unlink()
        self.shards: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._tmp: Path | None = None
        self._count = 0
        self._bytes = 0
        self._closed = False
        self.replacing = False  # close() has begun deleting the data set this one replaces

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:  # a full disk or Ctrl-C while finishing: leave the folder as found
            if not self.replacing:  # past that point the old data set is partly gone: keep the new one
                self.abort()
            raise

    # -- writing ---------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(s["samples"] for s in self.shards) + self._count

    def _members(self, sample: dict) -> list[tuple[tarfile.TarInfo, bytes]]:
        key = sample.get("__key__")
        check_key(key)
        members = []
        for name in sorted(k for k in sample if not k.startswith("_")):
            data = sample[name]
            if isinstance(data, str):
                data = data.encode("utf-8")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"{key}: {name} is {type(data).__name__}, expected bytes")
            ext = name.lstrip(".")
            if not ext:
                raise ValueError(f"{key}: empty member name")
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size = len(data)
            ti.mtime = _MTIME
            ti.mode = _MODE
            ti.uname = ti.gname = ""
            members.append((ti, bytes(data)))
        if not members:
            raise ValueError(f"{key}: sample has no data members")
        return members

    def _open_shard(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = self.out_dir / f".{name}.tmp"
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0
        self._bytes = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None and self._tmp is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        size = self._file.tell()
        self._file.close()
        name = self._tmp.name[1 : -len(".tmp")]
        # Recorded before the rename, so that abort() also removes a shard renamed just before
        # an interrupt arrived.
        self.shards.append({"name": name, "samples": self._count, "bytes": size})
        os.replace(self._tmp, self._finished_path(name))
        fsync_dir(self.out_dir)
        self._tar = self._file = self._tmp = None
        self._count = 0
        self._bytes = 0

    def write(self, sample: dict) -> None:
        if self._closed:
            raise ValueError("ShardWriter is closed")
        members = self._members(sample)
        key = sample["__key__"]
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        size = sum(len(ti.tobuf(tarfile.PAX_FORMAT)) + _round_up(ti.size, _BLOCK) for ti, _ in members)
        if self._tar is not None and self._count > 0:
            final = _round_up(self._bytes + size + 2 * _BLOCK, _RECORD)
            if self._count >= self.max_samples or final > self.max_bytes:
                self._finish_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        for ti, data in members:
            self._tar.addfile(ti, io.BytesIO(data))
        self._keys.add(key)
        self._count += 1
        self._bytes += size

    def close(self) -> dict:
        """Finish the open shard and write index.json; returns the index."""
        if self._closed:
            return self.index()
        if self._tar is not None and self._count > 0:
            self._finish_shard()
        elif self._tar is not None:
            self._discard_tmp()
        index = self.index()
        journal = self.out_dir / REPLACING_NAME
        if self._replaces:
            atomic_write_bytes(journal, json.dumps([p.name for p in self._replaces]).encode())
        self.replacing = bool(self._replaces)
        for p in self._replaces:  # the index first: a crash in between leaves an incomplete folder
            p.unlink(missing_ok=True)
        if self._deferred:
            for shard in self.shards:
                os.replace(self._finished_path(shard["name"]), self.out_dir / shard["name"])
            fsync_dir(self.out_dir)
        atomic_write_bytes(self.out_dir / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
        journal.unlink(missing_ok=True)
        self._closed = True
        return index

    @property
    def _deferred(self) -> bool:
        return bool(self._replaces)

    def _finished_path(self, name: str) -> Path:
        """Where a finished shard waits: its final name, or a hidden one while it replaces a data set."""
        return self.out_dir / (f".{name}.done" if self._deferred else name)

    def index(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "total": sum(s["samples"] for s in self.shards),
            "shards": [dict(s) for s in self.shards],
        }

    def _discard_tmp(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = None

    def abort(self) -> None:
        """Remove the temporary shard and the shards finished in this run; write no index."""
        self._discard_tmp()
        for s in self.shards:
            self._finished_path(s["name"]).unlink(missing_ok=True)
        self.shards = []
        self._closed = True


def read_index(folder: str | os.PathLike) -> dict:
    """Read and validate ``<folder>/index.json``; ValueError / FileNotFoundError name the file."""
    path = Path(folder) / INDEX_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no shard index (incomplete or interrupted run?)") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        index = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if index.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema is {index.get('schema')!r}, expected {SCHEMA_VERSION}")
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise ValueError(f"{path}: 'shards' must be a list")
    names = set()
    for i, s in enumerate(shards):
        if not (
            isinstance(s, dict)
            and isinstance(s.get("name"), str)
            and s["name"].endswith(".tar")
            and "/" not in s["name"]
            and isinstance(s.get("samples"), int)
            and not isinstance(s.get("samples"), bool)
            and s["samples"] >= 0
        ):
            raise ValueError(f"{path}: shard entry {i} must have a name '*.tar' and a sample count")
        if s["name"] in names:
            raise ValueError(f"{path}: shard {s['name']} listed twice")
        names.add(s["name"])
    total = index.get("total")
    if not isinstance(total, int) or isinstance(total, bool) or total != sum(s["samples"] for s in shards):
        raise ValueError(f"{path}: total {total!r} does not equal the sum of shard sample counts")
    return index
