"""Spectrum readers on real survey files that well-kept packages ship (never files written to fit the readers):

- SDSS DR18 `spec-*.fits` of NGC 3073 and NGC 3522, as pPXF ships them (`ppxf/spectra/*_SDSS_DR18.fits`: the SAS
  spec files renamed; COADD loglam/flux/ivar/and_mask, SPECOBJ with the pipeline redshift);
- an ESO Phase 3 1-D spectrum, LEGA-C DR3 (VIMOS) `legac_M19_56670_v3.0.fits`, as pPXF ships it (one row of WAVE,
  FLUX, ERR, QUAL array cells);
- DESI per-camera coadds `coadd-sv3-dark-26065.fits` and `coadd-5-169-thru20210419.fits`, as specutils ships them
  for its own DESI loader tests (B/R/Z arms, FIBERMAP TARGETIDs, a target whose spectrum is all zeros).

The images paired with them are placeholders (the spectra are under test). Both packages are in the `[dev]` extra.
"""

from __future__ import annotations

import importlib.resources
import json

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from astrolom import cli
from astrolom.data.sources import BadRecordError, open_source
from astrolom.data.sources.spectra import read_fits_spectrum
from astrolom.data.spectra import grid_coverage

pytest.importorskip("ppxf")
pytest.importorskip("specutils")

PPXF = importlib.resources.files("ppxf") / "spectra"
DESI = importlib.resources.files("specutils") / "io" / "default_loaders" / "tests" / "desi_test_data"
SDSS_FILES = {"NGC3073": PPXF / "NGC3073_SDSS_DR18.fits", "NGC3522": PPXF / "NGC3522_SDSS_DR18.fits"}
LEGAC = PPXF / "legac_M19_56670_v3.0.fits"
MOCK_GRID = 3600.0 + 2.0 * np.arange(3101)  # the mock survey's DESI-like model grid, 3600-9800 Å


def write_placeholder_images(folder, ids):
    folder.mkdir(parents=True, exist_ok=True)
    for oid in ids:
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(folder / f"{oid}.png")


def paired(tmp_path, files: dict[str, object]):
    """images/<id>.png + spectra/<id>.fits (a byte copy of each real file)."""
    root = tmp_path / "data"
    (root / "spectra").mkdir(parents=True)
    for oid, src in files.items():
        (root / "spectra" / f"{oid}.fits").write_bytes(src.read_bytes())
    write_placeholder_images(root / "images", list(files))
    return root


def test_sdss_spec_file_coadd_and_specobj():
    path = SDSS_FILES["NGC3073"]
    spec = read_fits_spectrum(path.read_bytes(), str(path))
    with fits.open(path) as h:
        coadd, specobj = h["COADD"].data, h["SPECOBJ"].data
        np.testing.assert_allclose(spec.wavelength, 10.0 ** coadd["loglam"].astype(np.float64), rtol=1e-12)
        np.testing.assert_array_equal(spec.flux, coadd["flux"])
        np.testing.assert_array_equal(spec.ivar, coadd["ivar"])
        np.testing.assert_array_equal(spec.mask, coadd["and_mask"] != 0)
        z = float(specobj["Z"][0])
    assert spec.wavelength.size == 3848 and spec.wavelength[0] == pytest.approx(3795.77, abs=0.01)
    assert int(spec.mask.sum()) == 6 and int(spec.good.sum()) == 3842  # 6 pixels with and_mask bits set
    assert spec.meta["labels"] == {"redshift": pytest.approx(0.0037627, abs=1e-7), "redshift_err": pytest.approx(
        1.176e-5, rel=1e-3), "zwarning": 0}  # fmt: skip
    assert spec.meta["labels"]["redshift"] == z


