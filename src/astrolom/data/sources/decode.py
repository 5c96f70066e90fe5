"""Decoders: one record's payload (file bytes, Parquet cell, array row) -> (array, max_value, bands).

`max_value` is the full scale of integer pixels from encoded 8/16-bit images (255 / 65535), else None; `bands` are the
band names the payload carries, else None. A decoder raises `BadRecordError` for problems it recognises and lets the
libraries' own errors through; `Source` turns the exceptions listed in `DECODE_ERRORS` into a `BadRecordError` naming
the file and row (the original chained as its cause). Anything else is a bug and propagates.

Spectrum decoders (wavelength / flux / inverse-variance payloads) belong here too, and so does `PixelRecord`, the record
of an encoded 8/16-bit image that keeps its integer pixels.
"""

from __future__ import annotations

import gzip
import io
import warnings
from typing import Any

import numpy as np

from astrolom.data.records import Record
from astrolom.data.sources.errors import BadRecordError

Decoded = tuple[np.ndarray, "int | None", "tuple[str, ...] | None"]


def decode_encoded(data: bytes) -> Decoded:
    """JPEG/PNG bytes -> (H, W, C) integer pixels with their full scale (8/16-bit) or float pixels, and band names."""
    from PIL import Image

    if data is None or len(data) == 0:
        raise BadRecordError("", "file is empty (0 bytes)")
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # forces the decode: truncated / corrupt data raise here
        mode = im.mode
        if mode == "RGB":
            return np.asarray(im), 255, ("R", "G", "B")
        if mode == "L":
            return np.asarray(im)[:, :, None], 255, ("L",)
        if mode.startswith("I;16"):
            return np.asarray(im).astype(np.uint16)[:, :, None], 65535, ("L",)
        if mode in ("I", "F"):
            return np.asarray(im).astype(np.float32)[:, :, None], None, ("L",)
        return np.asarray(im.convert("RGB")), 255, ("R", "G", "B")


def peek_encoded(data: bytes) -> tuple[tuple[int, int, int], tuple[str, ...]]:
    """Shape and bands of an encoded image from its header, without decoding the pixels (same rules as
    `decode_encoded`)."""
    from PIL import Image

    if not data:
        raise BadRecordError("", "file is empty (0 bytes)")
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        grey = im.mode == "L" or im.mode.startswith("I;16") or im.mode in ("I", "F")
    return (h, w, 1 if grey else 3), (("L",) if grey else ("R", "G", "B"))


def _hdu_band(header, k: int) -> str:
    """Band name of one 2-D image HDU: BAND / FILTER / FILTNAM, else the cube cards when they name exactly one band
    (the Legacy Survey viewer writes a one-band cutout as a 2-D image with BANDS='g', BAND0='g' and no BAND card),
    else EXTNAME, else band{k}."""
    for key in ("BAND", "FILTER", "FILTNAM"):
        v = header.get(key)
        if isinstance(v, str) and v.strip():
            return v.strip()
    one = _cube_bands(header, 1)
    if one != ("band0",) and _cube_bands(header, 2) == ("band0", "band1"):  # names one band, not the first of many
        return one[0]
    v = header.get("EXTNAME")
    if isinstance(v, str) and v.strip():
        return v.strip()
    return f"band{k}"


def _cube_bands(header, n: int) -> tuple[str, ...]:
    """Band names of a (C, H, W) cube from its header: BAND0..BAND{n-1} (the Legacy Survey viewer's cutouts, which
    also write BANDS='grz'), BAND1..BANDn, FILTER1..FILTERn, or a BANDS string of n letters / n comma-separated
    names; else band0, band1, ..."""
    for key, first in (("BAND", 0), ("BAND", 1), ("FILTER", 1)):
        vals = [header.get(f"{key}{first + i}") for i in range(n)]
        if all(isinstance(v, str) and v.strip() for v in vals):
            return tuple(v.strip() for v in vals)
    bands = header.get("BANDS")
    if isinstance(bands, str):
        names = [b.strip() for b in bands.split(",")] if "," in bands else list(bands.strip())
        if len(names) == n and all(names):
            return tuple(names)
    return tuple(f"band{i}" for i in range(n))


# HDUs that are not pixels of the sky: the Legacy Survey viewer's cutouts may append inverse-variance and maskbits
# HDUs (its IMAGETYP keyword says which)
_NOT_IMAGE = ("INVVAR", "MASKBITS")


