"""Shard sample schema: encode/decode round trips and refusals."""

import json
import struct

import cv2
import numpy as np
import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from data_prep import layouts, schema
from data_prep.schema import (
    FAR_RAW,
    REQUIRED_KEYS,
    SCHEMA_VERSION,
    SampleError,
    decode_sample,
    depth_to_raw,
    encode_sample,
    make_key,
    validate_meta,
)
from data_prep.writer import ShardWriter

H, W = 6, 8


def meta(**kw):
    m = {"source": "test", "scene": "s", "frame": "0001", "width": W, "height": H,
         "fx": 10.0, "fy": 10.0, "cx": 4.0, "cy": 3.0, "depth_scale": 0.01}
    m.update(kw)
    return m


def arrays_(seed=0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    raw = rng.integers(0, 65536, (H, W)).astype(np.uint16)
    raw[0, 0], raw[0, 1], raw[0, 2] = 0, FAR_RAW, 1
    sky = np.zeros((H, W), bool)
    sky[0, 1] = True
    return rgb, raw, sky


def test_constants():
    assert SCHEMA_VERSION == 1 and FAR_RAW == 65535
    assert set(REQUIRED_KEYS) == {"schema", "source", "scene", "frame", "width", "height",
                                  "fx", "fy", "cx", "cy", "depth_scale"}


def test_round_trip_png_keeps_0_and_65535():
    rgb, raw, sky = arrays_()
    s = encode_sample("test_s_0001", rgb, raw, meta(), sky=sky, rgb_format="png")
    assert set(s) == {"__key__", "rgb.png", "depth.png", "sky.png", "meta.json"}
    assert json.loads(s["meta.json"])["schema"] == 1
    d = decode_sample(s)
    assert d["key"] == "test_s_0001"
    np.testing.assert_array_equal(d["rgb"], rgb)  # RGB order, lossless
    np.testing.assert_array_equal(d["depth_raw"], raw)
    assert d["depth_raw"].dtype == np.uint16 and d["depth"].dtype == np.float32
    assert d["depth"][0, 0] == 0 and np.isposinf(d["depth"][0, 1])
    np.testing.assert_allclose(d["depth"][raw < FAR_RAW], raw[raw < FAR_RAW] * np.float32(0.01), rtol=1e-6)
    np.testing.assert_array_equal(d["sky"], sky)
    assert d["meta"]["schema"] == 1 and d["meta"]["fx"] == 10.0


def test_round_trip_jpg_and_no_sky():
    rgb, raw, _ = arrays_()
    rgb[:] = (200, 30, 60)  # flat colour: JPEG keeps it closely, and channel order is checked
    s = encode_sample("k", rgb, raw, meta(), rgb_format="jpg", jpeg_quality=95)
    assert "rgb.jpg" in s and "sky.png" not in s
    d = decode_sample(s)
    assert np.abs(d["rgb"].astype(int) - rgb).max() <= 3
    assert d["sky"].dtype == bool and not d["sky"].any()
    np.testing.assert_array_equal(d["depth_raw"], raw)


def test_decode_accepts_leading_dot_keys_and_url():
    rgb, raw, sky = arrays_()
    s = encode_sample("k", rgb, raw, meta(), sky=sky)
    dotted = {("." + k if not k.startswith("_") else k): v for k, v in s.items()}
    dotted["__url__"] = "x.tar"
    d = decode_sample(dotted)
    np.testing.assert_array_equal(d["depth_raw"], raw)
    np.testing.assert_array_equal(d["sky"], sky)


def test_65535_survives_shard_and_webdataset_reader(tmp_path):
    # webdataset's built-in decoders would turn 16-bit PNGs into 8-bit; the training side reads
    # tars with webdataset and decodes with decode_sample.
    rgb, raw, sky = arrays_()
    with ShardWriter(tmp_path) as w:
        w.write(encode_sample("a_b_1", rgb, raw, meta(), sky=sky))
    out = list(wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False).map(decode_sample))
    assert len(out) == 1
    assert out[0]["depth_raw"].max() == 65535 and out[0]["depth_raw"][0, 1] == 65535
    np.testing.assert_array_equal(out[0]["depth_raw"], raw)
    assert np.isposinf(out[0]["depth"][0, 1])


def test_8bit_depth_refused():
    rgb, raw, _ = arrays_()
    s = encode_sample("k", rgb, raw, meta())
    ok, buf = cv2.imencode(".png", (raw >> 8).astype(np.uint8))
    s["depth.png"] = buf.tobytes()
    with pytest.raises(SampleError, match="k: depth.png is uint8, expected 16-bit"):
        decode_sample(s)


