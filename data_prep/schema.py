"""Shard sample schema, version 1: encode, decode and validate one sample.

A sample is one frame stored as WebDataset tar members sharing a key:

- ``rgb.jpg`` or ``rgb.png``: 8-bit RGB.
- ``depth.png``: uint16 raw planar depth, unclipped. metres = raw * ``meta.depth_scale``;
  0 = no measurement; 65535 (``FAR_RAW``) = at or beyond the sensor's range (sky, far clip).
- ``sky.png`` (optional): uint8, 255 where the source labels sky.
- ``meta.json``: the fields in ``REQUIRED_KEYS`` (extra fields are allowed and kept).

``decode_sample`` is on the training data path for every sample, so it decodes with OpenCV
and never goes through webdataset's image decoders (those turn 16-bit PNG into 8-bit).
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
from typing import Any

import cv2
import imagecodecs
import numpy as np
import PIL.Image

SCHEMA_VERSION = 1
FAR_RAW = 65535
REQUIRED_KEYS = (
    "schema",
    "source",
    "scene",
    "frame",
    "width",
    "height",
    "fx",
    "fy",
    "cx",
    "cy",
    "depth_scale",
)
RGB_FORMATS = ("png", "jpg")

_KEY_BAD = re.compile(r"[./\\\s]+")


class SampleError(ValueError):
    """A sample (or a source file) that breaks the schema; the message is one line naming it."""


def make_key(source: str, scene: str, frame: Any) -> str:
    """``<source>_<scene>_<frame>`` with dots, slashes and whitespace replaced by '-'.

    webdataset splits a member name at the first dot into key and extension, so a key with a
    dot would be cut short.
    """
    parts = [_KEY_BAD.sub("-", str(p)).strip("-") for p in (source, scene, frame)]
    if not all(parts):
        raise SampleError(f"cannot build a key from source={source!r} scene={scene!r} frame={frame!r}")
    return "_".join(parts)


def check_key(key: Any) -> None:
    if not isinstance(key, str) or not key:
        raise SampleError(f"sample key {key!r}: must be a non-empty string")
    if "." in key or "/" in key or "\\" in key:
        raise SampleError(f"sample key {key!r}: must not contain dots or slashes")


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_meta(meta: dict, key: str) -> None:
    """Raise SampleError (one line naming ``key``) unless ``meta`` is a valid version-1 meta dict."""
    if not isinstance(meta, dict):
        raise SampleError(f"{key}: meta.json is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise SampleError(f"{key}: meta.json misses {', '.join(missing)}")
    if isinstance(meta["schema"], bool) or meta["schema"] != SCHEMA_VERSION:  # true == 1 in Python
        raise SampleError(f"{key}: meta.json schema is {meta['schema']!r}, expected {SCHEMA_VERSION}")
    for k in ("source", "scene"):
        if not isinstance(meta[k], str) or not meta[k]:
            raise SampleError(f"{key}: meta.json {k} must be a non-empty string, got {meta[k]!r}")
    frame = meta["frame"]
    if isinstance(frame, bool) or not isinstance(frame, (str, int)) or frame == "":
        raise SampleError(f"{key}: meta.json frame must be a string or an integer, got {frame!r}")
    for k in ("width", "height"):
        v = meta[k]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SampleError(f"{key}: meta.json {k} must be a positive integer, got {v!r}")
    for k in ("fx", "fy", "cx", "cy", "depth_scale"):
        v = meta[k]
        if not _finite_number(v) or v <= 0:
            raise SampleError(f"{key}: meta.json {k} must be a positive finite number, got {v!r}")


def depth_to_raw(depth_m: np.ndarray, depth_scale: float, name: str = "depth") -> np.ndarray:
    """Metres -> uint16 raw: ``round(depth / depth_scale)``.

    +inf -> 65535 (beyond range); 0 stays 0 (no measurement); a positive depth too small to be
    represented becomes 1, so a measured pixel never turns into "no measurement". NaN, negative
    values and finite values that would reach 65535 raise SampleError naming ``name``: callers
    decide what NaN means in their source before calling.
    """
    if not (_finite_number(depth_scale) and depth_scale > 0):
        raise SampleError(f"{name}: depth_scale must be positive, got {depth_scale!r}")
    d = np.asarray(depth_m, dtype=np.float64)
    if d.ndim != 2:
        raise SampleError(f"{name}: depth must be HxW, got shape {d.shape}")
    nan = np.isnan(d)
    if nan.any():
        raise SampleError(f"{name}: depth has {int(nan.sum())} NaN pixels")
    neg = d < 0
    if neg.any():
        raise SampleError(f"{name}: depth has {int(neg.sum())} negative pixels (min {d.min():.4g} m)")
    inf = np.isposinf(d)
    scaled = np.rint(np.where(inf, 0.0, d) / depth_scale)
    too_far = (scaled >= FAR_RAW) & ~inf
    if too_far.any():
        raise SampleError(
            f"{name}: depth {d[too_far].max():.4g} m does not fit uint16 at depth_scale {depth_scale}"
            f" (largest finite depth {(FAR_RAW - 1) * depth_scale:.4g} m)"
        )
    scaled[(scaled == 0) & (d > 0) & ~inf] = 1
    raw = scaled.astype(np.uint16)
    raw[inf] = FAR_RAW
    return raw


def raw_to_depth(depth_raw: np.ndarray, depth_scale: float) -> np.ndarray:
    """uint16 raw -> float32 metres, 0 = no measurement, +inf where raw == 65535."""
    depth = depth_raw.astype(np.float32)
    depth *= np.float32(depth_scale)
    depth[depth_raw == FAR_RAW] = np.inf
    return depth


# PNG row filters chosen for the training side's decode time: on dense 16-bit depth the fast
# filters (none/sub/up) decode about 20 % faster than the default adaptive set (which picks Paeth)
# at the same size, and on sparse (KITTI) depth they are the same; an unfiltered sky mask decodes
# in about 60 % of the time at the same size. Older OpenCV without the flag writes its default.
_PNG_FILTER = getattr(cv2, "IMWRITE_PNG_FILTER", None)
PNG_PARAMS = {
    "depth": [cv2.IMWRITE_PNG_COMPRESSION, 3]
    + ([_PNG_FILTER, cv2.IMWRITE_PNG_FAST_FILTERS] if _PNG_FILTER is not None else []),
    "sky": [cv2.IMWRITE_PNG_COMPRESSION, 3]
    + ([_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE] if _PNG_FILTER is not None else []),
    "rgb": [cv2.IMWRITE_PNG_COMPRESSION, 3],
}


def _encode_png(img: np.ndarray, what: str, key: str) -> bytes:
    ok, buf = cv2.imencode(".png", img, PNG_PARAMS[what])
    if not ok:
        raise SampleError(f"{key}: could not encode {what} as PNG")
    return buf.tobytes()


def encode_sample(
    key: str,
    rgb: np.ndarray,
    depth_raw: np.ndarray,
    meta: dict,
    sky: np.ndarray | None = None,
    rgb_format: str = "png",
    jpeg_quality: int = 95,
    rgb_bytes: bytes | None = None,
) -> dict:
    """Build a webdataset sample dict, validated against schema version 1.

    ``rgb_bytes`` (optional): an already encoded image in ``rgb_format`` stored verbatim (a
    converter passes the source file through instead of re-encoding it); ``rgb`` must then be
    its decoded pixels, used for validation.
    """
    check_key(key)
    meta = dict(meta)
    meta["schema"] = SCHEMA_VERSION
    validate_meta(meta, key)
    w, h = meta["width"], meta["height"]
    if rgb_format not in RGB_FORMATS:
        raise SampleError(f"{key}: rgb_format must be one of {RGB_FORMATS}, got {rgb_format!r}")
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise SampleError(f"{key}: rgb must be uint8 HxWx3, got {rgb.dtype} {rgb.shape}")
    if rgb.shape[:2] != (h, w):
        raise SampleError(f"{key}: rgb is {rgb.shape[1]}x{rgb.shape[0]} but meta says {w}x{h}")
    depth_raw = np.asarray(depth_raw)
    if depth_raw.dtype != np.uint16 or depth_raw.ndim != 2:
        raise SampleError(f"{key}: depth must be uint16 HxW, got {depth_raw.dtype} {depth_raw.shape}")
    if depth_raw.shape != (h, w):
        raise SampleError(f"{key}: depth is {depth_raw.shape[1]}x{depth_raw.shape[0]} but meta says {w}x{h}")

    sample: dict[str, Any] = {"__key__": key}
    if rgb_bytes is not None:
        sample[f"rgb.{rgb_format}"] = bytes(rgb_bytes)
    else:
        bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        if rgb_format == "jpg":
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
            if not ok:
                raise SampleError(f"{key}: could not encode rgb as JPEG")
            sample["rgb.jpg"] = buf.tobytes()
        else:
            sample["rgb.png"] = _encode_png(bgr, "rgb", key)
    sample["depth.png"] = _encode_png(np.ascontiguousarray(depth_raw), "depth", key)
    if sky is not None:
        sky = np.asarray(sky)
        if sky.shape != (h, w):
            raise SampleError(f"{key}: sky mask is {sky.shape[::-1]} but meta says {w}x{h}")
        sky_u8 = np.where(sky.astype(bool), np.uint8(255), np.uint8(0))
        sample["sky.png"] = _encode_png(sky_u8, "sky", key)
    sample["meta.json"] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return sample


def _get(sample: dict, name: str) -> Any:
    v = sample.get(name)
    if v is None:
        v = sample.get("." + name)
    return v


# JPEG straight to RGB order (OpenCV >= 4.10): no BGR -> RGB pass over the whole frame.
_JPEG_RGB_FLAG = getattr(cv2, "IMREAD_COLOR_RGB", None)


def _require_bytes(data: Any, key: str, what: str) -> bytes | bytearray:
    """The member's bytes (a memoryview copied to bytes, as imagecodecs wants); SampleError if
    it is empty or not bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise SampleError(f"{key}: {what} is empty or not bytes")
    return bytes(data) if isinstance(data, memoryview) else data


