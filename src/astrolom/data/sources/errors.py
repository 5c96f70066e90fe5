"""The bad-record policy's error type, and the exceptions that mean "this input is damaged" (not "this code is wrong").

A record that cannot be used raises `BadRecordError` naming the file, the row and the problem; `Source` then either
fails with it or, with `SourceOptions.skip_bad`, skips and lists the record (see `astrolom.data.sources`).
"""

from __future__ import annotations

import struct
import zlib
from functools import lru_cache


class BadRecordError(ValueError):
    """A record that cannot be used; the message names the file, the row (when there is one) and the problem."""

    def __init__(self, file: str, problem: str, row: int | None = None, object_id: str | None = None):
        self.file, self.problem, self.row, self.object_id = str(file), problem, row, object_id
        where = self.file if row is None else f"{self.file} row {row}"
        super().__init__(f"{where}: {problem}")


# What damaged input makes the decoders' libraries raise. Seen when truncating and corrupting JPEG / PNG / FITS /
# gzipped FITS bytes: OSError (PIL's UnidentifiedImageError and "image file is truncated", gzip's BadGzipFile,
# astropy), EOFError and zlib.error (gzip), TypeError (astropy on mangled header values). Documented by the libraries
# besides: ValueError, SyntaxError ("broken PNG file"), struct.error, IndexError / KeyError (astropy header access),
# PIL's DecompressionBombError and astropy's VerifyError. Anything else (AttributeError, NameError, ...) is a bug in
# our code and must not be hidden as a bad record.
_BUILTIN_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    EOFError,
    SyntaxError,
    struct.error,
    zlib.error,
    TypeError,
    IndexError,
    KeyError,
)


@lru_cache(maxsize=1)
def decode_errors() -> tuple[type[BaseException], ...]:
    """Exception classes that mean damaged input, for `except decode_errors() as err` around a decoder.

    A function (not a constant) so that Pillow and astropy are imported only when something is decoded.
    """
    from astropy.io.fits.verify import VerifyError
    from PIL import Image

    return (*_BUILTIN_DECODE_ERRORS, Image.DecompressionBombError, VerifyError)