def decode_fits(data: bytes) -> Decoded:
    """FITS bytes (optionally gzipped) -> (H, W, C) float32 from 2-D image HDUs (stacked) or one (C, H, W) cube.

    HDUs whose IMAGETYP is INVVAR or MASKBITS (Legacy Survey viewer cutouts) are not image planes and are skipped.
    """
    from astropy.io import fits

    if data is None or len(data) == 0:
        raise BadRecordError("", "file is empty (0 bytes)")
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astropy's truncation warnings; the read below raises on real damage
        with fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False) as hdul:
            planes = []
            for k, hdu in enumerate(hdul):
                if not hasattr(hdu, "data"):  # astropy's stand-in for an HDU whose header it could not parse
                    raise BadRecordError("", f"HDU {k} is damaged: astropy cannot parse its header")
                if not hdu.is_image or hdu.data is None:
                    continue
                if str(hdu.header.get("IMAGETYP", "")).strip().upper() in _NOT_IMAGE:
                    continue
                arr = np.asarray(hdu.data)
                blank = hdu.header.get("BLANK")
                if arr.dtype.kind in "iu" and blank is not None:
                    arr = np.where(arr == blank, np.nan, arr.astype(np.float32))
                planes.append((arr.astype(np.float32), _hdu_band(hdu.header, k), hdu.header))
    if not planes:
        raise BadRecordError("", "no image data in any HDU")
    if len(planes) == 1 and planes[0][0].ndim == 3:  # one (C, H, W) cube
        cube, _, header = planes[0]
        return np.ascontiguousarray(cube.transpose(1, 2, 0)), None, _cube_bands(header, len(cube))
    if all(p[0].ndim == 2 for p in planes):
        shapes = {p[0].shape for p in planes}
        if len(shapes) > 1:
            raise BadRecordError("", f"image HDUs have different shapes {sorted(shapes)}")
        return np.stack([p[0] for p in planes], axis=-1), None, tuple(p[1] for p in planes)
    hint = ""
    if all(p[0].ndim == 1 for p in planes):
        hint = (
            "; 1-D HDUs look like a spectrum: pair spectra with images (a folder with images/ and spectra/, "
            "or spectra_dir=)"
        )
    raise BadRecordError(
        "",
        f"unsupported FITS layout: image HDUs of {[p[0].shape for p in planes]} (want 2-D bands or one C,H,W cube)"
        + hint,
    )


def decode_raw_f32(payload: tuple[bytes, list[int]]) -> Decoded:
    """(raw little-endian float32 bytes, [H, W, C]) -> the image (our Parquet layout, `astrolom.data.records`)."""
    data, shape = payload
    if data is None or len(data) == 0:
        raise BadRecordError("", "image is empty (0 bytes)")
    if shape is None or len(shape) not in (2, 3):
        raise BadRecordError("", f"image_shape {shape!r} is not [H, W, C]")
    n = int(np.prod(shape))
    if len(data) != 4 * n:
        raise BadRecordError("", f"image has {len(data)} bytes but image_shape {list(shape)} needs {4 * n}")
    return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32), None, None


def decode_array(arr: np.ndarray) -> Decoded:
    """An array row is already pixels."""
    return arr, None, None


class PixelRecord(Record):
    """A Record decoded from 8/16-bit encoded pixels (JPEG/PNG).

    Behaves like any Record; `image` (float32, pixels / max_value) is made on first access. The integer `pixels` stay
    available so that tokenisation can work on the 4x smaller array (see `astrolom.data.stream.TokenBatches`).
    """

    def __init__(
        self,
        object_id: str,
        image: np.ndarray | None = None,
        split: str | None = None,
        labels: dict[str, Any] | None = None,
        spectrum: np.ndarray | None = None,
        spectrum_ivar: np.ndarray | None = None,
        spectrum_mask: np.ndarray | None = None,
        *,
        pixels: np.ndarray | None = None,
        max_value: int = 255,
    ):
        self.object_id = object_id
        self.split = split
        self.labels = {} if labels is None else labels
        self.spectrum, self.spectrum_ivar, self.spectrum_mask = spectrum, spectrum_ivar, spectrum_mask
        self.pixels = pixels
        self.max_value = max_value
        self._image = image
        if image is None and pixels is None:
            raise ValueError("PixelRecord needs an image or pixels")

    @property
    def image(self) -> np.ndarray:  # type: ignore[override]
        if self._image is None:
            self._image = np.divide(self.pixels, np.float32(self.max_value), dtype=np.float32)
        return self._image

    @property
    def scale(self) -> float:
        """image = pixels * scale (up to float rounding: the image is computed as pixels / max_value)."""
        return 1.0 / self.max_value

    @image.setter
    def image(self, value: np.ndarray) -> None:
        self._image = value
        self.pixels = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple((self.pixels if self.pixels is not None else self._image).shape)
