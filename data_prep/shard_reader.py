"""Reading a shard back: tar members grouped into samples, truncation detected.

A tar cut short exactly at a member boundary reads without any error in Python's tarfile (and so in
webdataset): it only lacks the zero blocks of its end-of-archive marker. The writer stores a
sample's members in name order, so the sample before such a cut has most likely lost its last
members (``sky.png`` first), and an optional member cannot be told missing from absent. So a shard
that breaks or ends without its marker gives up its last sample: reported once, never yielded.
Samples before it are complete and are kept.
"""
from __future__ import annotations

import re
import tarfile
from typing import BinaryIO, Callable, Iterator

END_MARKER = bytes(2 * tarfile.BLOCKSIZE)
# A member "<folder/>key.ext": the key is everything up to the first dot of the file name, folder
# included; the extension is lower-cased (webdataset's base_plus_ext and group_by_keys).
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class _Tracked:
    """A read-only stream that counts the bytes read and keeps the most recent ones, so the
    end-of-archive marker after the last member can be checked without seeking (pipes)."""

    # tarfile reads ahead by at most a record; the marker starts within the last record read
    KEEP = 2 * tarfile.RECORDSIZE

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.pos = 0
        self.recent = bytearray()  # the stream's last bytes (at least KEEP of them, once read)

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self.pos += len(data)
            self.recent += data
            if len(self.recent) > 4 * self.KEEP:  # trimmed now and then: amortised copying
                del self.recent[:-self.KEEP]
        return data

    def bytes_at(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` on, reading on if needed; short at the end of the stream.
        ``offset`` must lie within the last KEEP bytes read, whatever size the reads returned."""
        while self.pos < offset + size:
            if not self.read(offset + size - self.pos):
                break
        start = offset - (self.pos - len(self.recent))
        return bytes(self.recent[start:start + size]) if start >= 0 else b""


def iter_tar_samples(stream: BinaryIO, url: str, problem: Callable[[str], None]) -> Iterator[dict]:
    """Samples of one tar stream as ``{"__key__", "__url__", <ext>: bytes, ...}``, grouped by
    consecutive key (a member's path up to the first dot of its file name; the extension
    lower-cased, as webdataset does).
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
                match = _KEY_EXT.match(info.name)
                if match is None:
                    problem(f"member {info.name!r} has no extension")
                    continue
                key, ext = match.group(1), match.group(2).lower()
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
