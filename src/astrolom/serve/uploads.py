"""Checks on an uploaded cutout that run on its header, before any pixel is decoded.

Every format the explorer accepts (PNG, JPEG, FITS, .npy) declares its dimensions up front; an upload that declares
more than `max_pixels` per band, or more bands than any survey has, is refused from that declaration, so a small
compressed file cannot make the server allocate a huge array.
"""

from __future__ import annotations

import io
import math

MAX_BANDS = 16  # more planes than this is not a survey cutout


class UploadError(ValueError):
    """An upload refused with an HTTP status (4xx) and a message for the person who sent it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def declared_size(data: bytes, ext: str) -> tuple[int, int, int] | None:
    """(height, width, bands) an image file declares in its header (largest band of a multi-HDU FITS file), or None
    for a format without one; an UploadError (400) when the header cannot be parsed."""
    try:
        if ext in (".png", ".jpg"):
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                return h, w, len(im.getbands())
        if ext == ".npy":
            from numpy.lib import format as npformat

            f = io.BytesIO(data)
            version = npformat.read_magic(f)
            read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
            shape, _, _ = read(f)
            shape = shape[1:] if len(shape) == 4 else shape  # a stack: its first cutout is the query
            dims = [d for d in shape if d > MAX_BANDS] or [1]
            h, w = dims[0], dims[1] if len(dims) > 1 else 1
            return h, w, max(1, math.prod(shape) // max(1, h * w))
        if ext == ".fits":
            return _fits_size(data)
    except UploadError:
        raise
    except Exception as err:  # a header that cannot be parsed is a malformed upload
        raise UploadError(400, f"malformed {ext.lstrip('.')} upload: {err}") from err
    return None


def _fits_size(data: bytes) -> tuple[int, int, int]:
    """(height, width, bands) from the headers of a FITS file's image HDUs; the data is never read."""
    from astropy.io import fits

    h = w = bands = 0
    with fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=True) as hdul:
        for k, hdu in enumerate(hdul):
            if k >= 4 * MAX_BANDS:
                raise UploadError(413, f"FITS upload with more than {4 * MAX_BANDS} HDUs")
            naxis = int(hdu.header.get("NAXIS", 0) or 0)
            if naxis < 2 or not hdu.is_image:
                continue
            dims = [int(hdu.header.get(f"NAXIS{i}", 0) or 0) for i in range(1, naxis + 1)]
            # FITS lists axes fastest first: NAXIS1 = width, NAXIS2 = height, NAXIS3 = bands of a cube
            if dims[0] * dims[1] > h * w:
                w, h = dims[0], dims[1]
            bands += max(1, math.prod(dims[2:]))
    if not bands:
        raise UploadError(400, "FITS upload without a 2-D image HDU")
    return h, w, bands


def check_dimensions(data: bytes, ext: str, max_pixels: int) -> None:
    """An UploadError (413) when an image declares more than `max_pixels` per band or more than MAX_BANDS bands."""
    size = declared_size(data, ext)
    if size is None:
        return
    h, w, bands = size
    if h * w > max_pixels:
        raise UploadError(413, f"image of {w}x{h} pixels exceeds the {max_pixels}-pixel limit")
    if bands > MAX_BANDS:
        raise UploadError(413, f"image with {bands} bands exceeds the {MAX_BANDS}-band limit")
