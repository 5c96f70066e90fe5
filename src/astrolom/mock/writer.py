"""Writing a mock survey: objects rendered in parallel into Parquet shards plus a `_survey.json` summary.

`generate_survey` renders objects in worker processes (each chunk of objects is a pure function of the seed and
its indices) and streams them into `shard-00000.parquet`, ... (zstd, row groups of <= 256 rows); each shard is
written under a temporary name and renamed when complete. The shards' Arrow schema carries the data set's metadata
(`astrolom` key): bands, pixel scale, units, the spectrum grid, the label descriptions, and the facts a reader
of the mock needs without importing it (`vote_volunteers`: the number of volunteers behind each vote fraction;
`emission_lines`: rest-frame vacuum wavelengths of the lines the spectra carry).
`generate_objects` renders the same objects in memory as `Record`s.

**JPEG mode** (`--format jpeg [--jpeg-size 512]`): the stamps as the paper's data were made, 8-bit RGB JPEGs rendered
from g, r, z as the Legacy Survey viewer renders them (`astrolom.data.display.viewer_jpeg`, the viewer's `ls-dr9`
layer: the same scaling for north and south), stored in the Smith42/galaxies Parquet layout (`image` =
`{bytes, path}`) with the labels and spectra. `--size 512` gives the paper's 512x512 at 0.262"/px.
"""

from __future__ import annotations

import fnmatch
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astrolom.data.display import JPEG_QUALITY, viewer_jpeg
from astrolom.data.records import (
    DEFAULT_SPLIT_FRACTIONS,
    IMAGE,
    IMAGE_SHAPE,
    METADATA_KEY,
    SPECTRUM,
    SPECTRUM_IVAR,
    SPECTRUM_MASK,
    Record,
    check_split_fractions,
)
from astrolom.data.spectra import Spectrum
from astrolom.layout import atomic_directory
from astrolom.log import progress as progress_bar
from astrolom.mock.catalogue import LINES, N_VOLUNTEERS, catalogue_row, sample_catalogue
from astrolom.mock.images import render_image
from astrolom.mock.instruments import (
    BANDS,
    INSTRUMENT_EFFECTS,
    PIXEL_SCALE,
    SKY_MAG,
    SPEC_START,
    SPEC_STEP,
    SPEC_STOP,
    SPEC_UNITS,
    TELESCOPES,
    ZERO_POINT,
    check_instrument,
    check_spectrum_aperture,
    spectrum_wavelength,
)
from astrolom.mock.labels import BOOL_LABELS, INT_LABELS, LABELS, STR_LABELS
from astrolom.mock.spectra import observe_spectrum
from astrolom.mock.summary import RunningStats, survey_summary
from astrolom.mock.tables import get_tables, init_worker

IMAGE_FORMATS = ("flux", "jpeg")  # how stamps are stored: float32 nanomaggies, or viewer-rendered 8-bit JPEGs
SURVEY_JSON = "_survey.json"  # the summary beside the shards ('_': pyarrow.parquet.read_table(dir) skips it)
JPEG_LAYER = "ls-dr9"  # the viewer layer whose rendering the JPEGs follow (astrolom.data.display.VIEWER_LAYERS)


