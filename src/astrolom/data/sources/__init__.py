"""Read any supported data set as a stream of `Record`s: `astrolom inspect --data PATH` summarises one.

Every command's `--data` goes through `open_source(path, format=None, options=None, **overrides)`, which detects (or is
told) the layout; how to read it is one `SourceOptions` (skip_bad, manifest, split_fractions, split_seed, id_column,
image_key, expect_shape, chunk_rows, threads, spectra, spectra_dir, wavelength, resample_spectra, bands), given whole
or as keyword overrides:

========== =================================================================================================
format      what `path` may be
========== =================================================================================================
images      a folder (searched recursively), glob or single file of JPEG/PNG cutouts (e.g. DESI viewer
            cutouts). 8-bit pixels become float32 in [0, 1] (value / 255; 16-bit PNG: / 65535); RGB(A)/P
            images give 3 channels (alpha dropped), greyscale 1. The object id is the file path relative
            to the folder without its extension.
fits        a folder / glob / file of `.fits`, `.fit`, `.fts` (optionally `.gz`), one object per file: either a
            multi-extension file with one 2-D band per image HDU (stacked in HDU order) or one (C, H, W) cube,
            transposed to (H, W, C) (Legacy Survey viewer cutouts: band names from BAND0.. / BANDS, INVVAR and
            MASKBITS HDUs skipped). Array rows are kept as astropy gives them (no flip).
npy         `.npy` of shape (N, H, W, C) (or (N, H, W)), read row by row from the file (memory-mapped when local).
npz         `.npz` holding `images` (N, H, W[, C]) and optionally `object_id`, `split` and 1-D label arrays.
hdf5        `.h5`/`.hdf5` with dataset `images` (or `image`, or `image_key`) (N, H, W[, C]), optional `object_id`
            (or `targetid`, ...), `split` and 1-D label datasets of length N. AstroCLIP layout: an aligned
            `spectrum` (N, L[, 1]) with a `wavelength` dataset / attribute, optional `spectrum_ivar`/`ivar`,
            `spectrum_mask` (N, L) and `has_spectrum` (rows where it is false get no spectrum).
parquet     a file, folder of `*.parquet` or glob. Our layout (raw float32 `image` bytes + `image_shape`, see
            `astrolom.data.records`) and encoded layouts: an `image` column of raw JPEG/PNG bytes or a Hugging
            Face Image struct `{bytes, path}` (the Smith42/galaxies layout: `dr8_id` is used as object id and
            the other scalar columns become labels). Our `spectrum`, `spectrum_ivar`, `spectrum_mask` columns
            (grid in the metadata) go into the record.
paired      images (a folder of JPEG/PNG or FITS cutouts, as above) paired by object id with one FITS spectrum
            per object: `open_source(images, spectra_dir=spectra)`, or a folder holding `images/` and `spectra/`
            (detected). FITS spectra: WAVELENGTH/FLUX/IVAR/MASK image HDUs, a table with wavelength (or
            loglam)/flux/ivar/mask columns (SDSS/BOSS spec-*.fits: COADD loglam/flux/ivar/and_mask, redshift
            from SPECOBJ; ESO Phase 3: one row of WAVE/FLUX/ERR/QUAL array cells, ivar = 1/ERR^2), or DESI
            per-camera coadds (B_/R_/Z_ WAVELENGTH/FLUX/IVAR/MASK, arms merged inverse-variance-weighted); a
            `coadd-*.fits` holding many targets pairs each FIBERMAP TARGETID with the image of that name. See
            `astrolom.data.sources.spectra` and `.desi`; docs/data.md lists the real files each is tested on.
========== =================================================================================================

Paths may be local or any fsspec URL (`file://`, `memory://`, `s3://`, ...). Records without a split column get
`records.split_of(object_id, split_fractions, split_seed)`. Numeric arrays (FITS, npy, npz, HDF5, our Parquet) are
returned in their own units as float32; only encoded 8/16-bit images are rescaled to [0, 1].

**Streaming.** A Source is a list of *chunks* (a Parquet row group, or a block of `chunk_rows` files or array rows).
`chunk_keys(i)` gives the chunk's (object ids, splits) without touching any image, so split filtering and DDP rank
assignment are cheap; `read(i, rows)` decodes just the selected rows. Memory is bounded by one chunk's encoded
payload plus the rows being decoded.

**Decoding.** JPEG/PNG decode runs in a small thread pool (`threads`, default min(4, cores); PIL releases the GIL);
results keep their order, so output is deterministic. 8-bit images come back as `PixelRecord`s, which keep the uint8
pixels and compute the float32 `image` on first access (tokenisation works on the 4x smaller uint8 array).

**Masked pixels.** Non-finite pixels (NaN/inf, FITS BLANK) are replaced by the median of the finite pixels of the
same band; the totals are kept in `source.masked_pixels` / `source.masked_records` and shown by `inspect`.
A band with no finite pixel at all makes the record bad.

**Bad input.** A record that cannot be decoded (0-byte or truncated file, corrupt JPEG/PNG/FITS, all-NaN band) or
whose shape does not match the data set (the most common shape among the first records, or `expect_shape`) raises
`BadRecordError` (a ValueError) naming the file, the row (Parquet/HDF5/arrays) and the problem, with the library's
own exception as its `__cause__`. With
`skip_bad=True` the record is skipped instead: counted in `source.skipped`, listed in `source.bad`, appended as one
JSON line `{"file", "row", "object_id", "reason", "dropped": "record"}` to `manifest` (when given) and summarised in
the log. A bad *spectrum* with a good image drops only the spectrum: the record goes on image-only (`spectrum` None,
like an object without one), counted in `source.spectra_dropped`, listed in `source.bad_spectra` and in the manifest
with `"dropped": "spectrum"`. Nothing is dropped silently.

**Bands by name.** `bands=("g", "r", "z")` (`data.bands=g,r,z`, `inspect --bands`) keeps those bands in that order
from every record, matched by the names the file gives (FITS headers, the data set's metadata): a grz model reads
griz (DR10) cutouts. A file without one of them is a bad record naming the file, the missing band and the bands it has.

**Spectra.** Every spectrum ends up on one reference grid (`wavelength`, the model's; default: the data set's own or
the first spectrum file's), published as `source.metadata["wavelength"]`: another grid is resampled flux-conserving
(`resample_spectra=True`) or refused naming the file and both grids. All-NaN flux, all-zero ivar, wrong length and a
non-increasing wavelength grid make a bad record (below). `record.spectrum` has NaN wherever a pixel carries no
information; `record.spectrum_ivar` / `spectrum_mask` come with it. A spectrum that covers only part of the reference
grid keeps the overlap (the rest is masked) and its record gets the label `spectrum_coverage` (fraction of the grid
covered; set for every spectrum that was not on the reference grid), listed in `source.partial_spectra`, logged and
shown by `inspect`. Labels a spectrum file carries (an SDSS `SPECOBJ` redshift) join the record's labels.

**Modules.** `errors` (BadRecordError, which exceptions mean damaged input) · `base` (SourceOptions, Source with the
bad-record policy, PixelRecord, Chunk, file-name conventions) · `decode` (JPEG/PNG/FITS/raw-float32 payload ->
pixels) · `files` (one record per file: images, fits, paired) · `arrays` (npy, npz, HDF5) · `parquet` (ours, encoded,
Smith42/HF) · `spectra` (FITS spectra, the reference grid, bad spectra) · `desi` (DESI per-camera coadds: arms
merged, targets by TARGETID) · `open` (format detection, the READERS registry, `open_source`) · `cli`
(`astrolom inspect`). New readers get a module beside these and an entry in `open.READERS`.
"""

from astrolom.data.sources.arrays import Hdf5Source, NpySource, NpzSource
from astrolom.data.sources.base import Chunk, Source
from astrolom.data.sources.cli import add_arguments, run
from astrolom.data.sources.decode import PixelRecord
from astrolom.data.sources.errors import BadRecordError
from astrolom.data.sources.files import FitsDirSource, ImageDirSource, PairedSource
from astrolom.data.sources.open import FORMATS, READERS, detect_format, open_source
from astrolom.data.sources.options import DEFAULT_CHUNK_ROWS, SourceOptions
from astrolom.data.sources.parquet import ParquetSource
from astrolom.data.sources.spectra import SpectrumGrid, read_fits_spectrum

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "FORMATS",
    "READERS",
    "BadRecordError",
    "Chunk",
    "FitsDirSource",
    "Hdf5Source",
    "ImageDirSource",
    "NpySource",
    "NpzSource",
    "PairedSource",
    "ParquetSource",
    "PixelRecord",
    "Source",
    "SourceOptions",
    "SpectrumGrid",
    "add_arguments",
    "detect_format",
    "open_source",
    "read_fits_spectrum",
    "run",
]
