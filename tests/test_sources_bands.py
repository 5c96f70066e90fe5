"""Band selection by name (`bands=`, `data.bands=g,r,z`, `inspect --bands`) and Legacy Survey viewer FITS cutouts.

Real files: the Parquet shards are the mock survey written by astrolom's own survey tool (bands g, r, z in its
metadata); `tests/data/legacysurvey_viewer/mrk421_ls-dr9_g.fits` is a one-band cutout written by the viewer itself
(astroquery's test file; provenance in the README beside it). No real multi-band viewer cutout could be found (searched:
pip wheels of specutils, ppxf, astroquery, pydl, linetools; the legacysurvey/imagine, legacypipe, zoobot,
galaxy-datasets, hostphot and legacystamps repositories; code search for the viewer's header cards), so the cube layout
is reproduced from the code that writes it — legacysurvey/imagine `map/views.py` `write_cutout` (commit 8402fc3): a
float32 (C, H, W) primary cube with BANDS='griz' and BAND0..BAND3, IMAGETYP='IMAGE', optionally followed by an
IMAGETYP='INVVAR' cube — and says so here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from astropy.io import fits

from astrolom import cli
from astrolom import mock as S
from astrolom.config import apply_overrides
from astrolom.data.sources import BadRecordError, SourceOptions, open_source
from astrolom.train.config import PretrainConfig

VIEWER_G = Path(__file__).parent / "data" / "legacysurvey_viewer" / "mrk421_ls-dr9_g.fits"


@pytest.fixture(scope="module")
def mock_grz(tmp_path_factory):
    out = tmp_path_factory.mktemp("grz")
    S.generate_survey(out, n=4, size=32, seed=2, workers=1, progress=False)
    return out


def write_viewer_cutout(path, cube: np.ndarray, bands: str, invvar: bool = True):
    """The header cards imagine's write_cutouts sets on a multi-band cutout (see the module docstring)."""
    hdr = fits.Header()
    hdr["BANDS"] = bands
    for i, b in enumerate(bands):
        hdr[f"BAND{i}"] = b
    hdr["IMAGETYP"] = "IMAGE"
    hdus = [fits.PrimaryHDU(cube.astype(np.float32), header=hdr)]
    if invvar:
        iv = hdr.copy()
        iv["IMAGETYP"] = "INVVAR"
        hdus.append(fits.ImageHDU(np.full_like(cube, 400.0, np.float32), header=iv))
    fits.HDUList(hdus).writeto(path)
    return path


def test_selecting_named_bands_of_our_grz_shards(mock_grz):
    full = {r.object_id: r.image for r in open_source(mock_grz).records()}
    src = open_source(mock_grz, bands=("z", "g"))
    assert src.bands == ("z", "g") and src.image_shape == (32, 32, 2)
    for rec in src.records():
        np.testing.assert_array_equal(rec.image, full[rec.object_id][..., [2, 0]])
    with pytest.raises(BadRecordError, match=r"shard-00000\.parquet row 0: has no band i \(bands asked for: g,r,i\); "
                       r"it has bands g,r,z"):  # fmt: skip
        list(open_source(mock_grz, bands=("g", "r", "i")).records())


def test_viewer_cube_band_names_and_invvar_hdu(tmp_path):
    rng = np.random.default_rng(1)
    cube = rng.normal(0.0, 0.05, (4, 16, 16))
    write_viewer_cutout(tmp_path / "dr10.fits", cube, "griz")
    src = open_source(tmp_path / "dr10.fits")
    assert src.bands == ("g", "r", "i", "z") and src.image_shape == (16, 16, 4)  # BAND0.. (not BAND1..), no INVVAR
    (rec,) = src.records()
    np.testing.assert_allclose(rec.image, cube.transpose(1, 2, 0).astype(np.float32))


def test_real_one_band_viewer_cutout(tmp_path):
    """The viewer's own file: a 2-D image named only by BANDS='g' / BAND0='g' (it was read as 'band0' before)."""
    with fits.open(VIEWER_G) as hdul:
        assert len(hdul) == 1 and hdul[0].header["BANDS"] == "g" and "BAND" not in hdul[0].header
        truth = hdul[0].data.astype(np.float64)
    src = open_source(VIEWER_G)
    assert src.bands == ("g",) and src.image_shape == (60, 60, 1)
    (rec,) = src.records()
    assert rec.object_id == "mrk421_ls-dr9_g" and rec.image.dtype == np.float32
    np.testing.assert_array_equal(rec.image[..., 0], truth)  # H x W as astropy reads it, never transposed
    assert rec.image.max() == pytest.approx(10.159872, rel=1e-6)  # the blazar's peak, nanomaggies
    (only_g,) = open_source(VIEWER_G, bands="g").records()
    np.testing.assert_array_equal(only_g.image, rec.image)
    with pytest.raises(BadRecordError, match=r"mrk421_ls-dr9_g\.fits: has no band r,z \(bands asked for: g,r,z\); "
                       r"it has bands g"):  # fmt: skip
        list(open_source(VIEWER_G, bands="g,r,z").records())