@dataclass
class SurveyConfig:
    """Settings of one generated survey (the physics is fixed by the constants of the mock's modules)."""

    n: int = 2000
    size: int = 64
    seed: int = 0
    workers: int | None = None  # None: os.cpu_count()
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS
    shard_size: int = 1000
    # north/south instrument differences that are on (see INSTRUMENT_EFFECTS); () makes both telescopes alike
    instrument: tuple[str, ...] = INSTRUMENT_EFFECTS
    # 'fiber': spectra carry the light a 1.5" DESI fibre collects; 'total': the whole galaxy's (SPECTRUM_APERTURES)
    spectrum_aperture: str = "fiber"
    # 'flux': float32 g, r, z in nanomaggies; 'jpeg': 8-bit RGB JPEGs rendered as the Legacy Survey viewer renders
    # them (astrolom.data.display.viewer_jpeg), the form of the paper's training data (IMAGE_FORMATS)
    image_format: str = "flux"
    jpeg_size: int | None = None  # JPEG pixels per side (the paper's: 512); None: the stamp size

    def validate(self) -> SurveyConfig:
        self.instrument = check_instrument(self.instrument)
        self.spectrum_aperture = check_spectrum_aperture(self.spectrum_aperture)
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"--format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.jpeg_size is not None and self.image_format != "jpeg":
            raise ValueError("--jpeg-size needs --format jpeg")
        if self.jpeg_size is not None and not 16 <= self.jpeg_size <= 1024:
            raise ValueError(f"--jpeg-size must be in 16..1024 pixels, got {self.jpeg_size}")
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if not (32 <= self.size <= 512 and self.size % 2 == 0):
            raise ValueError(f"--size must be an even number of pixels in 32..512, got {self.size}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        self.split_fractions = check_split_fractions(self.split_fractions, "--split-fractions")
        return self


def render_object(obj: Mapping[str, Any], size: int = 64, noise: bool = True) -> tuple[np.ndarray, Spectrum | None]:
    """(image (size, size, 3) float32, observed `Spectrum` or None) for one catalogue row; deterministic."""
    return render_image(obj, size, noise=noise), observe_spectrum(obj, noise=noise)


def _spectrum_columns(spec: Spectrum | None) -> tuple[bytes | None, bytes | None, bytes | None]:
    if spec is None:
        return None, None, None
    return (
        spec.flux.astype("<f4").tobytes(),
        spec.ivar.astype("<f4").tobytes(),
        spec.mask.astype(np.uint8).tobytes(),
    )


def _render_chunk(task: tuple) -> dict[str, Any]:
    """Objects start..stop-1 of one task (start, stop, seed, size, fractions, instrument, aperture, image_format,
    jpeg_size) rendered into column lists."""
    start, stop, seed, size, fractions, instrument, aperture, image_format, jpeg_size = task
    cat = sample_catalogue(
        stop - start,
        seed=seed,
        start=start,
        split_fractions=fractions,
        instrument=instrument,
        spectrum_aperture=aperture,
    )
    images, spectra = [], []
    for j in range(stop - start):
        row = catalogue_row(cat, j)
        img, spec = render_object(row, size)
        if image_format == "jpeg":  # the Hugging Face Image struct of the Smith42/galaxies layout
            images.append({"bytes": viewer_jpeg(img, BANDS, JPEG_LAYER, jpeg_size), "path": f"{row['object_id']}.jpg"})
        else:
            images.append(img.astype("<f4").tobytes())
        spectra.append(_spectrum_columns(spec))
    out = {k: v for k, v in cat.items() if k in ("object_id", "split") or k in LABELS}
    out[IMAGE] = images
    out[SPECTRUM], out[SPECTRUM_IVAR], out[SPECTRUM_MASK] = (list(col) for col in zip(*spectra, strict=True))
    return out


def generate_objects(
    n: int,
    size: int = 64,
    seed: int = 0,
    start: int = 0,
    noise: bool = True,
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
    instrument: tuple[str, ...] = INSTRUMENT_EFFECTS,
    spectrum_aperture: str = "fiber",
) -> list[Record]:
    """Render objects start..start+n-1 in memory (single process) as `Record`s, identical to the shards' rows."""
    cat = sample_catalogue(
        n,
        seed=seed,
        start=start,
        split_fractions=split_fractions,
        instrument=instrument,
        spectrum_aperture=spectrum_aperture,
    )
    records = []
    for j in range(n):
        row = catalogue_row(cat, j)
        img, spec = render_object(row, size, noise=noise)
        labels = {k: row[k] for k in LABELS}
        records.append(
            Record(
                object_id=row["object_id"],
                image=img,
                split=row["split"],
                labels=labels,
                spectrum=None if spec is None else spec.flux,
                spectrum_ivar=None if spec is None else spec.ivar,
                spectrum_mask=None if spec is None else spec.mask,
            )
        )
    return records


def _arrow_schema(metadata: dict[str, Any]):
    import pyarrow as pa

    jpeg = metadata.get("image_format") == "jpeg"
    fields = [pa.field("object_id", pa.string()), pa.field("split", pa.string())]
    for name in LABELS:
        if name in BOOL_LABELS:
            t = pa.bool_()
        elif name in INT_LABELS:
            t = pa.int32()
        elif name in STR_LABELS:
            t = pa.string()
        else:
            t = pa.float64()
        fields.append(pa.field(name, t))
    if jpeg:
        fields.append(pa.field(IMAGE, pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])))
    else:
        fields += [pa.field(IMAGE, pa.binary()), pa.field(IMAGE_SHAPE, pa.list_(pa.int32()))]
    fields += [
        pa.field(SPECTRUM, pa.binary()),
        pa.field(SPECTRUM_IVAR, pa.binary()),
        pa.field(SPECTRUM_MASK, pa.binary()),
    ]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(metadata).encode()})