@pytest.mark.slow
def test_sdss_spectra_on_the_model_grid_keep_the_overlap_and_report_coverage(tmp_path, capsys):
    root = paired(tmp_path, SDSS_FILES)
    src = open_source(root, wavelength=MOCK_GRID.tolist())
    recs = {r.object_id: r for r in src.records()}
    for oid, path in SDSS_FILES.items():
        native = read_fits_spectrum(path.read_bytes(), str(path))
        rec = recs[oid]
        # the SDSS grid (3796-9204 Å at 0.87-2.1 Å) covers the model grid's middle: pixels beyond it are masked
        lo_edge = native.wavelength[0] - 0.5 * (native.wavelength[1] - native.wavelength[0])
        hi_edge = native.wavelength[-1] + 0.5 * (native.wavelength[-1] - native.wavelength[-2])
        inside = (MOCK_GRID - 1.0 >= lo_edge - 0.02) & (MOCK_GRID + 1.0 <= hi_edge + 0.02)  # 2 Å model pixels
        assert rec.labels["spectrum_coverage"] == pytest.approx(inside.mean(), abs=1.5 / MOCK_GRID.size)
        assert 0.86 < rec.labels["spectrum_coverage"] < 0.88  # (9204 - 3796) / 6200 = 0.872
        assert not np.isfinite(rec.spectrum[MOCK_GRID < lo_edge]).any()
        assert not np.isfinite(rec.spectrum[MOCK_GRID > hi_edge]).any()
        assert np.isfinite(rec.spectrum[inside]).mean() > 0.99  # the overlap is kept (bar the masked pixels)
        # flux-conserving: 6000-7000 Å (no masked pixel in either file) holds the same flux on both grids
        band = (MOCK_GRID >= 6001.0) & (MOCK_GRID <= 6999.0)
        nat = (native.wavelength >= 6000.0) & (native.wavelength <= 7000.0)
        assert native.good[nat].all()
        widths = np.gradient(native.wavelength)
        assert (rec.spectrum[band] * 2.0).sum() == pytest.approx((native.flux[nat] * widths[nat]).sum(), rel=3e-3)
        assert rec.labels["redshift"] == native.meta["labels"]["redshift"]
    assert {e["object_id"] for e in src.partial_spectra} == set(SDSS_FILES)
    assert "2 spectrum(s) cover only part of the model's wavelength grid" in src.log_summary()
    # without a model grid the first file's grid is the reference: NGC 3522's (from 3826 Å) covers 99.1 % of it
    assert cli.main(["inspect", "--data", str(root), "--show", "0"]) == 0
    assert "partial:     1 spectra cover part of the grid (label spectrum_coverage): median 99.1%" in (
        capsys.readouterr().out
    )


def test_eso_phase3_spectrum_err_to_ivar_and_qual_mask():
    spec = read_fits_spectrum(LEGAC.read_bytes(), str(LEGAC))
    with fits.open(LEGAC) as h:
        assert h[0].header["ORIGIN"].strip() == "ESO" and h[1].name == "PHASE3SPECTRA" and len(h[1].data) == 1
        row = h[1].data[0]
        wave, flux, err, qual = (np.asarray(row[k]) for k in ("WAVE", "FLUX", "ERR", "QUAL"))
    np.testing.assert_array_equal(spec.wavelength, wave.astype(np.float64))
    np.testing.assert_array_equal(spec.flux, flux.astype(np.float32))
    ok = np.isfinite(err) & (err > 0)
    np.testing.assert_allclose(spec.ivar[ok], 1.0 / err[ok] ** 2, rtol=1e-6)
    assert (spec.ivar[~ok] == 0).all()
    np.testing.assert_array_equal(spec.mask, qual != 0)
    assert spec.wavelength.size == 6166 and int(spec.good.sum()) == 4086  # QUAL == 0, ERR > 0 and finite flux
    assert spec.meta["flux_unit"] == "10**(-19).erg.cm**(-2).s**(-1).angstrom**(-1)"


@pytest.mark.slow
def test_eso_spectrum_partly_outside_the_model_grid(tmp_path):
    root = paired(tmp_path, {"M19_56670": LEGAC})
    manifest = tmp_path / "skipped.jsonl"
    src = open_source(root, wavelength=MOCK_GRID.tolist(), manifest=manifest)
    (rec,) = src.records()
    native = read_fits_spectrum(LEGAC.read_bytes(), str(LEGAC))
    # LEGA-C's VIMOS HR-red range, 5800-9499 Å, is 60 % of the 3600-9800 Å model grid
    want = np.mean((MOCK_GRID - 1.0 >= native.wavelength[0] - 0.3) & (MOCK_GRID + 1.0 <= native.wavelength[-1] + 0.3))
    assert rec.labels["spectrum_coverage"] == pytest.approx(want, abs=1.5 / MOCK_GRID.size)
    assert rec.labels["spectrum_coverage"] == pytest.approx((9499.3 - 5800.3) / 6202.0, abs=0.002)
    assert src.partial_spectra == [{"object_id": "M19_56670", "coverage": rec.labels["spectrum_coverage"]}]
    assert not np.isfinite(rec.spectrum[MOCK_GRID < 5800.0]).any()
    assert np.isfinite(rec.spectrum[MOCK_GRID > 6000.0]).mean() > 0.6  # kept: the overlap (minus QUAL/NaN gaps)
    assert not manifest.exists()  # nothing was dropped


def test_spectrum_outside_the_model_grid_is_a_bad_spectrum_naming_the_file(tmp_path):
    root = paired(tmp_path, {"M19_56670": LEGAC})
    blue = 3000.0 + 2.0 * np.arange(1000)  # 3000-4998 Å: no overlap with LEGA-C's 5800-9499 Å
    with pytest.raises(BadRecordError, match=r"M19_56670\.fits: its grid \(5800\.3-9499\.3 A.* does not overlap"):
        list(open_source(root, wavelength=blue.tolist()).records())
    manifest = tmp_path / "skipped.jsonl"
    src = open_source(root, wavelength=blue.tolist(), skip_bad=True, manifest=manifest)
    (rec,) = src.records()
    assert rec.spectrum is None and src.spectra_dropped == 1
    assert json.loads(manifest.read_text())["dropped"] == "spectrum"