def test_multichannel_depth_refused():
    rgb, raw, _ = arrays_()
    s = encode_sample("k", rgb, raw, meta())
    ok, buf = cv2.imencode(".png", np.stack([raw] * 3, -1))
    s["depth.png"] = buf.tobytes()
    with pytest.raises(SampleError, match="channels"):
        decode_sample(s)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop("depth.png"), "missing depth.png"),
        (lambda s: s.pop("rgb.png"), "missing rgb"),
        (lambda s: s.pop("meta.json"), "missing meta.json"),
        (lambda s: s.__setitem__("meta.json", b"{not json"), "not valid JSON"),
        (lambda s: s.__setitem__("meta.json", json.dumps(meta(schema=2)).encode()), "schema is 2"),
        (lambda s: s.__setitem__("meta.json", json.dumps(meta(schema=True)).encode()), "schema is True"),
        (lambda s: s.__setitem__("meta.json", json.dumps({"schema": 1, "source": "x"}).encode()), "misses"),
        (lambda s: s.__setitem__("meta.json", json.dumps(meta(schema=1, width=W + 1)).encode()), "but meta says"),
        (lambda s: s.__setitem__("meta.json", json.dumps(meta(schema=1, fx=0)).encode()), "fx must be a positive"),
        (lambda s: s.__setitem__("rgb.png", b"garbage"), "cannot be decoded"),
        (lambda s: s.__setitem__("depth.png", b""), "empty"),
    ],
)
def test_decode_refusals(mutate, message):
    rgb, raw, _ = arrays_()
    s = encode_sample("key1", rgb, raw, meta())
    mutate(s)
    with pytest.raises(SampleError, match=message) as e:
        decode_sample(s)
    assert str(e.value).startswith("key1: ") and "\n" not in str(e.value)


def test_sky_size_mismatch_refused():
    rgb, raw, _ = arrays_()
    s = encode_sample("k", rgb, raw, meta())
    ok, buf = cv2.imencode(".png", np.zeros((H + 1, W), np.uint8))
    s["sky.png"] = buf.tobytes()
    with pytest.raises(SampleError, match="sky.png"):
        decode_sample(s)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(key="a.b"), "dots"),
        (dict(key=""), "non-empty"),
        (dict(depth=np.zeros((H, W), np.float32)), "uint16"),
        (dict(depth=np.zeros((H, W + 1), np.uint16)), "but meta says"),
        (dict(rgb=np.zeros((H + 1, W, 3), np.uint8)), "but meta says"),
        (dict(rgb=np.zeros((H, W), np.uint8)), "uint8 HxWx3"),
        (dict(meta=meta(fy=-1.0)), "fy must be a positive"),
        (dict(meta=meta(cx=float("nan"))), "cx must be a positive"),
        (dict(meta={k: v for k, v in meta().items() if k != "fx"}), "misses fx"),
        (dict(sky=np.zeros((2, 2), bool)), "sky mask"),
        (dict(rgb_format="bmp"), "rgb_format"),
    ],
)
def test_encode_validates(kw, message):
    rgb, raw, _ = arrays_()
    args = dict(key="k", rgb=rgb, depth=raw, meta=meta(), sky=None, rgb_format="png")
    args.update(kw)
    with pytest.raises(SampleError, match=message):
        encode_sample(args["key"], args["rgb"], args["depth"], args["meta"], sky=args["sky"],
                      rgb_format=args["rgb_format"])


def test_depth_to_raw():
    d = np.array([[0.0, 0.01, 1.234, np.inf], [655.34, 0.001, 0.004, 0.006]])
    raw = depth_to_raw(d, 0.01)
    assert raw.dtype == np.uint16
    assert raw.tolist() == [[0, 1, 123, 65535], [65534, 1, 1, 1]]  # tiny positive stays measured
    assert depth_to_raw(np.array([[80.0]]), 1 / 256)[0, 0] == 20480


@pytest.mark.parametrize(
    "value, message",
    [(np.nan, "NaN"), (-0.5, "negative"), (655.35, "does not fit"), (1000.0, "does not fit")],
)
def test_depth_to_raw_refuses(value, message):
    with pytest.raises(SampleError, match=f"myfile.hdf5: .*{message}"):
        depth_to_raw(np.array([[1.0, value]]), 0.01, name="myfile.hdf5")


def test_make_key_sanitises():
    assert make_key("hypersim", "ai_001.002", "cam_00/frame.0001") == "hypersim_ai_001-002_cam_00-frame-0001"
    assert "." not in make_key("a", "b.c", 1)


def test_validate_meta_ok_and_bad():
    m = meta(schema=1)
    validate_meta(m, "k")
    with pytest.raises(SampleError, match="k: meta.json width"):
        validate_meta(dict(m, width=0), "k")
    with pytest.raises(SampleError, match="frame"):
        validate_meta(dict(m, frame=None), "k")


@settings(max_examples=25, deadline=None)
@given(arrays(np.uint16, st.tuples(st.integers(1, 9), st.integers(1, 9))))
def test_round_trip_property(raw):
    h, w = raw.shape
    rgb = np.zeros((h, w, 3), np.uint8)
    m = meta(width=w, height=h)
    d = decode_sample(encode_sample("k", rgb, raw, m))
    np.testing.assert_array_equal(d["depth_raw"], raw)
    np.testing.assert_array_equal(np.isinf(d["depth"]), raw == FAR_RAW)
    np.testing.assert_array_equal(d["depth"] == 0, raw == 0)


def _exif_orientation_6(jpg: bytes) -> bytes:
    """The same JPEG with an EXIF APP1 segment saying 'rotate 90 degrees clockwise'."""
    tiff = b"MM\x00*\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00" + b"\x00" * 4
    payload = b"Exif\x00\x00" + tiff
    return jpg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpg[2:]