def _metadata(cfg: SurveyConfig) -> dict[str, Any]:
    from astrolom import __version__

    meta = {
        "format": "astrolom-shard",
        "format_version": 1,
        "source": "astrolom.mock (mock DESI Legacy Survey)",
        "astrolom_version": __version__,
        "bands": list(BANDS),
        "pixel_scale": PIXEL_SCALE,
        "image_shape": [cfg.size, cfg.size, len(BANDS)],
        "image_dtype": "float32",
        "image_layout": "HWC",
        "image_units": "nanomaggies",
        "zero_point": ZERO_POINT,
        "wavelength": spectrum_wavelength().tolist(),
        "wavelength_units": "Angstrom (observed frame, vacuum)",
        "spectrum_dtype": "float32",
        "spectrum_units": SPEC_UNITS,
        "spectrum_ivar": "float32 inverse variance of the spectrum, 0 = no information",
        "spectrum_mask": "uint8 per pixel, 1 = bad (sky-line core or cosmic ray; ivar is 0 there)",
        "spectrum_missing": "spectrum columns are null where has_spectrum is false",
        "seed": cfg.seed,
        "split_fractions": list(cfg.split_fractions),
        "telescopes": {k: {kk: list(vv) for kk, vv in v.items()} for k, v in TELESCOPES.items()},
        "sky_mag": list(SKY_MAG),
        "instrument": list(cfg.instrument),
        "spectrum_aperture": cfg.spectrum_aperture,
        # facts about the mock that readers need (fine-tuning on vote counts, line markers in figures), so that the
        # library reads them from the data set rather than importing the simulator
        "vote_volunteers": N_VOLUNTEERS,
        "emission_lines": {name: lam for name, (lam, _) in LINES.items()},
        "emission_lines_units": "Angstrom (rest frame, vacuum)",
        # (the worker count is left out: it changes nothing in the data, so shards are byte-identical across it)
        "generator": {
            "module": "astrolom.mock",
            "config": {k: v for k, v in _config_dict(cfg).items() if k != "workers"},
        },
        "labels": {k: {"unit": u, "description": d} for k, (u, d) in LABELS.items()},
    }
    if cfg.image_format == "jpeg":
        side = cfg.jpeg_size or cfg.size
        meta.update(
            image_format="jpeg",
            bands=["R", "G", "B"],
            rendered_from_bands=list(BANDS),
            pixel_scale=PIXEL_SCALE * cfg.size / side,
            image_shape=[side, side, 3],
            image_dtype="uint8",
            image_units=f"8-bit RGB, JPEG quality {JPEG_QUALITY}, rendered as the Legacy Survey viewer's {JPEG_LAYER} "
            "layer (astrolom.data.display.viewer_rgb)",
        )
    return meta