def test_grid_coverage_counts_model_pixels_inside_the_spectrum():
    grid = 100.0 + np.arange(10.0)  # pixels 99.5-109.5
    assert grid_coverage(grid, grid) == 1.0
    assert grid_coverage(np.arange(104.0, 120.0), grid) == 0.6  # edges 103.5-119.5: pixels 104..109
    assert grid_coverage(np.arange(0.0, 50.0), grid) == 0.0


def test_desi_coadd_targets_pair_by_targetid_and_merge_arms(tmp_path):
    path = DESI / "coadd-sv3-dark-26065.fits"
    with fits.open(path) as h:
        ids = [str(int(t)) for t in h["FIBERMAP"].data["TARGETID"]]
        b_wave, r_wave = h["B_WAVELENGTH"].data, h["R_WAVELENGTH"].data
        b_flux, r_flux = h["B_FLUX"].data[2], h["R_FLUX"].data[2]
        b_ivar, r_ivar = h["B_IVAR"].data[2], h["R_IVAR"].data[2]
        b_mask, r_mask = h["B_MASK"].data[2], h["R_MASK"].data[2]
    root = tmp_path / "data"
    (root / "spectra").mkdir(parents=True)
    (root / "spectra" / path.name).write_bytes(path.read_bytes())
    write_placeholder_images(root / "images", [ids[2], ids[4], "no_spectrum"])
    src = open_source(root)
    assert src.format == "paired" and sorted(src.unpaired_spectra) == sorted([ids[0], ids[1], ids[3]])
    recs = {r.object_id: r for r in src.records()}
    assert recs["no_spectrum"].spectrum is None
    wave = np.asarray(src.metadata["wavelength"])
    assert wave.size == 7781 and wave[0] == 3600.0 and wave[-1] == pytest.approx(9824.0)  # DESI's 0.8 Å lattice
    # a pixel of the B/R overlap: the inverse-variance-weighted mean of the two arms (both good there)
    j = int(np.flatnonzero((b_mask == 0) & (b_ivar > 0))[-1])  # the reddest good B pixel lies in the R arm's range
    k = int(np.argmin(np.abs(r_wave - b_wave[j])))
    assert r_wave[k] == pytest.approx(b_wave[j]) and r_mask[k] == 0 and r_ivar[k] > 0
    want = (b_ivar[j] * b_flux[j] + r_ivar[k] * r_flux[k]) / (b_ivar[j] + r_ivar[k])
    i = int(np.argmin(np.abs(wave - b_wave[j])))
    assert recs[ids[2]].spectrum[i] == pytest.approx(want, rel=1e-5)
    assert recs[ids[2]].spectrum_ivar[i] == pytest.approx(b_ivar[j] + r_ivar[k], rel=1e-5)
    assert "spectrum_coverage" not in recs[ids[2]].labels  # on the data set's own grid


@pytest.mark.slow
def test_desi_coadd_with_targets_that_carry_no_information(tmp_path):
    path = DESI / "coadd-5-169-thru20210419.fits"
    with fits.open(path) as h:
        ids = [str(int(t)) for t in h["FIBERMAP"].data["TARGETID"]]
        dead = [k for k in range(len(ids)) if not any((h[f"{a}_IVAR"].data[k] > 0).any() for a in "BRZ")]
    assert dead == [0, 1, 2, 3]  # specutils keeps data for target 4 only: the others are zeros, ivar 0 everywhere
    root = tmp_path / "data"
    (root / "spectra").mkdir(parents=True)
    (root / "spectra" / path.name).write_bytes(path.read_bytes())
    write_placeholder_images(root / "images", ids)
    with pytest.raises(BadRecordError, match=rf"{path.name} row [0-3]: unusable spectrum: its ivar is 0 everywhere"):
        list(open_source(root, wavelength=MOCK_GRID.tolist()).records())
    manifest = tmp_path / "skipped.jsonl"
    src = open_source(root, wavelength=MOCK_GRID.tolist(), skip_bad=True, manifest=manifest)
    recs = {r.object_id: r for r in src.records()}
    assert [oid for oid, r in recs.items() if r.spectrum is not None] == [ids[4]] and len(recs) == 5
    entries = [json.loads(x) for x in manifest.read_text().splitlines()]
    got = sorted((e["row"], e["object_id"], e["dropped"]) for e in entries)
    assert got == [(k, ids[k], "spectrum") for k in dead]
    # DESI's 3600-9824 Å covers the 3600-9800 Å model grid but for its first 2 Å pixel (3599-3601 Å), which starts
    # 0.4 Å before DESI's first pixel edge (3599.6 Å)
    assert recs[ids[4]].labels["spectrum_coverage"] == pytest.approx(3100 / 3101, abs=1e-12)
    assert np.isnan(recs[ids[4]].spectrum[0]) and np.isfinite(recs[ids[4]].spectrum[1:]).mean() > 0.99
    assert src.partial_spectra == [{"object_id": ids[4], "coverage": recs[ids[4]].labels["spectrum_coverage"]}]
