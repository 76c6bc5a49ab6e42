"""Image bytes -> checked, upright RGB PIL image. Errors are `ImageError`s whose message names the cause.

Sources: raw bytes, a local path, `s3://` (fsspec/s3fs), `data:` URIs (online), and `http(s)://`
through the guarded fetcher in `pipeline.fetch` (a security boundary; off unless enabled).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import stat
import struct
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from .config import FetchConfig, LimitsConfig, StorageConfig
from .errors import FetchError, ImageError, LimitsError, one_line
from .fetch import fetch_url
from .pixels import Decoded, Fits
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
            raise FetchError(f"cannot read {source}: {one_line(e)}") from None
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


def _open_checked(data: bytes, limits: LimitsConfig) -> Image.Image:
    """Open one image as far as its header and check its size against the limits."""
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
    return img


def read_header(data: bytes, limits: LimitsConfig) -> tuple[int, int]:
    """The checks `decode_image` makes before decoding (its mode too), and the upright (height,
    width) it would return, from the header alone (`llava-ray plan`): what corrupt pixel data
    would do is known only by decoding it."""
    img = _open_checked(data, limits)
    try:
        img.seek(0)
        if img.format == "PNG" and "exif" not in img.info and not _png_metadata_after_pixels(data):
            # PIL decodes a PNG to look for an eXIf chunk after its pixels: there is none, so the
            # metadata read with the header is all getexif() would find (base class: no decode).
            size = _upright(img, Image.Image.getexif(img))
        else:
            size = _upright(img)
    except Exception as e:
        raise _corrupt(img.format, e) from None
    _check_mode(img.mode)
    return size


def _png_metadata_after_pixels(data: bytes) -> bool:
    """Whether a chunk that can carry EXIF or XMP follows the first IDAT, or the chunks end
    before IEND (then decoding says what is wrong): the chunk lengths are walked, nothing inflated."""
    pos, pixels = 8, False
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IEND":
            return False
        pixels = pixels or kind == b"IDAT"
        if pixels and kind in (b"eXIf", b"tEXt", b"zTXt", b"iTXt"):
            return True
        pos += 12 + length
    return True


def decode_image(data: bytes, limits: LimitsConfig, fits: Fits | None = None) -> Decoded:
    """Decode and check one image; return it upright (EXIF) in RGB, first frame of animations.

    With `fits` (pipeline.pixels), a large photo is decoded reduced as far as `fits` allows,
    after the checks on its header size: a JPEG at 1/2, 1/4 or 1/8 scale in the DCT (most of the
    decoding work is skipped), anything else decoded in full and box-reduced by an integer factor.
    """
    img = _open_checked(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-with-transparency etc. are handled below
            img.seek(0)
            size = _upright(img)
            scale = _draft(img, size, fits) if fits and isinstance(img, JpegImageFile) else 1
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of an upright photo
            img = _to_rgb(img)
            if fits and scale == 1:
                scale = _largest(size, fits, range(2, min(size) + 1))
                if scale > 1:
                    img = img.reduce(scale)
            return Decoded(img, size, scale)
    except ImageError:
        raise
    except Exception as e:
        raise _corrupt(img.format, e) from None


def _upright(img: Image.Image, exif: Image.Exif | None = None) -> tuple[int, int]:
    """(height, width) as shown: EXIF orientations 5-8 store the picture turned a quarter turn."""
    w, h = img.size
    exif = img.getexif() if exif is None else exif
    return (w, h) if exif.get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8) else (h, w)


def _largest(size: tuple[int, int], fits: Fits, factors) -> int:
    """The largest of `factors` (ascending) that fits, with every smaller one: 1 if none does."""
    best = 1
    for f in factors:
        if not fits(size, (-(-size[0] // f), -(-size[1] // f))):  # each side rounded up, as PIL does
            break
        best = f
    return best


def _draft(img: JpegImageFile, size: tuple[int, int], fits: Fits) -> int:
    """Ask the JPEG decoder for the smallest DCT scale that fits; the scale it will decode at."""
    scale = _largest(size, fits, (2, 4, 8))
    if scale == 1:
        return 1
    w, h = img.size
    drafted = img.draft(None, (w // scale, h // scale))  # PIL picks the largest scale keeping this size
    return scale if drafted is not None else 1  # None: a layout PIL cannot draft; reduced after decoding


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


def _check_mode(mode: str) -> None:
    if mode not in _HIGH_DEPTH and mode not in _CONVERTIBLE:
        raise ImageError(f"mode {mode} images are not supported; convert them to RGB (or 8/16-bit greyscale)")


def _to_rgb(img: Image.Image) -> Image.Image:
    _check_mode(img.mode)
    if img.mode in _HIGH_DEPTH:
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img
