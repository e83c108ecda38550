"""ShardWriter: naming, rolling, index, atomicity, refusing non-empty folders."""

import json
import os
import tarfile

import numpy as np
import pytest

from data_prep.schema import encode_sample
from data_prep.writer import ShardWriter, read_index


def sample(i, size=4):
    rgb = np.full((size, size, 3), i % 256, np.uint8)
    raw = np.full((size, size), i, np.uint16)
    m = {"source": "t", "scene": "s", "frame": str(i), "width": size, "height": size,
         "fx": 1.0, "fy": 1.0, "cx": 1.0, "cy": 1.0, "depth_scale": 0.01}
    return encode_sample(f"t_s_{i}", rgb, raw, m)


def blob(i, nbytes):
    return {"__key__": f"k{i}", "bin": bytes([i % 256]) * nbytes}


def tars(folder):
    return sorted(p.name for p in folder.glob("*.tar"))


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_rolls_by_count_and_writes_index(tmp_path):
    with ShardWriter(tmp_path, prefix="train", max_samples=3) as w:
        for i in range(7):
            w.write(sample(i))
    assert tars(tmp_path) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    index = read_index(tmp_path)
    assert index["schema"] == 1 and index["total"] == 7
    assert [(s["name"], s["samples"]) for s in index["shards"]] == [
        ("train-000000.tar", 3), ("train-000001.tar", 3), ("train-000002.tar", 1)]
    for s in index["shards"]:
        assert s["bytes"] == (tmp_path / s["name"]).stat().st_size
    with tarfile.open(tmp_path / "train-000000.tar") as t:
        names = t.getnames()
    assert names[:4] == ["t_s_0.depth.png", "t_s_0.meta.json", "t_s_0.rgb.png", "t_s_1.depth.png"]
    assert hidden(tmp_path) == []


def test_rolls_by_bytes(tmp_path):
    max_bytes = 80 * 1024  # 3 samples of 20 kB fit (tar pads to 10 kB records), 4 do not
    with ShardWriter(tmp_path, max_samples=1000, max_bytes=max_bytes) as w:
        for i in range(10):
            w.write(blob(i, 20_000))
        w.write(blob(99, 100_000))  # larger than a shard: gets one of its own
    sizes = [(tmp_path / n).stat().st_size for n in tars(tmp_path)]
    index = read_index(tmp_path)
    assert index["total"] == 11
    assert [s["samples"] for s in index["shards"]] == [3, 3, 3, 1, 1]
    assert all(s <= max_bytes for s in sizes[:-1])


