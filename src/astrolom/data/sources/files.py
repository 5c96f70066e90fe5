"""One file per record: folders / globs of JPEG/PNG cutouts (`images`), of FITS files (`fits`), and image files paired
with a folder of FITS spectra (one per object, or DESI coadds holding many) by object id (`paired`)."""

from __future__ import annotations

import logging

from astrolom.data.sources.base import Chunk, Item, Source, bad_record
from astrolom.data.sources.conventions import is_local, kind_of, strip_ext
from astrolom.data.sources.decode import decode_encoded, decode_fits, peek_encoded
from astrolom.data.sources.errors import BadRecordError, decode_errors
from astrolom.data.sources.options import SourceOptions
from astrolom.data.sources.spectra import SpectrumRef, read_fits_spectrum, spectrum_refs
from astrolom.data.spectra import Spectrum

log = logging.getLogger("astrolom.data")


class _FileSource(Source):
    """One file per record (JPEG/PNG or FITS); a chunk is a block of `chunk_rows` files."""

    def __init__(self, location, fs, files, root: str | None, options: SourceOptions | None = None):
        super().__init__(location, fs, files, options)
        self.root = root
        self._local = is_local(fs)
        self.ids = [self._id_of(f) for f in files]
        n = self.chunk_rows
        self.chunks = [
            Chunk(k, files[s], min(n, len(files) - s), f"files {s}..{min(s + n, len(files)) - 1}")
            for k, s in enumerate(range(0, len(files), n))
        ]

    def _id_of(self, f: str) -> str:
        rel = f
        if self.root and f.startswith(self.root.rstrip("/") + "/"):
            rel = f[len(self.root.rstrip("/")) + 1 :]
        else:
            rel = f.rsplit("/", 1)[-1]
        return strip_ext(rel)

    def _chunk_keys(self, i):
        s = i * self.chunk_rows
        ids = self.ids[s : s + self.chunks[i].rows]
        return ids, [self._split_for(x) for x in ids]

    def _items(self, i, rows):
        s = i * self.chunk_rows
        self.chunk_reads += 1
        out = []
        for r in rows:
            f = self.files[s + r]
            oid = self.ids[s + r]
            out.append(Item(f, None, oid, self._split_for(oid), {}, f))
        return out

    def _read(self, path: str) -> bytes:
        if self._local:  # the builtin open: fsspec's local file object costs ~3 % of a 512x512 JPEG decode
            with open(path, "rb") as fh:
                return fh.read()
        with self.fs.open(path, "rb") as fh:
            return fh.read()

    def _decode_one(self, item: Item):
        try:
            data = self._read(item.file)
        except OSError as err:  # unreadable file (permissions, vanished, remote error): a bad record
            return bad_record(item, err, "cannot read")
        return super()._decode_one(Item(item.file, None, item.object_id, item.split, {}, data))


class ImageDirSource(_FileSource):
    format = "images"
    _decoder = staticmethod(decode_encoded)
    _parallel_decode = True

    def _peek_one(self, item: Item):
        try:
            return peek_encoded(self._read(item.file))
        except decode_errors() as err:
            return bad_record(item, err, "cannot read")


class FitsDirSource(_FileSource):
    format = "fits"
    _decoder = staticmethod(decode_fits)


class PairedSource(_FileSource):
    """Image files (JPEG/PNG or FITS) paired with FITS spectra in another folder, by object id.

    The object id is the file's path relative to its folder without the extension, in both folders
    (`images/obj1.png` + `spectra/obj1.fits`), except for multi-target DESI coadds in the spectra folder
    (`coadd-*.fits`): each of their targets pairs with the image named by its TARGETID (`images/39627...png`).
    Objects without a spectrum keep their image (no spectrum); spectra without an image are counted in
    `unpaired_spectra`, and ids found twice in `duplicate_spectra` (the first file in path order is used); both logged.
    """

    format = "paired"
    _parallel_decode = True

    def __init__(self, location, fs, files, root: str | None, options: SourceOptions | None = None, *, spectra_root):
        super().__init__(location, fs, files, root, options)
        self.spectra_root = str(spectra_root).rstrip("/")
        self.spectrum_refs: dict[str, SpectrumRef] = {}
        self.duplicate_spectra: list[str] = []
        if self.options.spectra:
            self.spectrum_refs, self.duplicate_spectra = spectrum_refs(
                fs, self.spectra_root, self._open, self._bad_record
            )
        ids = set(self.ids)
        self.unpaired_spectra = sorted(k for k in self.spectrum_refs if k not in ids)
        if self.unpaired_spectra:
            log.warning(
                "%s: %d spectrum(s) have no image (first: %s)",
                self.spectra_root,
                len(self.unpaired_spectra),
                self.spectrum_refs[self.unpaired_spectra[0]],
            )
        if self.duplicate_spectra:
            log.warning(
                "%s: %d object id(s) have more than one spectrum; the first file in path order is used (first: %s)",
                self.spectra_root,
                len(self.duplicate_spectra),
                self.duplicate_spectra[0],
            )
        self._set_first_grid()

    def _open(self, path: str):
        return open(path, "rb") if self._local else self.fs.open(path, "rb")

    def _read_spectrum(self, ref: SpectrumRef) -> Spectrum:
        if ref.row is None:
            return read_fits_spectrum(self._read(ref.file), ref.file)
        with self._open(ref.file) as fh:  # one target of a coadd: read only its rows
            return read_fits_spectrum(fh, ref.file, ref.row)

    def _set_first_grid(self) -> None:
        """The reference grid, unless given: the grid of the first readable spectrum (in object-id order)."""
        if self.spectrum_grid.wavelength is not None:
            self._set_spectrum_grid()
            return
        for oid in sorted(k for k in self.spectrum_refs if k not in set(self.unpaired_spectra))[:8]:
            try:
                spec = self._read_spectrum(self.spectrum_refs[oid])
            except decode_errors():  # a bad first file is reported when its record is read
                continue
            self._set_spectrum_grid(spec.wavelength)
            return

    def _items(self, i, rows):
        items = super()._items(i, rows)
        for it in items:
            it.spectrum = self.spectrum_refs.get(it.object_id)  # read with the image, in the pool
        return items

    def _decode_one(self, item: Item):
        if isinstance(item.spectrum, SpectrumRef):
            ref = item.spectrum
            try:
                item.spectrum = self._read_spectrum(ref)
            except decode_errors() as err:  # the record's spectrum is bad, not (yet) the record: see Source._spectrum
                if isinstance(err, BadRecordError):
                    item.spectrum = BadRecordError(ref.file, err.problem, ref.row, item.object_id)
                else:
                    problem = f"cannot read spectrum: {type(err).__name__}: {err}"
                    item.spectrum = BadRecordError(ref.file, problem, ref.row, item.object_id)
                item.spectrum.__cause__ = err
        try:
            data = self._read(item.file)
        except OSError as err:
            return bad_record(item, err, "cannot read")
        decoder = decode_fits if kind_of(item.file) == "fits" else decode_encoded
        try:
            return decoder(data)
        except decode_errors() as err:
            return bad_record(item, err)
