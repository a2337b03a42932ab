"""Reading and writing image and label files, with errors that say what is wrong with which file.

Why a module: packing (real and synthetic folders) and the PIL loaders read the same kinds of
files, and a bad file must always produce the same clear message. PIL reads everything except
16-bit RGB PNGs (Synthia labels), which it silently truncates to 8 bits; those go through a
one-sample CPU DALI pipeline (DALI is a hard dependency anyway).
"""
from __future__ import annotations

import io
import struct
import threading
import zlib
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from eglp_dist.data import labels as L


class BadSample(Exception):
    """A sample that cannot be packed; the message names the file and the problem."""


def _open(src: Union[Path, bytes], what: str, name: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
        im.load()  # decode fully now: truncated files fail here, not later in a loader
        return im
    except FileNotFoundError:
        raise BadSample(f"{name}: {what} file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadSample(f"{name}: unreadable or truncated {what} ({exc})") from None


def load_image(src: Union[Path, bytes], name: str = "") -> Image.Image:
    """An image, fully decoded, in its stored mode (``.format`` tells JPEG from PNG)."""
    return _open(src, "image", name or str(src))


def load_rgb(src: Union[Path, bytes], name: str = "") -> Image.Image:
    """An image as RGB (any mode PIL reads), fully decoded."""
    im = load_image(src, name)
    return im if im.mode == "RGB" else im.convert("RGB")


_DALI = threading.local()


def _png16_pipeline():
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
        return fn.decoders.image(data, device="cpu", output_type=types.ANY_DATA,
                                 dtype=types.UINT16)

    p = pipe()
    p.build()
    return p


def decode_png16(data: bytes, name: str) -> np.ndarray:
    """A 16-bit PNG -> uint16 [H, W, C] without losing the high byte (PIL cannot)."""
    if not data.startswith(b"\x89PNG"):
        raise BadSample(f"{name}: not a PNG file")
    pipe = getattr(_DALI, "png16", None)
    if pipe is None:
        pipe = _DALI.png16 = _png16_pipeline()
    try:
        pipe.feed_input("data", [np.frombuffer(data, np.uint8)])
        (out,) = pipe.run()
    except RuntimeError as exc:
        _DALI.png16 = None  # a failed pipeline is not reusable
        raise BadSample(f"{name}: unreadable or truncated label ({str(exc).splitlines()[0]})") from None
    arr = np.asarray(out.as_tensor())[0]
    return arr if arr.ndim == 3 else arr[..., None]


def load_label(path: Path, encoding: str) -> np.ndarray:
    """A label file -> trainIds uint8 [H, W]; BadSample if unreadable or out of label space."""
    enc = L.ENCODINGS[encoding]
    if enc.bits == 16:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise BadSample(f"{path}: cannot read label ({exc.strerror})") from None
        ids = decode_png16(data, str(path))[..., 0]
    else:
        im = _open(path, "label", str(path))
        if im.mode not in ("L", "P", "I", "I;16"):
            raise BadSample(f"{path}: label has mode {im.mode}, expected single-channel ids")
        ids = np.asarray(im)
        if ids.dtype != np.uint8:
            if ids.min() < 0 or ids.max() > 255:
                raise BadSample(f"{path}: label values outside the label space of {encoding}: "
                                f"min {ids.min()}, max {ids.max()}")
            ids = ids.astype(np.uint8)
    bad = enc.invalid_ids(ids)
    if bad:
        raise BadSample(f"{path}: label values outside the label space of {encoding}: "
                        f"{bad[:10]}{' ...' if len(bad) > 10 else ''}")
    return enc.to_train(ids)


def decode_seg(data: bytes, name: str = "seg.png") -> np.ndarray:
    """A packed KEY.seg.png -> trainIds uint8 [H, W] (lossless, one channel)."""
    im = _open(data, "label", name)
    if im.mode != "L":
        raise BadSample(f"{name}: packed label has mode {im.mode}, expected L")
    return np.asarray(im)


def encode_png(arr: np.ndarray, compress_level: int = 3) -> bytes:
    """uint8 [H, W] or [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png16_rgb(arr: np.ndarray) -> bytes:
    """Encode uint16 [H, W, 3] as a 16-bit RGB PNG (Synthia's label format; PIL cannot)."""
    h, w, _ = arr.shape
    raw = np.zeros((h, 1 + w * 6), np.uint8)  # filter byte 0 per row
    raw[:, 1:] = arr.astype(">u2").view(np.uint8).reshape(h, w * 6)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1)) + chunk(b"IEND", b""))