def opencv_message(exc: Exception) -> str:
    """The first line of a cv2.error's message (it ends in a newline, some span several lines)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _decode_image(data: Any, key: str, what: str, flag: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    # OpenCV raises, rather than returning None, on some corrupt headers (a PNG declaring
    # 100000x100000 pixels fails its size assertion): still one bad sample, not a crash.
    try:
        img = cv2.imdecode(np.frombuffer(_require_bytes(data, key, what), dtype=np.uint8), flag)
    except cv2.error as e:
        raise SampleError(f"{key}: {what}: unreadable image ({opencv_message(e)})") from None
    if img is None:
        raise SampleError(f"{key}: {what} cannot be decoded")
    return img


def _decode_jpeg_rgb(data: Any, key: str, what: str) -> np.ndarray:
    """rgb.jpg -> uint8 RGB, as stored: an EXIF orientation is ignored, because the pixels must
    line up with depth.png on the stored grid (the converters check sizes on that grid, and a
    rotation would misalign the two or fail the size check). A complete file goes through
    imagecodecs' libjpeg-turbo: the same pixels as OpenCV's decoder, faster with the wheels pinned
    here (2.3 ms against 2.6 to 5.1 ms for a 1242x375 frame on one core, over two measurements).
    Everything else is left to OpenCV, which refuses a truncated file (libjpeg would fill it with
    grey) and converts what libjpeg-turbo will not (CMYK, 12-bit)."""
    buf = _require_bytes(data, key, what)
    if buf.endswith(b"\xff\xd9"):
        try:
            img = imagecodecs.jpeg8_decode(buf, outcolorspace="RGB")
            if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
                return img
        except Exception:  # Jpeg8Error and friends: OpenCV decides below and names the failure
            pass
    return _decode_image(buf, key, what, _JPEG_RGB_FLAG | cv2.IMREAD_IGNORE_ORIENTATION)  # callers check the flag


def _decode_mask_png(data: Any, key: str, what: str) -> np.ndarray:
    """depth.png / sky.png (single channel): imagecodecs' libpng decodes them in about
    85 % of OpenCV's time, to the same values (PNG is lossless)."""
    buf = _require_bytes(data, key, what)
    try:
        return imagecodecs.png_decode(buf)
    except Exception as exc:  # PngError and friends: a bad file, never a reason to stop
        raise SampleError(f"{key}: {what} cannot be decoded ({type(exc).__name__})") from None