def test_jpeg_decode_matches_opencv_on_real_frames(fixtures_dir):
    """rgb.jpg: the fast decoder gives OpenCV's pixels exactly (real KITTI frames, grey too); an
    EXIF orientation is ignored, as the converters ignore it (the pixels stay on depth's grid);
    a truncated file is refused."""
    frames = sorted((fixtures_dir / "kitti").glob("rgb_*.png"))
    assert frames
    for path in frames:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        for img in (bgr, cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)):
            jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
            want = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR_RGB)
            for data in (jpg, _exif_orientation_6(jpg)):
                got = schema._decode_jpeg_rgb(data, "k", "rgb.jpg")
                assert got.dtype == np.uint8 and got.shape == want.shape and np.array_equal(got, want), path
            assert got.shape[:2] == img.shape[:2]  # the EXIF variant is not rotated
            exif_by_opencv = schema._decode_image(_exif_orientation_6(jpg), "k", "rgb.jpg",
                                                  cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
            assert np.array_equal(exif_by_opencv, want)  # the fallback decoder agrees
            with pytest.raises(SampleError, match="k: rgb.jpg cannot be decoded"):
                schema._decode_jpeg_rgb(jpg[: len(jpg) // 2], "k", "rgb.jpg")


def test_a_sample_with_two_images_is_refused():
    raw = np.full((4, 6), 1000, np.uint16)
    rgb = np.zeros((4, 6, 3), np.uint8)
    meta = {"schema": 1, "source": "t", "scene": "s", "frame": 0, "width": 6, "height": 4,
            "fx": 5.0, "fy": 5.0, "cx": 3.0, "cy": 2.0, "depth_scale": 0.01}
    sample = encode_sample("k", rgb, raw, meta, rgb_format="png")
    sample["rgb.jpg"] = cv2.imencode(".jpg", rgb)[1].tobytes()
    with pytest.raises(SampleError, match="k: holds both rgb.jpg and rgb.png"):
        decode_sample(sample)


def test_image_opencv_refuses_by_raising_is_a_sample_error():
    """A header that makes cv2.imdecode raise, not return None: a SampleError naming the key and
    member, so the checker reports it and the training decoder (the same function) skips it."""
    from data_prep import schema

    with pytest.raises(SampleError, match=r"^key1: rgb\.png: unreadable image \(.*CV_IO_MAX_IMAGE_PIXELS") as e:
        schema._decode_image(layouts.png_declaring(100000, 100000), "key1", "rgb.png")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("member", ["rgb.png", "rgb.jpg", "depth.png", "sky.png"])
def test_a_header_declaring_another_size_is_refused_before_decoding(member, monkeypatch):
    """A corrupt header declaring 60000x60000 pixels (a JPEG decodes that into gigabytes) is
    refused from the header, for the checker and the training decoder alike, before any decode."""
    from curriculum import data as training_data
    from data_prep import schema

    rgb, raw, _ = arrays_()
    s = encode_sample("key1", rgb, raw, meta(), sky=np.zeros(raw.shape, bool))
    if member == "rgb.jpg":
        del s["rgb.png"]
        jpg = bytearray(cv2.imencode(".jpg", rgb)[1].tobytes())
        sof = jpg.find(b"\xff\xc0")
        jpg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)  # height, width
        s["rgb.jpg"] = bytes(jpg)
    else:
        s[member] = layouts.png_declaring(60000, 60000)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded")

    for name in ("_decode_image", "_decode_mask_png", "_decode_jpeg_rgb"):
        monkeypatch.setattr(schema, name, no_decoding)
    w, h = meta()["width"], meta()["height"]
    for decode in (decode_sample, training_data.decode_sample):
        with pytest.raises(SampleError, match=rf"^key1: {member} header declares (60000x60000|more than [0-9]+ "
                                              rf"pixels) but meta says {w}x{h}$"):
            decode(s)


@pytest.mark.parametrize("cut", [8, 16, 20, 23, 24])
def test_a_png_cut_inside_its_header_is_a_bad_sample(cut):
    """The header pre-check reads a PNG's size from its first chunk: a member cut before the size
    ends must stay a SampleError (the decoder's), not a crash."""
    rgb, raw, _ = arrays_()
    for member in ("rgb.png", "depth.png"):
        s = encode_sample("k", rgb, raw, meta())
        s[member] = s[member][:cut]
        with pytest.raises(SampleError, match=rf"^k: {member}"):
            decode_sample(s)


def test_a_jpeg_larger_than_pils_limit_is_decoded_when_meta_agrees(monkeypatch):
    """PIL reads no size past its decompression-bomb limit; a JPEG that large whose meta.json says
    so too is left to the decoder instead of being refused as a mismatch."""
    import PIL.Image

    rgb, raw, _ = arrays_()
    s = encode_sample("k", rgb, raw, meta(), rgb_format="jpg")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10)  # the test frame is "too large" for PIL
    out = decode_sample(s)
    assert out["rgb"].shape[:2] == raw.shape