def _config_dict(cfg: SurveyConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["split_fractions"] = list(cfg.split_fractions)
    d["instrument"] = list(cfg.instrument)
    return d


def _to_table(rows: dict[str, list], schema, size: int):
    import pyarrow as pa

    n = len(rows["object_id"])
    arrays = []
    for f in schema:
        if f.name == IMAGE_SHAPE:
            arrays.append(pa.array([[size, size, 3]] * n, type=f.type))
        else:
            arrays.append(pa.array(rows[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def generate_survey(
    out_dir: str | os.PathLike,
    n: int,
    size: int = 64,
    seed: int = 0,
    workers: int | None = None,
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
    shard_size: int = 1000,
    progress: bool = True,
    overwrite: bool = False,
    instrument: tuple[str, ...] | str = INSTRUMENT_EFFECTS,
    spectrum_aperture: str = "fiber",
    image_format: str = "flux",
    jpeg_size: int | None = None,
) -> Path:
    """Render n objects into Parquet shards `out_dir/shard-00000.parquet`, ... plus `out_dir/_survey.json`.

    The summary file starts with '_' so that `pyarrow.parquet.read_table(out_dir)` ignores it. Returns out_dir.
    `image_format="jpeg"` stores viewer-rendered JPEGs (`jpeg_size` pixels per side, default `size`) instead of
    float32 flux (see the module docstring).
    With workers > 1 this starts 'spawn' processes: call it under `if __name__ == "__main__":` in scripts.
    """
    cfg = SurveyConfig(
        n=n,
        size=size,
        seed=seed,
        workers=workers,
        split_fractions=split_fractions,
        shard_size=shard_size,
        instrument=check_instrument(instrument),
        spectrum_aperture=spectrum_aperture,
        image_format=image_format,
        jpeg_size=jpeg_size,
    ).validate()
    return write_survey(cfg, Path(out_dir), progress=progress, overwrite=overwrite)[0]


def _is_survey_entry(name: str) -> bool:
    """A file a survey run writes: its shards, its summary, or a shard left half-written by an older version."""
    return fnmatch.fnmatch(name, "shard-*.parquet") or name == SURVEY_JSON or fnmatch.fnmatch(name, ".shard-*.tmp")


def _carry_over(out: Path, new: Path) -> None:
    """Hard-link every entry of `out` that is not the survey's into `new` (same parent, so the same file system): the
    switch keeps them and costs no copy, and until the switch `out` is untouched."""
    for p in sorted(out.iterdir()):
        if _is_survey_entry(p.name):
            continue
        if p.is_symlink():
            os.symlink(os.readlink(p), new / p.name)
        elif p.is_dir():
            shutil.copytree(p, new / p.name, symlinks=True, copy_function=os.link)
        else:
            os.link(p, new / p.name)


def write_survey(cfg: SurveyConfig, out: Path, progress: bool, overwrite: bool) -> tuple[Path, dict[str, Any]]:
    """Render a validated `cfg` into `out`; returns (out, summary: counts per split and telescope, label ranges).

    The survey is rendered into a new sibling directory and switched in with one rename (`layout.atomic_directory`),
    so a run that fails or is killed leaves the survey that was there whole (`--overwrite`), and a reader never sees
    shards of two surveys. Other files in `out` are carried into the new directory as hard links.
    """
    real = out.resolve()  # a symlinked --out: switch the directory it points to, not the link
    if real.exists() and not real.is_dir():
        raise ValueError(f"{out} is a file, not a directory: choose another --out")
    old = sorted(p.name for p in real.iterdir() if _is_survey_entry(p.name)) if real.is_dir() else []
    old = [name for name in old if not name.startswith(".")]  # a survey, not a shard left by an interrupted run
    if old and not overwrite:
        raise ValueError(f"{out} already holds a survey ({old[0]}, ...); pass --overwrite to replace it")
    cwd = Path.cwd().resolve()
    if cwd == real or real in cwd.parents:
        raise ValueError(
            f"{out} is the current directory or contains it: the survey is switched in by renaming that directory; "
            "run from outside it"
        )
    with atomic_directory(real) as new:
        if real.is_dir():
            _carry_over(real, new)
        summary = _render(cfg, new, progress)
    summary["files"] = [out / p.name for p in summary["files"]]
    return out, summary


def _render(cfg: SurveyConfig, out: Path, progress: bool) -> dict[str, Any]:
    """Render the survey's shards and `_survey.json` into the (new, empty of shards) directory `out`."""
    import pyarrow.parquet as pq

    t_start = time.time()
    tables = get_tables()
    meta = _metadata(cfg)
    schema = _arrow_schema(meta)
    workers = max(1, min(cfg.workers or os.cpu_count() or 1, cfg.n))
    bytes_per_row = cfg.size * cfg.size * 3 * 4 + spectrum_wavelength().size * 4 + 1024
    # row groups of <= 256 rows / ~16 MiB: the unit that readers shuffle and deal out to data-parallel ranks
    row_group = int(max(1, min(cfg.shard_size, 256, (16 << 20) // bytes_per_row)))
    chunk = int(max(1, min(32, math.ceil(cfg.n / (workers * 8)), row_group)))
    tasks = [
        (s, min(s + chunk, cfg.n), cfg.seed, cfg.size, cfg.split_fractions, cfg.instrument, cfg.spectrum_aperture,
         cfg.image_format, cfg.jpeg_size)
        for s in range(0, cfg.n, chunk)
    ]  # fmt: skip

    stats = RunningStats()
    files: list[Path] = []
    writer = None
    tmp_path: Path | None = None
    buf: dict[str, list] = {f.name: [] for f in schema}
    in_shard = 0

    def flush():
        nonlocal buf
        if buf["object_id"]:
            writer.write_table(_to_table(buf, schema, cfg.size), row_group_size=row_group)
            buf = {f.name: [] for f in schema}

    def close_shard():
        nonlocal writer, tmp_path, in_shard
        flush()
        writer.close()
        final = out / f"shard-{len(files):05d}.parquet"
        os.replace(tmp_path, final)
        files.append(final)
        writer, tmp_path, in_shard = None, None, 0

    if workers > 1:
        ctx = mp.get_context("spawn")
        pool = ctx.Pool(workers, initializer=init_worker, initargs=(tables,))
        results = pool.imap(_render_chunk, tasks)
    else:
        pool = None
        results = map(_render_chunk, tasks)
    bar = progress_bar(cfg.n, desc="survey", unit="obj", enabled=progress, smoothing=0.1)
    try:
        for res in results:
            m = len(res["object_id"])
            j = 0
            while j < m:
                if writer is None:
                    tmp_path = out / f".shard-{len(files):05d}.parquet.tmp"
                    writer = pq.ParquetWriter(tmp_path, schema, compression="zstd")
                take = min(m - j, cfg.shard_size - in_shard)
                for key in buf:
                    if key != IMAGE_SHAPE:
                        buf[key].extend(res[key][j : j + take])
                in_shard += take
                j += take
                if len(buf["object_id"]) >= row_group:
                    flush()
                if in_shard >= cfg.shard_size:
                    close_shard()
            stats.update(res)
            bar.update(m)
        if writer is not None:
            close_shard()
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        if writer is not None:
            writer.close()
            if tmp_path is not None and tmp_path.exists():
                tmp_path.unlink()

    elapsed = time.time() - t_start
    summary = survey_summary(stats, files, elapsed, workers)
    doc = {
        "description": "astrolom mock DESI Legacy Survey (astrolom.mock)",
        "config": _config_dict(cfg),
        "files": [p.name for p in files],
        "counts": summary["counts"],
        "columns": list(schema.names),
        "labels": meta["labels"],
        "bands": meta["bands"],
        "pixel_scale": meta["pixel_scale"],
        "image_shape": meta["image_shape"],
        "image_units": meta["image_units"],
        "spectrum": {
            "start": SPEC_START,
            "stop": SPEC_STOP,
            "step": SPEC_STEP,
            "n": int(spectrum_wavelength().size),
            "units": SPEC_UNITS,
            "with_spectrum_fraction": summary["label_stats"]["has_spectrum"]["mean"],
        },
        "label_stats": summary["label_stats"],
        "seconds": round(elapsed, 2),
    }
    (out / SURVEY_JSON).write_text(json.dumps(doc, indent=1))
    return summary