def _check_declared_size(data: Any, key: str, what: str, w: int, h: int) -> None:
    """Refuse an image whose header declares another size than meta.json before decoding it: a
    corrupt header declaring 60000x60000 pixels would first be decoded into gigabytes (and can
    take down a loader worker) only to be refused for its size. A header that cannot be read is
    left to the decoder, whose error says what is wrong."""
    data = bytes(data) if isinstance(data, memoryview) else data
    if not isinstance(data, (bytes, bytearray)):
        return
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        if len(data) < 24:
            return  # cut inside its header: the decoder refuses it
        size = struct.unpack(">II", data[16:24])  # the first chunk: microseconds, no library
    else:
        try:
            with PIL.Image.open(io.BytesIO(data)) as im:  # reads the header (JPEG: its SOF) only
                size = im.size
        except PIL.Image.DecompressionBombError:  # PIL reads no size past its limit
            limit = 2 * PIL.Image.MAX_IMAGE_PIXELS
            if w * h > limit:
                return  # meta says this large too: the decoder reads it
            raise SampleError(f"{key}: {what} header declares more than {limit} pixels but meta says {w}x{h}") from None
        except Exception:  # noqa: BLE001 - the decoder reports unreadable headers
            return
    if tuple(size) != (w, h):
        raise SampleError(f"{key}: {what} header declares {size[0]}x{size[1]} but meta says {w}x{h}")