def test_exception_leaves_no_final_shard_and_no_index(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ShardWriter(out, max_samples=2) as w:
            for i in range(5):
                w.write(sample(i))
            assert len(tars(out)) == 2 and len(hidden(out)) == 1  # two finished, one open
            raise RuntimeError("crash mid-run")
    assert tars(out) == [] and hidden(out) == [] and not (out / "index.json").exists()


def test_keyboard_interrupt_cleans_up(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path, max_samples=10) as w:
            w.write(sample(0))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_duplicate_key_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate sample key 't_s_1'"):
        with ShardWriter(tmp_path, max_samples=1) as w:
            w.write(sample(1))
            w.write(sample(2))
            w.write(sample(1))
    assert tars(tmp_path) == []


def test_key_with_dot_refused(tmp_path):
    with pytest.raises(ValueError, match="dots"):
        with ShardWriter(tmp_path) as w:
            w.write({"__key__": "a.b", "x": b"1"})


@pytest.mark.parametrize("existing", ["shard-000000.tar", "other.tar", "index.json"])
def test_refuses_non_empty_folder(tmp_path, existing):
    (tmp_path / existing).write_bytes(b"old")
    with pytest.raises(FileExistsError) as e:
        ShardWriter(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and existing in msg and "\n" not in msg
    assert (tmp_path / existing).read_bytes() == b"old"  # nothing touched


def test_overwrite_replaces(tmp_path):
    with ShardWriter(tmp_path, max_samples=1) as w:
        for i in range(3):
            w.write(sample(i))
    (tmp_path / ".shard-000007.tar.tmp").write_bytes(b"stale")  # from a killed run
    with ShardWriter(tmp_path, overwrite=True) as w:
        w.write(sample(9))
    assert tars(tmp_path) == ["shard-000000.tar"] and hidden(tmp_path) == []
    assert read_index(tmp_path)["total"] == 1


def test_failed_overwrite_keeps_the_old_data_set(tmp_path):
    """The old data set stays usable until the new one is complete; other data sets stay anyway."""
    with ShardWriter(tmp_path, max_samples=1) as w:
        for i in range(3):
            w.write(sample(i))
    old = {n: (tmp_path / n).read_bytes() for n in tars(tmp_path) + ["index.json"]}
    with pytest.raises(RuntimeError, match="bad frame"):
        with ShardWriter(tmp_path, max_samples=1, overwrite=True) as w:
            w.write(sample(7))
            w.write(sample(8))  # one shard finished, waiting under a hidden name
            assert tars(tmp_path) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
            raise RuntimeError("bad frame")
    assert {n: (tmp_path / n).read_bytes() for n in old} == old and hidden(tmp_path) == []
    with ShardWriter(tmp_path, max_samples=2, overwrite=True) as w:
        w.write(sample(9))
    assert tars(tmp_path) == ["shard-000000.tar"] and hidden(tmp_path) == []
    assert read_index(tmp_path)["total"] == 1


def test_overwrite_refuses_shards_of_no_known_data_set(tmp_path):
    """A shard neither of this prefix nor in the index (a killed run's, another prefix) would be
    read beside the new set by a *.tar pattern: refused by name, nothing deleted."""
    with ShardWriter(tmp_path, max_samples=1) as w:
        w.write(sample(0))
    (tmp_path / "kitti-000000.tar").write_bytes(b"a killed run's shard")
    with pytest.raises(FileExistsError) as e:
        ShardWriter(tmp_path, overwrite=True)
    assert "kitti-000000.tar" in str(e.value) and "\n" not in str(e.value)
    assert tars(tmp_path) == ["kitti-000000.tar", "shard-000000.tar"] and read_index(tmp_path)["total"] == 1
    # a listed shard of another prefix is part of the data set the new one replaces
    with ShardWriter(tmp_path, prefix="kitti", max_samples=1, overwrite=True) as w:
        w.write(sample(1))
    assert tars(tmp_path) == ["kitti-000000.tar"]
    with ShardWriter(tmp_path, prefix="val", max_samples=1, overwrite=True) as w:
        w.write(sample(2))
    assert tars(tmp_path) == ["val-000000.tar"] and read_index(tmp_path)["total"] == 1


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failure_while_closing_leaves_the_folder_as_found(tmp_path, monkeypatch, overwrite):
    """A full disk (or Ctrl-C) while the last shard is finished: the shards of this run go, as
    for any other failure, and an old data set stays."""
    import data_prep.writer as writer_module

    if overwrite:
        with ShardWriter(tmp_path, max_samples=1) as w:
            w.write(sample(0))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_fsync = os.fsync
    with pytest.raises(OSError, match="No space left"):
        with ShardWriter(tmp_path, max_samples=1, overwrite=overwrite) as w:
            for i in range(3):
                w.write(sample(10 + i))

            def full(fd):
                raise OSError(28, "No space left on device")
            monkeypatch.setattr(writer_module.os, "fsync", full)
    monkeypatch.setattr(writer_module.os, "fsync", real_fsync)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_failure_while_replacing_keeps_the_new_shards(tmp_path, monkeypatch):
    """Once close() has begun deleting the old data set, aborting would lose both: the new
    shards stay (no index, so the folder reads as incomplete) and the error goes up."""
    import data_prep.writer as writer_module

    with ShardWriter(tmp_path, max_samples=1) as w:
        w.write(sample(0))

    real_write = writer_module.atomic_write_bytes

    def full(path, data):  # the disk fills up as the new index is written, the old set deleted
        if path.name == "index.json":
            raise OSError(28, "No space left on device")
        real_write(path, data)
    monkeypatch.setattr(writer_module, "atomic_write_bytes", full)
    with pytest.raises(OSError):
        with ShardWriter(tmp_path, max_samples=1, overwrite=True) as w:
            w.write(sample(5))
            w.write(sample(6))
    assert w.replacing
    assert tars(tmp_path) == ["shard-000000.tar", "shard-000001.tar"] and not (tmp_path / "index.json").exists()


def test_deterministic_bytes(tmp_path):
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name, max_samples=2) as w:
            for i in range(3):
                w.write(sample(i))
    for n in tars(tmp_path / "a"):
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()


def test_shard_is_valid_tar_with_end_marker(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write(sample(0))
    data = (tmp_path / "shard-000000.tar").read_bytes()
    assert len(data) % 512 == 0 and data[-1024:] == bytes(1024)


def test_read_index_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text("{oops")
    with pytest.raises(ValueError, match="index.json: not valid JSON"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps(
        {"schema": 1, "total": 5, "shards": [{"name": "shard-000000.tar", "samples": 4}]}))
    with pytest.raises(ValueError, match="total 5"):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"schema": 2, "total": 0, "shards": []}))
    with pytest.raises(ValueError, match="schema is 2"):
        read_index(tmp_path)


