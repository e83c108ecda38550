"""data_prep.shard_reader: samples grouped from a tar, truncation caught once, through training's reader too."""
import io
import tarfile
import warnings
from pathlib import Path

import pytest

from conftest import write_tiny_shards
from curriculum.data import DataError, _BadSampleCounter, _raw_samples
from data_prep.shard_reader import iter_tar_samples

MEMBERS = ["depth.png", "meta.json", "rgb.png", "sky.png"]


def _shard(tmp_path: Path, per_shard: int = 3) -> Path:
    return Path(write_tiny_shards(tmp_path, n_shards=1, per_shard=per_shard)[0])


def _read(path: Path, url: str | None = None) -> tuple[list[dict], list[str]]:
    problems: list[str] = []
    with open(path, "rb") as f:
        samples = list(iter_tar_samples(f, url or str(path), problems.append))
    return samples, problems


def _training_reader(url: str) -> tuple[list[dict], int, list[str]]:
    bad = _BadSampleCounter(limit=100)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        samples = list(_raw_samples([url], bad))
    return samples, bad.total, [str(w.message) for w in record]


def test_intact_shard_reads_whole_samples_from_a_file_and_a_pipe(tmp_path):
    path = _shard(tmp_path)
    samples, problems = _read(path)
    assert problems == [] and [s["__key__"] for s in samples] == [f"test_s0_{i:04d}" for i in range(3)]
    assert all(sorted(k for k in s if not k.startswith("__")) == MEMBERS for s in samples)
    piped, bad, _ = _training_reader(f"pipe:cat {path}")  # not seekable: the marker is read, not sought
    assert bad == 0 and [s["__key__"] for s in piped] == [s["__key__"] for s in samples]
    assert all(p["rgb.png"] == s["rgb.png"] for p, s in zip(piped, samples))


def test_a_failing_pipe_command_is_one_line_naming_the_shard(tmp_path):
    """webdataset's pipe error quotes Popen's arguments; ours says which shard's command failed how."""
    url = f"pipe:cat {tmp_path / 'missing.tar'} 2>/dev/null"
    with pytest.raises(DataError) as err:
        _training_reader(url)
    assert str(err.value) == f"{url}: command exited with status 1"


def test_a_pipe_read_only_in_part_is_no_failed_command(tmp_path, capfd):
    """A reader that stops early (val_max_images, an epoch's quota) closes a command still writing:
    it ends with a status of its own (curl: 23; here cat's SIGPIPE turned into 23), which is not a
    failed shard. A command that fails after writing the whole shard still is one."""
    from curriculum.data import ValStream

    path = Path(write_tiny_shards(tmp_path, n_shards=1, per_shard=30)[0])
    assert path.stat().st_size > 4 * 65536  # more than a pipe holds: cat is still writing at the close
    url = f"pipe:cat {path} || exit 23"
    batches = list(ValStream([url], 0, 1, 1, 42, 84, max_images=3))
    assert [b["key"][0] for b in batches] == [f"test_s0_{i:04d}" for i in range(3)]
    assert "Error" not in capfd.readouterr().err
    samples = _raw_samples([url], _BadSampleCounter(limit=100))
    assert next(samples)["__key__"] == "test_s0_0000"
    samples.close()
    with pytest.raises(DataError, match="command exited with status 3"):
        _training_reader(f"pipe:cat {path}; exit 3")
    # a small shard ends at its marker long before the command exits: its failure is still read
    small = _shard(tmp_path / "small", per_shard=3)
    for command in (f"cat {small}; exit 3", f"cat {small}; sleep 0.3; exit 3"):
        for _ in range(3):
            with pytest.raises(DataError, match="command exited with status 3"):
                _training_reader(f"pipe:{command}")


def test_cut_at_a_member_boundary_drops_the_last_sample_once(tmp_path):
    """The cut removes only the last sample's sky.png: tarfile reads the rest without an error and
    the sample would pass as one without sky; it is dropped and counted once."""
    path = _shard(tmp_path, per_shard=2)
    with tarfile.open(path) as tar:
        sky = tar.getmembers()[-1]
    assert sky.name.endswith("sky.png")
    path.write_bytes(path.read_bytes()[:sky.offset])
    samples, bad, messages = _training_reader(str(path))
    assert [s["__key__"] for s in samples] == ["test_s0_0000"] and bad == 1
    assert "no end-of-archive marker" in messages[0] and "test_s0_0001 dropped" in messages[0]


def test_cut_inside_a_member_counts_once(tmp_path):
    path = _shard(tmp_path, per_shard=2)
    with tarfile.open(path) as tar:
        sky = tar.getmembers()[-1]
    path.write_bytes(path.read_bytes()[:sky.offset_data + 20])
    samples, bad, messages = _training_reader(str(path))
    assert [s["__key__"] for s in samples] == ["test_s0_0000"] and bad == 1, messages
    assert "truncated or unreadable tar" in messages[0]


@pytest.mark.parametrize("cut", [0, 100, 512])
def test_short_or_empty_file(tmp_path, cut):
    path = _shard(tmp_path)
    path.write_bytes(path.read_bytes()[:cut])
    samples, problems = _read(path)
    assert samples == [] and len(problems) == 1 and "truncated" in problems[0]


class _Trickle(io.RawIOBase):
    """A stream whose reads return at most ``n`` bytes, as a raw pipe or a socket may."""

    def __init__(self, data: bytes, n: int):
        self.data, self.n, self.pos = data, n, 0

    def readable(self):
        return True

    def read(self, size=-1):
        size = self.n if size is None or size < 0 else min(size, self.n)
        out = self.data[self.pos:self.pos + size]
        self.pos += len(out)
        return out


@pytest.mark.parametrize("chunk", [1, 100, 511, 904, 10240, 1 << 20])
def test_short_reads_still_find_the_end_of_archive_marker(tmp_path, chunk):
    data = _shard(tmp_path).read_bytes()
    problems: list[str] = []
    samples = list(iter_tar_samples(_Trickle(data, chunk), "pipe", problems.append))
    assert problems == [] and len(samples) == 3


def _tar(path: Path, names: list[str]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    path.write_bytes(buf.getvalue())
    return path


def test_keys_keep_their_folder_and_extensions_are_lower_cased(tmp_path):
    """As webdataset groups them: a/0001 and b/0001 are two samples; RGB.JPG is rgb.jpg."""
    samples, problems = _read(_tar(tmp_path / "t.tar", ["a/0001.meta.json", "a/0001.RGB.JPG",
                                                        "b/0001.meta.json", "b/0001.rgb.jpg"]))
    assert problems == [] and [s["__key__"] for s in samples] == ["a/0001", "b/0001"]
    assert all(sorted(k for k in s if not k.startswith("__")) == ["meta.json", "rgb.jpg"] for s in samples)


def test_repeated_member_drops_its_sample(tmp_path):
    samples, problems = _read(_tar(tmp_path / "t.tar", ["a.meta.json", "a.meta.json", "b.meta.json", "noext"]))
    assert [s["__key__"] for s in samples] == ["b"]
    assert problems == ["a: member meta.json repeated", "member 'noext' has no extension"]