def decode_sample(sample: dict, metres: bool = True) -> dict:
    """Inverse of ``encode_sample`` on a raw webdataset dict (bytes values).

    Returns ``{"key", "rgb" (uint8 HxWx3 RGB), "depth_raw" (uint16 HxW), "depth" (float32 m,
    0 = no measurement, +inf at 65535), "sky" (bool HxW), "meta"}``; raises SampleError.
    ``metres=False`` leaves out "depth": a training crop converts only its own pixels
    (``raw_to_depth`` commutes with cropping, flipping and nearest-neighbour resizing).
    """
    key = sample.get("__key__", "?")
    if not isinstance(key, str):
        key = str(key)

    meta_b = _get(sample, "meta.json")
    if meta_b is None:
        raise SampleError(f"{key}: missing meta.json")
    try:
        meta = json.loads(meta_b.decode("utf-8") if isinstance(meta_b, (bytes, bytearray)) else meta_b)
    except (ValueError, UnicodeDecodeError, TypeError, AttributeError, RecursionError) as e:
        raise SampleError(f"{key}: meta.json is not valid JSON ({e})") from None
    validate_meta(meta, key)
    w, h = meta["width"], meta["height"]

    if _get(sample, "rgb.jpg") is not None and _get(sample, "rgb.png") is not None:
        raise SampleError(f"{key}: holds both rgb.jpg and rgb.png; a sample has one image")
    rgb_name = "rgb.jpg" if _get(sample, "rgb.jpg") is not None else "rgb.png"
    rgb_b = _get(sample, rgb_name)
    if rgb_b is None:
        raise SampleError(f"{key}: missing rgb.jpg / rgb.png")
    depth_b = _get(sample, "depth.png")
    if depth_b is None:
        raise SampleError(f"{key}: missing depth.png")

    sky_b = _get(sample, "sky.png")
    for data, what in ((rgb_b, rgb_name), (depth_b, "depth.png"), (sky_b, "sky.png")):
        _check_declared_size(data, key, what, w, h)
    jpeg_rgb = rgb_name == "rgb.jpg" and _JPEG_RGB_FLAG is not None
    img = _decode_jpeg_rgb(rgb_b, key, rgb_name) if jpeg_rgb else _decode_image(rgb_b, key, rgb_name)
    if img.dtype != np.uint8:
        raise SampleError(f"{key}: {rgb_name} is {img.dtype}, expected 8-bit")
    if jpeg_rgb:
        rgb = img  # already 3-channel RGB, grey JPEGs included
    elif img.ndim == 2:
        rgb = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 3:
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    elif img.shape[2] == 4:
        rgb = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    else:
        raise SampleError(f"{key}: {rgb_name} has {img.shape[2]} channels")
    if rgb.shape[:2] != (h, w):
        raise SampleError(f"{key}: {rgb_name} is {rgb.shape[1]}x{rgb.shape[0]} but meta says {w}x{h}")

    depth_raw = _decode_mask_png(depth_b, key, "depth.png")
    if depth_raw.dtype != np.uint16:
        raise SampleError(f"{key}: depth.png is {depth_raw.dtype}, expected 16-bit (uint16)")
    if depth_raw.ndim != 2:
        raise SampleError(f"{key}: depth.png has {depth_raw.shape[2]} channels, expected 1")
    if depth_raw.shape != (h, w):
        raise SampleError(
            f"{key}: depth.png is {depth_raw.shape[1]}x{depth_raw.shape[0]} but meta says {w}x{h}"
        )

    if sky_b is None:
        sky = np.zeros((h, w), dtype=bool)
    else:
        s = _decode_mask_png(sky_b, key, "sky.png")
        if s.dtype != np.uint8 or s.ndim != 2:
            raise SampleError(f"{key}: sky.png must be 8-bit single-channel, got {s.dtype} {s.shape}")
        if s.shape != (h, w):
            raise SampleError(f"{key}: sky.png is {s.shape[1]}x{s.shape[0]} but meta says {w}x{h}")
        sky = s > 127

    out = {"key": key, "rgb": rgb, "depth_raw": depth_raw, "sky": sky, "meta": meta}
    if metres:
        out["depth"] = raw_to_depth(depth_raw, meta["depth_scale"])
    return out