def test_empty_run_writes_empty_index(tmp_path):
    with ShardWriter(tmp_path):
        pass
    assert read_index(tmp_path) == {"schema": 1, "total": 0, "shards": []}
    assert tars(tmp_path) == []


def test_temp_name_is_hidden_until_complete(tmp_path):
    w = ShardWriter(tmp_path, max_samples=2)
    w.write(sample(0))
    assert tars(tmp_path) == [] and hidden(tmp_path) == [".shard-000000.tar.tmp"]
    w.close()
    assert tars(tmp_path) == ["shard-000000.tar"] and hidden(tmp_path) == []
    assert os.path.exists(tmp_path / "index.json")


def test_a_rerun_completes_an_overwrite_stopped_while_it_replaced_the_old_set(tmp_path, monkeypatch):
    """Stopped between deleting the old index and the last old shard: the rerun the error asks for
    knows the old set's remaining shards (another prefix, in no index any more) and replaces them."""
    from pathlib import Path

    with ShardWriter(tmp_path, prefix="kitti", max_samples=1) as w:
        for i in range(3):
            w.write(sample(i))
    real_unlink, deleted = Path.unlink, []

    def unlink(self, missing_ok=False):
        if self.name.startswith("kitti-") and deleted:
            raise KeyboardInterrupt  # Ctrl-C after the index and one old shard are gone
        if self.name.startswith("kitti-"):
            deleted.append(self.name)
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path, max_samples=1, overwrite=True) as w:
            w.write(sample(5))
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert w.replacing and not (tmp_path / "index.json").exists()
    assert tars(tmp_path) == ["kitti-000001.tar", "kitti-000002.tar"]  # neither this prefix nor indexed
    with ShardWriter(tmp_path, max_samples=1, overwrite=True) as w:
        w.write(sample(6))
    assert tars(tmp_path) == ["shard-000000.tar"] and hidden(tmp_path) == []
    assert read_index(tmp_path)["total"] == 1


@pytest.mark.parametrize("prefix", ["*", "a[1]", "sh?rd", ".hidden", "", "a/b"])
def test_a_prefix_that_globs_or_hides_is_refused(tmp_path, prefix):
    """--prefix '*' --overwrite matched another data set's shards as its own and deleted them."""
    with pytest.raises(ValueError, match="bad shard prefix"):
        ShardWriter(tmp_path, prefix=prefix)


def test_overwrite_with_a_glob_prefix_leaves_another_data_set_alone(tmp_path, capsys):
    from data_prep import synthetic

    args = ["--out", str(tmp_path), "--frames", "2", "--width", "32", "--height", "16", "--workers", "1",
            "--no-progress"]
    assert synthetic.main([*args, "--prefix", "mine"]) == 0
    other = tmp_path / "someone-else-000000.tar"
    other.write_bytes((tmp_path / "mine-000000.tar").read_bytes())
    assert synthetic.main([*args, "--prefix", "*", "--overwrite"]) == 2
    assert other.is_file() and "bad shard prefix" in capsys.readouterr().err
    # a prefix that begins another's name: 'someone' must not take 'someone-else-000000.tar' for its own
    assert synthetic.main([*args, "--prefix", "someone", "--overwrite"]) == 2
    assert other.is_file() and "of no known data set (someone-else-000000.tar" in capsys.readouterr().err
    assert synthetic.main([*args, "--width", "300000"]) == 2
    assert "--width and --height must lie in 16..8192" in capsys.readouterr().err
