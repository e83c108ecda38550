"""Reading a shard back: tar members grouped into samples, truncation detected.

A tar cut short exactly at a member boundary reads without any error in Python's tarfile (and so in
webdataset): it only lacks the zero blocks of its end-of-archive marker. The writer stores a
sample's members in name order, so the sample before such a cut has most likely lost its last
members (``sky.png`` first), and an optional member cannot be told missing from absent. So a shard
that breaks or ends without its marker gives up its last sample: reported once, never yielded.
Samples before it are complete and are kept.
"""
from __future__ import annotations

import tarfile
from typing import BinaryIO, Callable, Iterator

END_MARKER = bytes(2 * tarfile.BLOCKSIZE)


class _Tracked:
    """A read-only stream that counts the bytes read and keeps the most recent ones, so the
    end-of-archive marker after the last member can be checked without seeking (pipes)."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.pos = 0
        self.last = self.before = b""  # the two most recent reads, kept by reference (no copies)

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self.pos += len(data)
            self.before, self.last = self.last, data
        return data

    def bytes_at(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` on, reading on if needed; short at the end of the stream.
        ``offset`` must lie within the two most recent reads (tarfile reads whole records)."""
        while self.pos < offset + size:
            if not self.read(offset + size - self.pos):
                break
        recent = self.before + self.last
        start = offset - (self.pos - len(recent))
        return recent[start:start + size] if start >= 0 else b""


def iter_tar_samples(stream: BinaryIO, url: str, problem: Callable[[str], None]) -> Iterator[dict]:
    """Samples of one tar stream as ``{"__key__", "__url__", <ext>: bytes, ...}``, grouped by
    consecutive key (the part of a member's file name before its first dot, as webdataset does).
    ``problem`` gets one message per defect: a member without an extension (skipped), a repeated
    member (its sample dropped), a read error or a missing end-of-archive marker (the last sample
    dropped)."""
    src = _Tracked(stream)
    current: dict | None = None
    dropped = False
    try:
        with tarfile.open(fileobj=src, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                if "." not in base:
                    problem(f"member {info.name!r} has no extension")
                    continue
                key, ext = base.split(".", 1)
                member = tar.extractfile(info)
                data = member.read() if member is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} cut short")
                if current is None or current["__key__"] != key:
                    if current is not None and not dropped:
                        yield current
                    current, dropped = {"__key__": key, "__url__": url}, False
                if ext in current and not dropped:
                    problem(f"{key}: member {ext} repeated")
                    dropped = True
                current[ext] = data
            end = tar.offset  # where the marker should start
    except (tarfile.TarError, OSError, EOFError) as exc:
        problem(f"truncated or unreadable tar ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                f"{_lost(current, dropped)}")
        return
    if src.bytes_at(end, len(END_MARKER)) != END_MARKER:
        problem(f"truncated tar (no end-of-archive marker after the last member){_lost(current, dropped)}")
        return
    if current is not None and not dropped:
        yield current


def _lost(current: dict | None, dropped: bool) -> str:
    return f"; sample {current['__key__']} dropped as possibly incomplete" if current and not dropped else ""
