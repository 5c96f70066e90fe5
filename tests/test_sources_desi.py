"""DESI per-camera coadd files (B_/R_/Z_ extensions, FIBERMAP): one target per file or many matched by TARGETID, the
arms merged inverse-variance-weighted in their overlaps, then resampled onto the model's grid; bad files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from astrolom import cli
from astrolom.data.sources import BadRecordError, open_source
from astrolom.data.sources.spectra import read_fits_spectrum

STEP = 0.8  # Å, DESI's pixels; the three arms share one lattice and overlap by 20 pixels
LATTICE = 5000.0 + STEP * np.arange(260)
ARMS = {"B": slice(0, 100), "R": slice(80, 180), "Z": slice(160, 260)}
LEVEL = {"B": 1.0, "R": 1.3, "Z": 0.8}  # a different continuum per arm, so that the overlaps show the weighting
IVAR = {"B": 4.0, "R": 1.0, "Z": 2.0}
LINE = 5110.0  # Å, in the R-only part (5080-5127.2 Å)
MODEL_GRID = 5000.6 + 2.0 * np.arange(100)  # 2 Å pixels; every other edge is a DESI pixel edge


def arm_flux(arm: str, line: float = LINE) -> np.ndarray:
    w = LATTICE[ARMS[arm]]
    return (LEVEL[arm] + 5.0 * np.exp(-0.5 * ((w - line) / 3.0) ** 2)).astype("f4")


def write_desi(path, lines=(LINE,), one_d=False, edit=None, targetids=None, fibermap=True):
    """A per-camera coadd with one target per entry of `lines` (its emission line's wavelength).

    `edit(hdus)` may change the {EXTNAME: array} dict before writing (to break the file).
    """
    n = len(lines)
    hdus = {}
    for arm, sl in ARMS.items():
        hdus[f"{arm}_WAVELENGTH"] = LATTICE[sl].copy()
        hdus[f"{arm}_FLUX"] = np.stack([arm_flux(arm, line) for line in lines])
        hdus[f"{arm}_IVAR"] = np.full((n, sl.stop - sl.start), IVAR[arm], "f4")
        hdus[f"{arm}_MASK"] = np.zeros((n, sl.stop - sl.start), np.int32)
        hdus[f"{arm}_RESOLUTION"] = np.zeros((n, 11, sl.stop - sl.start), "f4")  # present in DESI files, not read
    if one_d:
        hdus = {k: (v[0] if k.split("_")[1] in ("FLUX", "IVAR", "MASK") else v) for k, v in hdus.items()}
    if edit is not None:
        edit(hdus)
    out = [fits.PrimaryHDU()]
    if fibermap:
        ids = np.arange(39627000000000001, 39627000000000001 + n) if targetids is None else np.asarray(targetids)
        out.append(fits.BinTableHDU.from_columns([fits.Column("TARGETID", "K", array=ids)], name="FIBERMAP"))
    out += [fits.ImageHDU(v, name=k) for k, v in hdus.items()]
    fits.HDUList(out).writeto(path, overwrite=True)
    return path


def write_images(folder, ids, size=8):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for oid in ids:
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"{oid}.png")


def line_centre(wave, flux, near=LINE, half=10.0):
    """Flux-weighted centroid of a line in the R-only stretch, above R's continuum."""
    sel = np.abs(wave - near) <= half
    excess = flux[sel] - LEVEL["R"]
    return float((wave[sel] * excess).sum() / excess.sum())


@pytest.mark.parametrize("one_d", [True, False], ids=["1-D arrays", "one row"])
def test_one_target_file_merges_the_arms_inverse_variance_weighted(tmp_path, one_d):
    def edit(h):
        mask = h["B_MASK"].reshape(-1, 100)
        mask[0, 90] = 4  # a bad B pixel in the B/R overlap: only R counts there
        h["R_IVAR"].reshape(-1, 100)[0, 15] = 0.0  # no R information at LATTICE[95]: only B counts there

    path = write_desi(tmp_path / "obj.fits", one_d=one_d, edit=edit)
    spec = read_fits_spectrum(path.read_bytes(), str(path))
    np.testing.assert_allclose(spec.wavelength, LATTICE)  # the union of the arms, 260 px
    b, r, z = arm_flux("B"), arm_flux("R"), arm_flux("Z")
    # outside the overlaps: each arm as it is
    np.testing.assert_allclose(spec.flux[:80], b[:80], rtol=1e-6)
    np.testing.assert_allclose(spec.flux[100:160], r[20:80], rtol=1e-6)
    np.testing.assert_allclose(spec.flux[180:], z[20:], rtol=1e-6)
    # B/R overlap: (4 f_B + 1 f_R) / 5, ivar 5, except the masked B pixel (R alone) and the R pixel with ivar 0
    want = (IVAR["B"] * b[80:100] + IVAR["R"] * r[:20]) / (IVAR["B"] + IVAR["R"])
    want[10], want[15] = r[10], b[95]
    np.testing.assert_allclose(spec.flux[80:100], want, rtol=1e-6)
    assert spec.flux[90] == pytest.approx(1.3, abs=1e-6) and spec.flux[85] == pytest.approx((4 + 1.3) / 5, abs=1e-6)
    ivar = np.full(20, 5.0)
    ivar[10], ivar[15] = 1.0, 4.0
    np.testing.assert_allclose(spec.ivar[80:100], ivar)
    # R/Z overlap: (1 f_R + 2 f_Z) / 3
    np.testing.assert_allclose(spec.flux[160:180], (r[80:] + 2 * z[:20]) / 3, rtol=1e-6)
    assert spec.good.all() and spec.meta["arms"] == "BRZ"


def test_line_lands_at_its_wavelength_on_the_model_grid(tmp_path):
    root = tmp_path / "data"
    write_images(root / "images", ["obj0"])
    (root / "spectra").mkdir()
    write_desi(root / "spectra" / "obj0.fits", one_d=True)
    src = open_source(root, wavelength=MODEL_GRID.tolist())
    (rec,) = src.records()
    assert rec.spectrum.shape == (100,) and src.spectrum_grid.resampled == 1
    assert np.isfinite(rec.spectrum).all()
    assert line_centre(MODEL_GRID, rec.spectrum) == pytest.approx(LINE, abs=0.05)
    # flux-conserving: 5083.6-5123.6 Å (model pixels 42..61, DESI pixels 105..154) holds the same flux on both grids
    native = read_fits_spectrum((root / "spectra" / "obj0.fits").read_bytes(), "obj0.fits")
    assert (rec.spectrum[42:62] * 2.0).sum() == pytest.approx((native.flux[105:155] * STEP).sum(), rel=1e-5)
    assert (rec.spectrum[42:62] * 2.0).sum() > 20.0 * 2 * LEVEL["R"] + 30  # the line (5 x 3 x sqrt(2 pi) = 37.6) is in


def test_multi_target_coadd_pairs_by_targetid(tmp_path, capsys):
    root = tmp_path / "data"
    lines = (5090.0, 5105.0, 5115.0)
    ids = [39627000000000001, 39627000000000002, 39627000000000003]
    (root / "spectra").mkdir(parents=True)
    coadd = write_desi(root / "spectra" / "coadd-main-dark-10032.fits", lines=lines, targetids=ids)
    write_images(root / "images", [str(ids[0]), str(ids[2]), "no_spectrum"])
    # the same target again in a one-target file: the first file in path order (this one) is used, and it is logged
    write_desi(root / "spectra" / f"{ids[2]}.fits", lines=(5100.0,), one_d=True, fibermap=False)
    src = open_source(root, wavelength=MODEL_GRID.tolist())
    assert src.format == "paired" and src.unpaired_spectra == [str(ids[1])]
    assert src.duplicate_spectra == [str(ids[2])]
    lines = (lines[0], lines[1], 5100.0)
    recs = {r.object_id: r for r in src.records()}
    assert recs["no_spectrum"].spectrum is None
    for k in (0, 2):  # each image gets its own target's row
        assert line_centre(MODEL_GRID, recs[str(ids[k])].spectrum, near=lines[k]) == pytest.approx(lines[k], abs=0.05)
    # read alone, a multi-target file is refused with the hint to name it coadd-*
    with pytest.raises(BadRecordError, match=r"coadd-main-dark-10032\.fits: holds 3 targets .*coadd-\*\.fits"):
        read_fits_spectrum(coadd.read_bytes(), str(coadd))
    assert cli.main(["inspect", "--data", str(root), "--show", "0"]) == 0
    out = capsys.readouterr().out
    assert "spectra:       2 of 3 records have one" in out and "grid:        5000-5207.2 A, 260 px, step 0.8" in out


def _drop(name):
    return lambda h: h.pop(name)


def _shorten(h):
    h["R_FLUX"] = h["R_FLUX"][..., :-1]


def _reverse(h):
    h["Z_WAVELENGTH"][50:] = h["Z_WAVELENGTH"][50:][::-1].copy()


def _no_ivar(h):
    for arm in ARMS:
        h[f"{arm}_IVAR"][...] = 0.0


BAD = {
    "missing arm extension": (_drop("R_IVAR"), r"arm R: missing extension R_IVAR"),
    "missing wavelength": (_drop("Z_WAVELENGTH"), r"arm Z: missing extension Z_WAVELENGTH"),
    "arm lengths differ": (_shorten, r"arm R: wrong length: R_FLUX has 99 pixels, R_WAVELENGTH 100"),
    "non-monotonic wavelength": (_reverse, r"arm Z: Z_WAVELENGTH is not finite and strictly increasing"),
    "all-zero ivar": (_no_ivar, r"unusable spectrum: its ivar is 0 everywhere"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("layout", ["one target", "coadd"])
def test_bad_per_camera_files_name_the_file(tmp_path, case, layout):
    edit, reason = BAD[case]
    root = tmp_path / "data"
    (root / "spectra").mkdir(parents=True)
    if layout == "one target":
        bad = write_desi(root / "spectra" / "obj1.fits", one_d=True, edit=edit, fibermap=False)
        write_desi(root / "spectra" / "obj0.fits", one_d=True, fibermap=False)
        write_images(root / "images", ["obj0", "obj1"])
        row, name = None, "obj1"
    else:  # two targets in one coadd, broken for both
        bad = write_desi(root / "spectra" / "coadd-x.fits", lines=(LINE, LINE), edit=edit, targetids=[11, 12])
        write_images(root / "images", ["11", "12"])
        row, name = 1, "12"
    with pytest.raises(BadRecordError, match=reason) as err:
        list(open_source(root, wavelength=MODEL_GRID.tolist()).records())
    assert err.value.file == str(bad) and str(bad) in str(err.value)
    if row is not None:
        assert err.value.row == 0 and err.value.object_id == "11"
    # with skip_bad only the spectrum is dropped: the image stays, the manifest says why
    manifest = tmp_path / "skipped.jsonl"
    src = open_source(root, wavelength=MODEL_GRID.tolist(), skip_bad=True, manifest=manifest)
    recs = {r.object_id: r for r in src.records()}
    assert recs[name].spectrum is None and recs[name].image.shape == (8, 8, 3) and src.skipped == 0
    entries = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert src.spectra_dropped == len(entries) == (1 if row is None else 2)
    assert {e["dropped"] for e in entries} == {"spectrum"} and entries[-1]["object_id"] == name
    assert entries[-1]["file"] == str(bad) and entries[-1]["row"] == row and re.search(reason, entries[-1]["reason"])


def test_coadd_without_fibermap_or_with_arms_of_different_target_counts(tmp_path):
    root = tmp_path / "data"
    (root / "spectra").mkdir(parents=True)
    write_images(root / "images", ["11"])
    path = write_desi(root / "spectra" / "coadd-a.fits", lines=(LINE, LINE), fibermap=False)
    with pytest.raises(BadRecordError, match=r"coadd-a\.fits: cannot index .* no FIBERMAP table with a TARGETID"):
        open_source(root)
    src = open_source(root, skip_bad=True)  # listed, and the images read on without spectra
    assert src.skipped == 1 and src.bad[0]["file"] == str(path) and next(src.records()).spectrum is None

    def extra_z_row(h):
        h["Z_FLUX"] = np.concatenate([h["Z_FLUX"], h["Z_FLUX"][:1]])

    write_desi(path, lines=(LINE, LINE), edit=extra_z_row, targetids=[11, 12])
    with pytest.raises(BadRecordError, match=r"coadd-a\.fits row 0: arms hold different numbers of targets"):
        list(open_source(root).records())
