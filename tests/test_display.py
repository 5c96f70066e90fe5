"""The Legacy Survey viewer's rendering (`astrolom.data.display`) against numbers worked out by hand from the viewer's
formula (legacysurvey/imagine map/views.py: dr2_rgb / LsDr10Layer.get_rgb), and `astrolom survey --format jpeg`."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from astrolom import cli
from astrolom import mock as S
from astrolom.data.display import to_8bit, viewer_jpeg, viewer_rgb
from astrolom.data.sources import open_source


def asinh_factor(mean: float) -> float:
    return math.asinh(20.0 * mean) / math.sqrt(20.0) / mean


def test_grz_rendering_matches_the_viewer_formula_worked_by_hand():
    img = np.array([[[0.1, 0.2, 0.3], [0.0, 0.0, 0.0], [10.0, 10.0, 10.0], [-1.0, 0.2, 0.3]]], np.float32)
    rgb = viewer_rgb(img)
    # pixel 0: x_g = 0.1*6.0+0.03 = 0.63, x_r = 0.2*3.4+0.03 = 0.71, x_z = 0.3*2.2+0.03 = 0.69; I = 0.676667;
    # asinh(20 I)/sqrt(20) = asinh(13.5333)/4.47214 = 3.29967/4.47214 = 0.737826; factor 1.090383
    # -> R = z = 0.752364 (191.85), G = r = 0.774172 (197.41), B = g = 0.686941 (175.17)
    np.testing.assert_allclose(rgb[0, 0], [0.752364, 0.774172, 0.686941], atol=2e-6)
    # pixel 1, empty sky: every band 0.03, I = 0.03, asinh(0.6)/sqrt(20) = 0.127193 -> grey 32.43
    np.testing.assert_allclose(rgb[0, 1], [0.127193] * 3, atol=2e-6)
    # pixel 2, bright: x = 60.03, 34.03, 22.03; I = 38.6967; factor 0.0424398 -> g 2.548, r 1.444 clip to 1, z 0.93495
    assert rgb[0, 2, 0] == pytest.approx(22.03 * asinh_factor(38.696667), abs=2e-6) and rgb[0, 2, 0] < 1
    np.testing.assert_array_equal(rgb[0, 2, 1:], [1.0, 1.0])
    # pixel 3, negative g: max(0, -5.97) = 0 enters I = (0 + 0.71 + 0.69)/3, the blue plane clips to 0
    f = asinh_factor(1.4 / 3)
    np.testing.assert_allclose(rgb[0, 3], [0.69 * f, 0.71 * f, 0.0], atol=2e-6)
    # 8 bits the way matplotlib's imsave makes them: floor(255 v), not rounding
    np.testing.assert_array_equal(to_8bit(rgb)[0], [[191, 197, 175], [32, 32, 32], [238, 255, 255], [246, 254, 0]])


def test_dr10_griz_rendering_mixes_bands_as_the_viewer_does():
    rgb = viewer_rgb(np.array([[[0.1, 0.2, 0.25, 0.3]]], np.float32), ("g", "r", "i", "z"), "ls-dr10-griz")
    # scales x1.5: g 9.0, r 5.1, i 4.5, z 3.3 -> x = 0.93, 1.05, 1.155, 1.02; I = 1.03875; factor 0.802392
    v = np.array([0.93, 1.05, 1.155, 1.02]) * asinh_factor(1.03875)  # each band clipped to [0, 1] (none here)
    g, r, i, z = v
    want = [0.25 * i + 0.75 * z, 0.5 * r + 0.5 * i, 0.75 * g + 0.25 * r]  # = 0.845521, 0.884638, 0.770297
    np.testing.assert_allclose(rgb[0, 0], want, atol=2e-6)
    np.testing.assert_array_equal(to_8bit(rgb)[0, 0], [215, 225, 196])


def test_band_order_and_errors():
    img = np.random.default_rng(0).normal(0.05, 0.02, (8, 8, 3)).astype(np.float32)
    zrg = img[..., ::-1]
    np.testing.assert_array_equal(viewer_rgb(zrg, ("z", "r", "g")), viewer_rgb(img))  # bands by name, any order
    with pytest.raises(ValueError, match=r"layer ls-dr9 renders bands g,r,z; the image lacks z"):
        viewer_rgb(img, ("g", "r", "i"))
    with pytest.raises(ValueError, match=r"unknown viewer layer 'sdss'"):
        viewer_rgb(img, layer="sdss")
    with pytest.raises(ValueError, match=r"does not hold one plane per band"):
        viewer_rgb(img[..., :2])


def resampled(img: np.ndarray, size: int) -> np.ndarray:
    """Lanczos resampling of each band, flux per pixel scaled by the pixel-area ratio."""
    area = (img.shape[0] / size) ** 2
    planes = [Image.fromarray(img[..., c], mode="F").resize((size, size), Image.LANCZOS) for c in range(img.shape[2])]
    return np.stack([np.asarray(p) * area for p in planes], axis=-1)


@pytest.mark.slow
def test_survey_writes_viewer_jpegs_readable_as_the_paper_layout(tmp_path, capsys):
    out = tmp_path / "jpeg"
    args = ["survey", "--n", "5", "--size", "32", "--seed", "3", "--workers", "1", "--no-progress"]
    assert cli.main([*args, "--out", str(out), "--format", "jpeg", "--jpeg-size", "64"]) == 0
    capsys.readouterr()
    table = pq.read_table(out / "shard-00000.parquet")
    assert table.schema.field("image").type.names == ["bytes", "path"] and "image_shape" not in table.schema.names
    meta = json.loads((out / "_survey.json").read_text())
    assert meta["image_shape"] == [64, 64, 3] and meta["pixel_scale"] == pytest.approx(0.131)
    src = open_source(out)
    assert src.layout == "hf-image-struct" and src.image_shape == (64, 64, 3) and src.bands == ("R", "G", "B")
    recs = list(src.records())
    assert len(recs) == 5 and recs[0].pixels.dtype == np.uint8 and "redshift" in recs[0].labels
    # the JPEGs are the viewer rendering of the same objects' flux stamps, resampled to 64 px
    flux = S.generate_objects(5, size=32, seed=3)
    stored = table.column("image").to_pylist()
    for rec, obj, cell in zip(recs, flux, stored, strict=True):
        assert rec.object_id == obj.object_id and cell["path"] == f"{obj.object_id}.jpg"
        assert cell["bytes"] == viewer_jpeg(obj.image, size=64)  # deterministic: the same bytes
        exact = to_8bit(viewer_rgb(resampled(obj.image, 64))).astype(np.float64)
        err = rec.pixels.astype(np.float64) - exact
        # JPEG q90 with 4:2:0 chroma keeps brightness and the galaxy's colour (measured: grey level off by 1.0-2.0
        # per pixel on average, centre colour by < 1 level, bias < 0.1); the noise's per-pixel colour it does not
        assert np.abs(err.mean(-1)).mean() < 3.0 and abs(err.mean()) < 0.5
        assert np.abs(err[24:40, 24:40].mean((0, 1))).max() < 2.0
        assert rec.pixels.mean() > 20  # the sky renders grey (m = 0.03 offset), not black
    assert cli.main([*args, "--out", str(tmp_path / "x"), "--jpeg-size", "64"]) == 2
    assert "astrolom survey: error: --jpeg-size needs --format jpeg" in capsys.readouterr().err


def _shown_images(monkeypatch) -> list[np.ndarray]:
    """Collects every array a figure passes to `imshow` (the pixels the figure shows, before matplotlib resamples)."""
    from matplotlib.axes import Axes

    shown, imshow = [], Axes.imshow

    def spy(self, x, *args, **kwargs):
        shown.append(np.asarray(x))
        return imshow(self, x, *args, **kwargs)

    monkeypatch.setattr(Axes, "imshow", spy)
    return shown


def test_report_figures_and_explorer_show_a_stamp_as_viewer_rgb(mock_survey, model_index, monkeypatch, tmp_path):
    import io

    import torch
    from fastapi.testclient import TestClient

    from astrolom.align.features import FeatureCache
    from astrolom.align.figures import retrieval_figure
    from astrolom.eval import figures as fg
    from astrolom.serve import app as sa

    src = open_source(mock_survey)
    recs = list(src.records())[:2]
    assert src.bands == ("g", "r", "z")
    stamps = np.stack([r.image for r in recs])
    want = [viewer_rgb(s) for s in stamps]
    assert all(0.05 < w.mean() < 0.95 for w in want)  # a real rendering, neither black nor saturated
    # explorer: the cutout endpoint's PNG at the stamp's own size is the viewer rendering in 8 bits
    client = TestClient(sa.create_app(model_index), base_url="http://127.0.0.1:8000")
    for rec, w in zip(recs, want, strict=True):
        png = client.get(f"/api/object/{rec.object_id}/cutout.png?size={stamps.shape[1]}")
        assert png.status_code == 200
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")), to_8bit(w))
    # report: the inpainting figure's truth row
    shown = _shown_images(monkeypatch)
    fake = {"truth": stamps, "masked": np.zeros_like(stamps), "inpainted": stamps, "k": 1, "generated": 3,
            "mse": 0.5, "mse_zero": 1.0}  # fmt: skip
    fg.plot_inpainting(fake, tmp_path / "inpainting", src.bands)
    assert len(shown) == 3 * len(stamps)
    for got, w in zip(shown[: len(stamps)], want, strict=True):
        np.testing.assert_array_equal(got, w)
    # alignment figures: the retrieval figure's query and match stamps (bands recorded in the feature cache)
    shown.clear()
    n = len(stamps)
    cache = FeatureCache(
        torch.zeros(n, 1, 2, 4), torch.eye(n, 4)[:, None].repeat(1, 2, 1), torch.ones(n, 2, dtype=torch.bool),
        torch.zeros(n, 1), torch.from_numpy(stamps), torch.ones(n, 8), [r.object_id for r in recs], ["test"] * n,
        ["redshift"], {"bands": list(src.bands)},
    )  # fmt: skip
    emb = {"images": np.eye(n), "spectra": np.eye(n)}  # every query's best match is itself
    retrieval_figure(cache, emb, tmp_path / "retrieval.png", n_query=n, top=1)
    assert len(shown) == 2 * n
    for k in range(0, 2 * n, 2):
        np.testing.assert_array_equal(shown[k], shown[k + 1])  # the query and its match: the same stamp
        assert any(np.array_equal(shown[k], w) for w in want)
    src.close()
