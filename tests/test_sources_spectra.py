"""Spectrum readers: FITS spectra (image HDUs / table), images paired with spectra, HDF5 (AstroCLIP layout), our
Parquet's ivar/mask, one reference grid (resampled or refused), bad spectra, `astrolom inspect`, and pretraining."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from PIL import Image
from pretrain_helpers import TINY, pretrain_here, read_metrics

from astrolom import cli
from astrolom.data.sources import BadRecordError, open_source
from astrolom.data.sources.spectra import read_fits_spectrum

WAVE = np.linspace(4000.0, 5270.0, 128)  # 10 Å pixels, 128 px
MM = ["model.modalities=images,spectra", "model.spectrum_patch=32"]


def flux_of(i: int, wave: np.ndarray = WAVE) -> np.ndarray:
    """A smooth continuum with an emission line, different per object."""
    return (1.0 + i + 0.5 * np.sin(wave / 200.0) + 3.0 * np.exp(-0.5 * ((wave - 4500.0) / 15.0) ** 2)).astype("f4")


def write_fits_spectrum(path, wave, flux, ivar=None, mask=None, layout="hdus"):
    ivar = np.ones_like(flux) if ivar is None else ivar
    mask = np.zeros(flux.shape, np.int32) if mask is None else mask
    if layout == "hdus":  # DESI-coadd-like extensions
        hdus = [fits.PrimaryHDU()]
        for name, arr in (("WAVELENGTH", wave), ("FLUX", flux), ("IVAR", ivar), ("MASK", mask)):
            hdus.append(fits.ImageHDU(np.asarray(arr), name=name))
        fits.HDUList(hdus).writeto(path, overwrite=True)
    else:  # one row per pixel, binary-table columns
        cols = [
            fits.Column("WAVELENGTH", "D", array=np.asarray(wave), unit="Angstrom"),
            fits.Column("FLUX", "E", array=np.asarray(flux)),
            fits.Column("IVAR", "E", array=np.asarray(ivar)),
            fits.Column("MASK", "J", array=np.asarray(mask)),
        ]
        fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols, name="SPECTRUM")]).writeto(path)
    return path


def write_paired(root, n=6, with_spectrum=lambda i: i != 5, size=16, wave_of=lambda i: WAVE, layout="hdus"):
    (root / "images").mkdir(parents=True)
    (root / "spectra").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(root / "images" / f"obj{i}.png")
        if with_spectrum(i):
            w = wave_of(i)
            write_fits_spectrum(root / "spectra" / f"obj{i}.fits", w, flux_of(i, w), layout=layout)
    return root


def by_id(source):
    return {r.object_id: r for r in source.records()}


@pytest.mark.parametrize("layout", ["hdus", "table"])
def test_fits_spectrum_layouts_keep_flux_ivar_and_mask(tmp_path, layout):
    flux, ivar, mask = flux_of(2), np.full(128, 4.0, "f4"), np.zeros(128, np.int32)
    ivar[10:13] = 0.0
    mask[50] = 8  # any non-zero DESI mask bit is a bad pixel
    path = write_fits_spectrum(tmp_path / "s.fits", WAVE, flux, ivar, mask, layout)
    spec = read_fits_spectrum(path.read_bytes(), str(path))
    np.testing.assert_allclose(spec.wavelength, WAVE)
    np.testing.assert_array_equal(spec.flux, flux)
    assert int(spec.good.sum()) == 128 - 4 and spec.meta["source"] == str(path)


def test_images_paired_with_spectra_by_object_id(tmp_path):
    root = write_paired(tmp_path / "data")
    write_fits_spectrum(root / "spectra" / "lonely.fits", WAVE, flux_of(9))  # a spectrum without an image
    for src in (open_source(root), open_source(root / "images", spectra_dir=root / "spectra")):
        assert src.format == "paired" and len(src) == 6 and src.unpaired_spectra == ["lonely"]
        recs = by_id(src)
        assert recs["obj5"].spectrum is None and recs["obj0"].image.shape == (16, 16, 3)
        for i in range(5):
            np.testing.assert_array_equal(recs[f"obj{i}"].spectrum, flux_of(i))
            assert recs[f"obj{i}"].spectrum_ivar.sum() == 128 and not recs[f"obj{i}"].spectrum_mask.any()
        np.testing.assert_allclose(src.metadata["wavelength"], WAVE)
    # image-only work does not read spectra
    assert all(r.spectrum is None for r in open_source(root, spectra=False).records())


def test_other_grid_is_resampled_flux_conserving_onto_the_first_files_grid(tmp_path):
    coarse = np.linspace(4000.0, 5270.0, 64)  # 2x coarser (20.16 Å)
    root = write_paired(tmp_path / "data", wave_of=lambda i: coarse if i == 3 else WAVE)
    src = open_source(root)
    rec = by_id(src)["obj3"]
    assert rec.spectrum.shape == (128,) and src.spectrum_grid.resampled == 1
    assert list(src.spectrum_grid.grids) == ["4000-5270 A, 64 px, step 20.1587"]
    # the coarse pixels cover every fine pixel, and the integrated flux is conserved: each coarse pixel's flux
    # goes to the fine pixels in proportion to their overlap
    assert np.isfinite(rec.spectrum).all()
    dw_f, dw_c = np.diff(WAVE)[0], np.diff(coarse)[0]
    lo, hi = WAVE[0] - dw_f / 2, WAVE[-1] + dw_f / 2
    edges = np.concatenate([[coarse[0] - dw_c / 2], coarse + dw_c / 2])
    overlap = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None)
    np.testing.assert_allclose((rec.spectrum * dw_f).sum(), (flux_of(3, coarse) * overlap).sum(), rtol=1e-6)
    # resampled, not copied: the line peak (3 above the continuum at 4500 A) is smoothed by the coarser pixels
    assert 1.5 < rec.spectrum.max() - np.median(rec.spectrum) < 3.0


def test_other_grid_is_refused_naming_the_file_and_both_grids(tmp_path):
    coarse = np.linspace(4000.0, 5270.0, 64)
    root = write_paired(tmp_path / "data", wave_of=lambda i: coarse if i == 3 else WAVE)
    src = open_source(root, resample_spectra=False)
    with pytest.raises(BadRecordError, match=r"obj3\.fits: .*4000-5270 A, 64 px.* differs from .*4000-5270 A, 128 px"):
        list(src.records())
    # the model's grid, when given, is the reference: now the 128 px files are the foreign ones
    src = open_source(root, wavelength=coarse.tolist(), skip_bad=True, resample_spectra=False)
    recs = by_id(src)
    assert len(recs) == 6 and src.skipped == 0 and src.spectra_dropped == 4  # the images stay, image-only
    assert [k for k, r in recs.items() if r.spectrum is not None] == ["obj3"]


BAD = {
    "all-NaN flux": (lambda: (WAVE, np.full(128, np.nan, "f4"), None), "flux is NaN everywhere"),
    "all-zero ivar": (lambda: (WAVE, flux_of(1), np.zeros(128, "f4")), "ivar is 0 everywhere"),
    "wrong length": (lambda: (WAVE, flux_of(1)[:100], None), "wrong length: flux has 100 pixels, wavelength 128"),
    "non-monotonic wavelength": (
        lambda: (np.concatenate([WAVE[:60], WAVE[60:][::-1]]), flux_of(1), None),
        "not finite and strictly increasing",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spectrum_raises_naming_the_file_or_is_skipped_and_listed(tmp_path, case):
    make, reason = BAD[case]
    root = write_paired(tmp_path / "data")
    wave, flux, ivar = make()
    bad_file = root / "spectra" / "obj2.fits"
    bad_file.unlink()
    write_fits_spectrum(bad_file, wave, flux, ivar if ivar is not None else np.ones(flux.shape, "f4"))
    with pytest.raises(BadRecordError, match=reason) as err:
        list(open_source(root).records())
    assert err.value.file == str(bad_file) and err.value.object_id == "obj2"
    manifest = tmp_path / "skipped.jsonl"
    src = open_source(root, skip_bad=True, manifest=manifest)
    recs = by_id(src)  # skip_bad drops only the bad spectrum: obj2 goes on image-only, like obj5 (no spectrum)
    assert sorted(recs) == [f"obj{i}" for i in range(6)] and recs["obj2"].spectrum is None
    assert recs["obj2"].image.shape == (16, 16, 3) and recs["obj2"].spectrum_ivar is None
    assert src.skipped == 0 and src.spectra_dropped == 1
    entry = json.loads(manifest.read_text())
    assert entry["file"] == str(bad_file) and entry["object_id"] == "obj2" and reason in entry["reason"]
    assert entry["dropped"] == "spectrum"


def test_skip_bad_drops_a_bad_spectrum_but_skips_a_bad_image(tmp_path, caplog):
    root = write_paired(tmp_path / "data")
    (root / "images" / "obj1.png").write_bytes(b"")  # bad image, good spectrum: the whole record goes
    write_fits_spectrum(root / "spectra" / "obj3.fits", WAVE, flux_of(3), np.zeros(128, "f4"))  # bad spectrum
    manifest = tmp_path / "skipped.jsonl"
    src = open_source(root, skip_bad=True, manifest=manifest)
    for _ in range(2):  # a second epoch lists nothing again
        recs = by_id(src)
    assert sorted(recs) == ["obj0", "obj2", "obj3", "obj4", "obj5"] and recs["obj3"].spectrum is None
    assert recs["obj3"].image.shape == (16, 16, 3) and recs["obj2"].spectrum is not None
    assert (src.skipped, src.spectra_dropped) == (1, 1)
    entries = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert [(e["object_id"], e["dropped"]) for e in entries] == [("obj1", "record"), ("obj3", "spectrum")]
    assert "ivar is 0 everywhere" in entries[1]["reason"] and entries[1]["file"].endswith("obj3.fits")
    line = src.log_summary()
    assert "skipped 1 bad record(s)" in line and "dropped 1 bad spectrum(s), keeping their records image-only" in line


def test_hdf5_bad_spectrum_row_is_dropped_alone(tmp_path):
    path = write_astroclip_h5(tmp_path / "a.h5")
    with h5py.File(path, "a") as h:
        h["spectrum"][5] = np.nan
    with pytest.raises(BadRecordError, match=r"a\.h5 row 5: unusable spectrum: its flux is NaN everywhere"):
        list(open_source(path).records())
    src = open_source(path, skip_bad=True)
    recs = by_id(src)
    assert len(recs) == 24 and recs["1005"].spectrum is None and recs["1005"].image.shape == (32, 32, 3)
    assert src.skipped == 0 and src.spectra_dropped == 1 and src.bad_spectra[0]["row"] == 5


def write_astroclip_h5(path, n=24, size=32, wavelength="dataset"):
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as h:
        h["image"] = rng.normal(0, 1, (n, size, size, 3)).astype("f4")
        spec = np.stack([flux_of(i) for i in range(n)])[..., None]  # (N, L, 1) as AstroCLIP stores it
        ds = h.create_dataset("spectrum", data=spec)
        if wavelength == "dataset":
            h["wavelength"] = WAVE
        elif wavelength == "attr":
            ds.attrs["wavelength"] = WAVE
        h["targetid"] = np.arange(1000, 1000 + n)
        h["redshift"] = np.linspace(0, 1, n)
        h["has_spectrum"] = np.arange(n) % 4 != 0
        h["split"] = np.array([b"train", b"train", b"val", b"test"] * (n // 4))
    return path


@pytest.mark.parametrize("wavelength", ["dataset", "attr"])
def test_hdf5_astroclip_layout(tmp_path, wavelength):
    src = open_source(write_astroclip_h5(tmp_path / "a.h5", wavelength=wavelength))
    assert src.format == "hdf5" and len(src) == 24 and src.label_columns == ["has_spectrum", "redshift"]
    recs = by_id(src)
    assert set(recs) == {str(1000 + i) for i in range(24)}
    assert recs["1000"].spectrum is None and recs["1004"].spectrum is None  # has_spectrum False
    np.testing.assert_array_equal(recs["1005"].spectrum, flux_of(5))
    assert recs["1005"].image.shape == (32, 32, 3) and recs["1005"].labels["redshift"] == pytest.approx(5 / 23)
    np.testing.assert_allclose(src.metadata["wavelength"], WAVE)


def test_hdf5_spectra_without_a_grid_are_refused(tmp_path):
    path = write_astroclip_h5(tmp_path / "a.h5", wavelength=None)
    with pytest.raises(ValueError, match=r"a\.h5: 'spectrum' has no wavelength grid"):
        open_source(path)
    assert open_source(path, wavelength=WAVE.tolist()).metadata["wavelength"][-1] == pytest.approx(5270.0)
    assert open_source(path, spectra=False).metadata.get("wavelength") is None  # image-only: not needed


def write_parquet(path, spectra, ivars=None, masks=None, wave=WAVE):
    n = len(spectra)
    img = np.zeros((8, 8, 1), "f4")
    rows = {
        "object_id": [f"p{i}" for i in range(n)],
        "image": [img.tobytes()] * n,
        "image_shape": [list(img.shape)] * n,
        "spectrum": [None if s is None else np.asarray(s, "<f4").tobytes() for s in spectra],
        "spectrum_ivar": [None if v is None else np.asarray(v, "<f4").tobytes() for v in (ivars or [None] * n)],
        "spectrum_mask": [None if m is None else np.asarray(m, "u1").tobytes() for m in (masks or [None] * n)],
    }
    meta = {b"astrolom": json.dumps({"wavelength": list(wave)}).encode()}
    table = pa.table(rows)
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


def test_our_parquet_reads_ivar_and_mask_and_checks_spectra(tmp_path):
    ivar, mask = np.full(128, 2.0, "f4"), np.zeros(128, "u1")
    ivar[5], mask[7] = 0.0, 1
    path = write_parquet(tmp_path / "s.parquet", [flux_of(0), None], [ivar, None], [mask, None])
    a, b = open_source(path).records()
    assert b.spectrum is None and a.spectrum_ivar[0] == 2.0 and a.spectrum_ivar[5] == 0 and a.spectrum_mask[7]
    assert np.isnan(a.spectrum[[5, 7]]).all() and np.isfinite(a.spectrum).sum() == 126
    bad = write_parquet(tmp_path / "bad.parquet", [flux_of(0), flux_of(1)[:100]])
    with pytest.raises(BadRecordError, match=r"bad\.parquet row 1: wrong length: spectrum has 100 pixels.*has 128"):
        list(open_source(bad).records())
    src = open_source(bad, skip_bad=True)
    p0, p1 = src.records()  # only the bad spectrum is dropped: p1 stays, image-only
    assert p0.spectrum is not None and p1.spectrum is None and p1.image.shape == (8, 8, 1)
    assert src.skipped == 0 and src.bad_spectra[0]["row"] == 1 and src.bad_spectra[0]["object_id"] == "p1"


def test_inspect_reports_spectra(tmp_path, capsys):
    root = write_paired(tmp_path / "data", wave_of=lambda i: np.linspace(4000.0, 5270.0, 64) if i == 3 else WAVE)
    assert cli.main(["inspect", "--data", str(root), "--show", "0"]) == 0
    out = capsys.readouterr().out
    assert "format:        paired" in out
    assert "spectra:       5 of 6 records have one (16.7% without)" in out
    assert "grid:        4000-5270 A, 128 px, step 10" in out
    assert "good pixels span 4000-5270 A (median); 100.0% of pixels good, 0.0% masked" in out
    assert "resampled:   1 spectra from other grids (flux-conserving): 4000-5270 A, 64 px" in out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["paired", "hdf5"])
def test_pretrain_images_and_spectra_on_own_data(tmp_path, kind):
    if kind == "paired":
        data = write_paired(tmp_path / "data", n=24, size=32, with_spectrum=lambda i: i % 3 != 0, layout="table")
    else:
        data = write_astroclip_h5(tmp_path / "a.h5")
    out = tmp_path / "run"
    args = ["--data", str(data), "--out", str(out), "--preset", "debug", "--max-steps", "2", *TINY, *MM]
    args += ["train.batch_size=4", "train.micro_batch_size=4", "train.eval_interval=0", "train.checkpoint_interval=0"]
    assert pretrain_here(args) == 0
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    # 16 image tokens + 4 spectrum tokens (128 px / 32) + 2 begin-of-modality tokens per object
    assert rows[-1]["tokens_seen"] == 2 * 4 * (16 + 4 + 2)
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["tokens"]["spectra"]["tokens"] == 4
    np.testing.assert_allclose(cfg["tokens"]["spectra"]["wavelength"], WAVE)


def test_gzipped_fits_spectra_and_a_missing_spectra_folder(tmp_path):
    import gzip

    root = write_paired(tmp_path / "data", n=2)
    plain = root / "spectra" / "obj1.fits"
    (root / "spectra" / "obj1.fits.gz").write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    np.testing.assert_array_equal(by_id(open_source(root))["obj1"].spectrum, flux_of(1))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_source(root / "images", spectra_dir=tmp_path / "nowhere")


def test_spectra_read_as_images_get_a_hint(tmp_path):
    root = write_paired(tmp_path / "data", n=1)
    with pytest.raises(BadRecordError, match=r"obj0\.fits: .*look like a spectrum: pair spectra with images"):
        list(open_source(root / "spectra").records())


def test_all_nan_spectrum_in_our_parquet_is_a_bad_record(tmp_path):
    path = write_parquet(tmp_path / "s.parquet", [flux_of(0), np.full(128, np.nan, "f4")])
    with pytest.raises(BadRecordError, match=r"s\.parquet row 1: unusable spectrum: its flux is NaN everywhere"):
        list(open_source(path).records())