def test_grz_model_on_griz_cutouts_takes_the_named_bands(tmp_path, capsys):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cutouts"
    folder.mkdir()
    cubes = {f"obj{k}": rng.normal(0.0, 0.05, (4, 16, 16)) for k in range(3)}
    for name, cube in cubes.items():
        write_viewer_cutout(folder / f"{name}.fits", cube, "griz")
    src = open_source(folder, bands="g,r,z")
    assert src.bands == ("g", "r", "z") and src.image_shape == (16, 16, 3)
    for rec in src.records():
        np.testing.assert_allclose(rec.image, cubes[rec.object_id][[0, 1, 3]].transpose(1, 2, 0).astype(np.float32))
    # a DR9-like grz cutout among them, read for a griz model: an error naming the file and the bands it has
    write_viewer_cutout(folder / "obj9.fits", rng.normal(0.0, 0.05, (3, 16, 16)), "grz", invvar=False)
    with pytest.raises(
        BadRecordError, match=r"obj9\.fits: has no band i \(bands asked for: g,r,i,z\); it has bands g,r,z"
    ):
        list(open_source(folder, bands=("g", "r", "i", "z")).records())
    src = open_source(folder, bands=("g", "r", "i", "z"), skip_bad=True)
    assert len(list(src.records())) == 3 and src.skipped == 1 and "obj9.fits" in src.bad[0]["file"]
    assert cli.main(["inspect", "--data", str(folder), "--bands", "g,r,z", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "image shape:   (16, 16, 3)" in out and "bands:         g, r, z" in out


def test_bands_option_and_config():
    assert SourceOptions(bands="g, r,z").bands == ("g", "r", "z")
    with pytest.raises(ValueError, match="distinct band names"):
        SourceOptions(bands=("g", "g"))
    cfg = apply_overrides(PretrainConfig(), ["data.bands=g,r,z"])
    assert cfg.data.bands == ("g", "r", "z")
    assert PretrainConfig().data.bands is None


def test_a_file_that_names_no_bands_cannot_be_selected_from(tmp_path):
    fits.PrimaryHDU(np.zeros((3, 8, 8), np.float32)).writeto(tmp_path / "anon.fits")
    src = open_source(tmp_path / "anon.fits")
    assert src.bands == ("band0", "band1", "band2")  # no BAND/BANDS/FILTER cards
    with pytest.raises(BadRecordError, match=r"anon\.fits: has no band g .*it has bands band0,band1,band2"):
        list(open_source(tmp_path / "anon.fits", bands=("g",)).records())


@pytest.mark.slow
def test_pretrain_with_data_bands_on_griz_cutouts_and_embed_with_them(tmp_path, capsys):
    from pretrain_helpers import TINY, pretrain_here, read_metrics

    from astrolom.eval.embeddings import load_embeddings
    from astrolom.model.pretrained import load_model

    rng = np.random.default_rng(3)
    folder = tmp_path / "cutouts"
    folder.mkdir()
    cubes = {f"obj{k:02d}": rng.normal(0.0, 0.05, (4, 32, 32)) for k in range(16)}
    for name, cube in cubes.items():
        write_viewer_cutout(folder / f"{name}.fits", cube, "griz")
    out = tmp_path / "run"
    args = ["--data", str(folder), "--out", str(out), "--preset", "debug", "--max-steps", "2", *TINY]
    args += ["train.batch_size=4", "train.micro_batch_size=4", "train.eval_interval=0", "train.checkpoint_interval=0"]
    assert pretrain_here([*args, "data.bands=g,r,z"]) == 0
    assert len([r for r in read_metrics(out) if "loss" in r]) == 2
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["model"]["n_chan"] == 3 and cfg["data"]["n_chan"] == 3  # g, r, z of the four planes
    assert cfg["data"]["bands"] == ["g", "r", "z"]  # what embedding reads from data sets with more bands
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["bands"] == ["g", "r", "z"]  # the run's config

    # embedding reads the data as the run did: the grz model takes g, r, z by name from the griz cutouts, so its
    # embeddings are those of the same objects cut out in g, r, z only
    _, meta = load_model(out)
    assert meta["split_settings"]["bands"] == ("g", "r", "z")
    solo = tmp_path / "solo"  # the model directory alone (no RUN/config.yaml beside it) keeps its bands
    solo.mkdir()
    for f in (out / "final").iterdir():
        (solo / f.name).write_bytes(f.read_bytes())
    assert load_model(solo)[1]["split_settings"]["bands"] == ("g", "r", "z")
    grz = tmp_path / "grz"
    grz.mkdir()
    for name, cube in cubes.items():
        write_viewer_cutout(grz / f"{name}.fits", cube[[0, 1, 3]], "grz")
    embed = ["embed", "--model", str(out), "--splits", "train,val,test", "--no-progress"]
    assert cli.main([*embed, "--data", str(folder), "--out", str(tmp_path / "griz.parquet")]) == 0
    assert cli.main([*embed, "--data", str(grz), "--out", str(tmp_path / "grz.parquet")]) == 0
    from_griz, from_grz = load_embeddings(tmp_path / "griz.parquet"), load_embeddings(tmp_path / "grz.parquet")
    assert sorted(from_griz.object_id) == sorted(cubes) and list(from_griz.object_id) == list(from_grz.object_id)
    np.testing.assert_allclose(from_griz.X, from_grz.X, atol=1e-6)
    assert from_griz.metadata["split_settings"]["bands"] == ["g", "r", "z"]
    # a cutout without one of the model's bands: an error naming the file, the band and the bands it has
    write_viewer_cutout(folder / "obj99.fits", rng.normal(0.0, 0.05, (4, 32, 32)), "griy", invvar=False)
    capsys.readouterr()
    assert cli.main([*embed, "--data", str(folder), "--out", str(tmp_path / "bad.parquet")]) == 2
    err = capsys.readouterr().err
    assert "obj99.fits: has no band z (bands asked for: g,r,z); it has bands g,r,i,y" in err, err
    assert not (tmp_path / "bad.parquet").exists()
