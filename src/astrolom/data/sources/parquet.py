"""Parquet shards: our layout (raw float32 `image` bytes + `image_shape`, `astrolom.data.records`) and encoded layouts
(an `image` column of JPEG/PNG bytes, or a Hugging Face Image struct `{bytes, path}` as in Smith42/galaxies, whose
`dr8_id` becomes the object id and whose other scalar columns become labels). A chunk is a row group."""

from __future__ import annotations

import collections
import json
from typing import Any

import numpy as np

from astrolom.data.records import IMAGE, IMAGE_SHAPE, METADATA_KEY, SPECTRUM, SPECTRUM_IVAR, SPECTRUM_MASK
from astrolom.data.sources.base import Chunk, Item, Source, bad_record
from astrolom.data.sources.conventions import ID_COLUMNS, is_local, norm_split, strip_ext
from astrolom.data.sources.decode import decode_encoded, decode_raw_f32, peek_encoded
from astrolom.data.sources.errors import decode_errors
from astrolom.data.sources.options import SourceOptions


class ParquetSource(Source):
    """Parquet shards, our layout (raw float32 + image_shape) or encoded JPEG/PNG (raw bytes or HF Image struct)."""

    format = "parquet"

    def __init__(self, location, fs, files, options: SourceOptions | None = None):
        super().__init__(location, fs, files, options)
        import pyarrow.parquet as pq

        self._pq = pq
        self._files_open: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._cached_chunk: tuple[int, Any] | None = None
        self.chunks = []
        self._chunk_pos: list[tuple[int, int, int]] = []  # (file index, row group, first row of the group in file)
        schema = None
        for fi, f in enumerate(files):
            pf = self._file(fi)
            md = pf.metadata
            if schema is None:
                schema = pf.schema_arrow
                raw_meta = (schema.metadata or {}).get(METADATA_KEY)
                if raw_meta:
                    try:
                        self.metadata = json.loads(raw_meta)
                    except ValueError:
                        self.metadata = {}
            start = 0
            for rg in range(md.num_row_groups):
                n = md.row_group(rg).num_rows
                if n:
                    self.chunks.append(Chunk(len(self.chunks), f, n, f"{f} row group {rg}"))
                    self._chunk_pos.append((fi, rg, start))
                start += n
        if schema is None:
            raise ValueError(f"{location}: no Parquet files")
        self._configure(schema)

    def _configure(self, schema) -> None:
        import pyarrow as pa

        names = schema.names
        self.image_col = self.options.image_key or IMAGE
        if self.image_col not in names:
            raise ValueError(
                f"{self.location}: no image column {self.image_col!r}; columns are {names}. "
                "Pass image_key (--image-key) to name it."
            )
        t = schema.field(self.image_col).type
        if pa.types.is_struct(t):
            if t.get_field_index("bytes") < 0:
                raise ValueError(f"{self.location}: image column is a struct without a 'bytes' field: {t}")
            self.layout = "hf-image-struct"
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
            self.layout = "raw-float32" if IMAGE_SHAPE in names else "encoded-bytes"
        else:
            raise ValueError(
                f"{self.location}: image column {self.image_col!r} has type {t}; expected raw float32 bytes with "
                f"{IMAGE_SHAPE!r}, JPEG/PNG bytes or a Hugging Face Image struct"
            )
        if self.options.id_column is not None:
            if self.options.id_column not in names:
                raise ValueError(f"{self.location}: no id column {self.options.id_column!r}; columns are {names}")
            self.id_col = self.options.id_column
        else:
            self.id_col = next((c for c in ID_COLUMNS if c in names), None)
        self.split_col = "split" if "split" in names else None
        skip = {self.image_col, IMAGE_SHAPE, SPECTRUM, SPECTRUM_IVAR, SPECTRUM_MASK, self.id_col, self.split_col}
        self.label_columns = []
        for name in names:
            if name in skip or name.startswith("__"):
                continue
            ft = schema.field(name).type
            if (
                pa.types.is_integer(ft)
                or pa.types.is_floating(ft)
                or pa.types.is_boolean(ft)
                or pa.types.is_string(ft)
                or pa.types.is_large_string(ft)
            ):
                self.label_columns.append(name)
        self.other_columns = [n for n in names if n not in skip and n not in self.label_columns]
        self.has_spectrum = SPECTRUM in names
        if self.has_spectrum:
            self._set_spectrum_grid(self.metadata.get("wavelength") or None)
        if self.layout == "raw-float32" and isinstance(self.metadata.get("bands"), list):
            self.bands = tuple(self.metadata["bands"])

    def _file(self, fi: int):
        pf = self._files_open.get(fi)
        if pf is None:
            f = self.files[fi]
            pf = self._pq.ParquetFile(f if is_local(self.fs) else self.fs.open(f, "rb"))
            self._files_open[fi] = pf
            while len(self._files_open) > 4:
                _, old = self._files_open.popitem(last=False)
                old.close()
        else:
            self._files_open.move_to_end(fi)
        return pf

    def _columns(self, i: int, columns: list[str]):
        fi, rg, _ = self._chunk_pos[i]
        pf = self._file(fi)
        present = [c for c in columns if c in pf.schema_arrow.names]
        return pf.read_row_group(rg, columns=present)

    def _chunk_keys(self, i):
        fi, rg, start = self._chunk_pos[i]
        cols = [c for c in (self.id_col, self.split_col) if c]
        t = self._columns(i, cols) if cols else None
        n = self.chunks[i].rows
        if self.id_col:
            ids = [str(v) for v in t.column(self.id_col).to_pylist()]
        else:
            stem = strip_ext(self.files[fi].rsplit("/", 1)[-1])
            ids = [f"{stem}:{start + r}" for r in range(n)]
        if self.split_col:
            where = self.chunks[i].where
            splits = [norm_split(s, where) for s in t.column(self.split_col).to_pylist()]
        else:
            splits = [self._split_for(x) for x in ids]
        return ids, splits

    def _chunk_table(self, i: int):
        if self._cached_chunk is not None and self._cached_chunk[0] == i:
            return self._cached_chunk[1]
        self._cached_chunk = None  # drop the previous chunk before reading the next one
        cols = [self.image_col] + self.label_columns
        cols.append(IMAGE_SHAPE)
        if self.options.spectra:
            cols += [SPECTRUM, SPECTRUM_IVAR, SPECTRUM_MASK]
        self.chunk_reads += 1
        t = self._columns(i, cols)
        self._cached_chunk = (i, t)
        return t

    def _items(self, i, rows):
        import pyarrow as pa

        fi, rg, start = self._chunk_pos[i]
        ids, splits = self.chunk_keys(i)
        t = self._chunk_table(i).take(pa.array(rows, type=pa.int64()))
        img = t.column(self.image_col).to_pylist()
        shapes = t.column(IMAGE_SHAPE).to_pylist() if self.layout == "raw-float32" else None
        spectra = t.column(SPECTRUM).to_pylist() if self.has_spectrum and SPECTRUM in t.column_names else None
        ivars = t.column(SPECTRUM_IVAR).to_pylist() if spectra is not None and SPECTRUM_IVAR in t.column_names else None
        masks = t.column(SPECTRUM_MASK).to_pylist() if spectra is not None and SPECTRUM_MASK in t.column_names else None
        labels = {c: t.column(c).to_pylist() for c in self.label_columns if c in t.column_names}
        f = self.files[fi]
        out = []
        for k, r in enumerate(rows):
            if self.layout == "raw-float32":
                payload = (img[k], shapes[k])
            elif self.layout == "hf-image-struct":
                payload = (img[k] or {}).get("bytes")
            else:
                payload = img[k]
            spec = ivar = mask = None
            if spectra is not None and spectra[k] is not None:
                spec = np.frombuffer(spectra[k], dtype="<f4").astype(np.float32)
                if ivars is not None and ivars[k] is not None:
                    ivar = np.frombuffer(ivars[k], dtype="<f4")
                if masks is not None and masks[k] is not None:
                    mask = np.frombuffer(masks[k], dtype=np.uint8)
            labels_k = {c: v[k] for c, v in labels.items()}
            out.append(Item(f, start + r, ids[r], splits[r], labels_k, payload, spec, ivar, mask))
        return out

    @property
    def _decoder(self):  # type: ignore[override]
        return decode_raw_f32 if self.layout == "raw-float32" else decode_encoded

    def _peek_one(self, item: Item):
        if self.layout == "raw-float32":
            return super()._peek_one(item)
        try:
            return peek_encoded(item.payload)
        except decode_errors() as err:
            return bad_record(item, err)

    @property
    def _parallel_decode(self):  # type: ignore[override]
        return self.layout != "raw-float32"

    def close(self):
        super().close()
        for pf in self._files_open.values():
            pf.close()
        self._files_open.clear()
        self._cached_chunk = None
