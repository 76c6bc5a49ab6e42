"""Image bytes -> checked RGB PIL image. Errors are `ImageError`s whose message names the cause.

Sources: raw bytes, a local path, `s3://` (fsspec/s3fs), `data:` URIs (online), and `http(s)://`
through the guarded fetcher in `pipeline.fetch` (a security boundary; off unless enabled).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import FetchConfig, LimitsConfig, StorageConfig
from .errors import FetchError, ImageError, LimitsError
from .fetch import fetch_url
from .storage import storage_options

# We check pixel counts ourselves (limits.max_pixels) before decoding; PIL's own bomb guard
# would otherwise raise or warn with its global default first.
Image.MAX_IMAGE_PIXELS = None


def _read_capped(f, max_bytes: int, what: str) -> bytes:
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise LimitsError(f"{what} is larger than limits.max_image_bytes={max_bytes}")
    return data


def load_bytes(
    source: bytes | str,
    limits: LimitsConfig,
    fetch: FetchConfig,
    storage: StorageConfig,
    *,
    local_ok: bool = True,
) -> bytes:
    """Return the encoded bytes of one image source, capped at limits.max_image_bytes.

    `local_ok=False` (the online endpoint) accepts only data: and http(s):// URLs, so a client
    cannot make the server read its own files or buckets.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > limits.max_image_bytes:
            raise LimitsError(f"{len(data)} bytes exceeds limits.max_image_bytes={limits.max_image_bytes}")
        return data
    if not isinstance(source, str) or not source:
        raise ImageError(f"no image: expected bytes or a path/URL, got {type(source).__name__}")
    scheme = source.split(":", 1)[0].lower() if "://" in source or source.startswith("data:") else ""
    if scheme == "data":
        return _decode_data_uri(source, limits)
    if scheme in ("http", "https"):
        return fetch_url(source, fetch, limits.max_image_bytes)
    if not local_ok:
        raise FetchError(f"only data: and http(s):// image URLs are accepted, got {source[:80]!r}")
    if scheme == "":
        _check_regular_file(source)
    if scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs") or scheme == "":
        import fsspec

        opts = storage_options(storage, timeout_s=fetch.timeout_s) if scheme.startswith("s3") else {}
        try:
            with fsspec.open(source, "rb", **opts) as f:
                return _read_capped(f, limits.max_image_bytes, source)
        except ImageError:
            raise
        except FileNotFoundError:
            raise FetchError(f"not found: {source}") from None
        except Exception as e:  # permissions, a missing bucket, no credentials, a timeout...
            reason = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
            raise FetchError(f"cannot read {source}: {type(e).__name__}: {reason}") from None
    raise FetchError(f"unsupported URL scheme {scheme!r} in {source[:80]!r}; use a path, s3://, http(s):// or data:")


def _check_regular_file(path: str) -> None:
    """Only regular files are read: opening a FIFO nobody writes to (or a device) never returns."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FetchError(f"not found: {path}") from None
    except OSError as e:
        raise FetchError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise FetchError(f"{path} is {kind}, not a regular file")


def _decode_data_uri(uri: str, limits: LimitsConfig) -> bytes:
    header, _, payload = uri.partition(",")
    if ";base64" not in header:
        raise ImageError("data: URI must be base64-encoded (data:image/png;base64,...)")
    # base64 is 4/3 of the raw size: refuse before decoding anything oversized.
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise LimitsError(f"data: URI exceeds limits.max_image_bytes={limits.max_image_bytes}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("invalid base64 in data: URI") from None


def decode_image(data: bytes, limits: LimitsConfig) -> Image.Image:
    """Decode and check one image; return it upright (EXIF) in RGB, first frame of animations."""
    if not data:
        raise ImageError("empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("cannot identify image file") from None
    except Exception as e:  # PIL raises a zoo of errors on malformed headers
        raise _corrupt(None, e) from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"{w}x{h} has no pixels")
    if w * h > limits.max_pixels:
        raise LimitsError(f"{w}x{h} exceeds limits.max_pixels={limits.max_pixels}")
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise LimitsError(f"{w}x{h} aspect ratio exceeds limits.max_aspect_ratio={limits.max_aspect_ratio:g}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-with-transparency etc. are handled below
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageError:
        raise
    except Exception as e:
        raise _corrupt(img.format, e) from None


def _corrupt(fmt: str | None, e: Exception) -> ImageError:
    return ImageError(f"truncated or corrupt {fmt + ' ' if fmt else ''}data: {type(e).__name__}: {e}")


# Modes PIL converts to RGB as a viewer shows them; the high-bit-depth ones are scaled first.
_CONVERTIBLE = {"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LA", "La", "PA", "HSV"}
_HIGH_DEPTH = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale -> 8 bits, as viewers show them: floats in 0..1 as
    0..255, anything else stretched from 0 (or its minimum, when negative) to its maximum."""
    arr = np.asarray(img, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ImageError(f"mode {img.mode} image holds NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    else:
        lo = min(lo, 0.0)
        hi = max(hi, lo + 1.0)
    return Image.fromarray(np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _HIGH_DEPTH:
        img = _to_8bit(img)
    elif img.mode not in _CONVERTIBLE:
        raise ImageError(f"mode {img.mode} images are not supported; convert them to RGB (or 8/16-bit greyscale)")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(
    source: bytes | str,
    limits: LimitsConfig,
    fetch: FetchConfig,
    storage: StorageConfig,
    *,
    local_ok: bool = True,
) -> Image.Image:
    return decode_image(load_bytes(source, limits, fetch, storage, local_ok=local_ok), limits)
