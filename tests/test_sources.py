"""Readers: every format gives back the same images (HWC, never transposed), ids, labels and splits."""

from __future__ import annotations

import gzip
import io
import json
import logging

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from PIL import Image

from astrolom import cli
from astrolom.data.records import METADATA_KEY, split_of
from astrolom.data.sources import BadRecordError, ImageDirSource, PixelRecord, SourceOptions, detect_format, open_source

H, W = 32, 48  # non-square on purpose: a transpose cannot go unnoticed


def _rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    base = (yy * 3 + xx * 5 + seed * 7) % 256  # row/column asymmetric pattern
    img = np.stack([base, (base + 80) % 256, rng.integers(0, 256, (h, w))], axis=-1)
    return img.astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    b = io.BytesIO()
    Image.fromarray(img).save(b, format="JPEG", quality=quality)
    return b.getvalue()


def _png(img: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(img.squeeze()).save(b, format="PNG")
    return b.getvalue()


def _pil_decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float32) / 255


def _float_cube(seed: int, c: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    return np.stack([yy * 100.0 + xx + k * 1e4 + rng.normal(size=(H, W)) for k in range(c)], -1).astype(np.float32)


def _write_ours(path, n=6, start=0, row_group_size=None, bands=("g", "r", "z"), with_split=True):
    imgs = [_float_cube(start + i) for i in range(n)]
    cols = {
        "object_id": [f"obj{start + i:04d}" for i in range(n)],
        "image": [a.astype("<f4").tobytes() for a in imgs],
        "image_shape": [list(a.shape) for a in imgs],
        "redshift": [0.1 * (start + i) for i in range(n)],
        "telescope": ["north" if (start + i) % 2 else "south" for i in range(n)],
        "spectrum": [np.arange(10, dtype="<f4").tobytes() * 1 for _ in range(n)],
    }
    if with_split:
        cols["split"] = [("train", "val", "test")[(start + i) % 3] for i in range(n)]
    table = pa.table(cols)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps({"bands": list(bands)}).encode()})
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return imgs


# ---------------------------------------------------------------------------------------------- images


def test_image_dir_jpeg_png_nested(tmp_path):
    d = tmp_path / "cutouts"
    (d / "north").mkdir(parents=True)
    originals = {}
    for i in range(3):
        img = _rgb(i)
        (d / f"gal{i}.png").write_bytes(_png(img))
        originals[f"gal{i}"] = img.astype(np.float32) / 255
    jb = _jpeg(_rgb(9))
    (d / "north" / "gal9.jpg").write_bytes(jb)
    originals["north/gal9"] = _pil_decode(jb)

    assert detect_format(str(d)) == "images"
    src = open_source(str(d))
    assert src.format == "images" and len(src) == 4
    assert src.image_shape == (H, W, 3) and src.bands == ("R", "G", "B")
    recs = list(src.records())
    assert [r.object_id for r in recs] == ["gal0", "gal1", "gal2", "north/gal9"]
    for r in recs:
        assert isinstance(r, PixelRecord)
        assert r.image.dtype == np.float32 and r.image.shape == (H, W, 3)
        np.testing.assert_array_equal(r.image, originals[r.object_id])  # PNG exact, JPEG = PIL's decode
        assert r.split == split_of(r.object_id)
        assert r.labels == {} and r.spectrum is None
    # the pixel asymmetry survives: row 1 - row 0 = 3/255, column 1 - column 0 = 5/255 in the first band
    img0 = recs[0].image
    assert img0[1, 0, 0] - img0[0, 0, 0] == pytest.approx(3 / 255, abs=1e-6)
    assert img0[0, 1, 0] - img0[0, 0, 0] == pytest.approx(5 / 255, abs=1e-6)


def test_image_greyscale_and_single_file(tmp_path):
    g = (np.arange(H * W).reshape(H, W) % 251).astype(np.uint8)
    p = tmp_path / "one.png"
    p.write_bytes(_png(g))
    src = open_source(str(p))
    (rec,) = list(src.records())
    assert rec.image.shape == (H, W, 1) and src.bands == ("L",)
    np.testing.assert_array_equal(rec.image[..., 0], g / np.float32(255))


# ------------------------------------------------------------------------------------------------ FITS


def test_fits_mef_cube_gz_with_nans(tmp_path):
    d = tmp_path / "fits"
    d.mkdir()
    a = _float_cube(1)
    mef = fits.HDUList([fits.PrimaryHDU()])
    for k, band in enumerate("grz"):
        hdu = fits.ImageHDU(a[:, :, k], name=band.upper())
        hdu.header["FILTER"] = band
        mef.append(hdu)
    mef.writeto(d / "a_mef.fits")
    b = _float_cube(2)
    b_nan = b.copy()
    b_nan[3, 5, 0] = np.nan
    b_nan[10:12, 7, 2] = np.nan
    cube = fits.PrimaryHDU(np.ascontiguousarray(b_nan.transpose(2, 0, 1)))  # (C, H, W) on disk
    buf = io.BytesIO()
    cube.writeto(buf)
    (d / "b_cube.fits.gz").write_bytes(gzip.compress(buf.getvalue()))

    assert detect_format(str(d)) == "fits"
    src = open_source(str(d))
    assert len(src) == 2 and src.image_shape == (H, W, 3)
    assert src.bands == ("g", "r", "z")
    ra, rb = list(src.records())
    assert (ra.object_id, rb.object_id) == ("a_mef", "b_cube")
    np.testing.assert_array_equal(ra.image, a)
    want = b.copy()
    want[3, 5, 0] = np.median(b_nan[:, :, 0][np.isfinite(b_nan[:, :, 0])])
    want[10:12, 7, 2] = np.median(b_nan[:, :, 2][np.isfinite(b_nan[:, :, 2])])
    np.testing.assert_array_equal(rb.image, want)
    assert src.masked_pixels == 3 and src.masked_records == 1


# ---------------------------------------------------------------------------------------------- arrays


def test_npy_memmap_and_npz_labels(tmp_path):
    imgs = np.stack([_float_cube(i) for i in range(5)])
    np.save(tmp_path / "stack.npy", imgs)
    src = open_source(str(tmp_path / "stack.npy"), chunk_rows=2)
    assert src.format == "npy" and len(src) == 5 and src.num_chunks == 3 and src.image_shape == (H, W, 3)
    recs = list(src.records())
    assert [r.object_id for r in recs] == [f"stack:{i}" for i in range(5)]
    for i, r in enumerate(recs):
        np.testing.assert_array_equal(r.image, imgs[i])
    # rows picked out of order come back in the order asked for
    got = src.read(1, [1, 0])
    assert [r.object_id for r in got] == ["stack:3", "stack:2"]

    ids = np.array([f"g{i}" for i in range(5)])
    z = np.linspace(0, 1, 5)
    split = np.array(["train", "train", "validation", "test", "train"])
    np.savez(tmp_path / "set.npz", images=imgs[..., :2], object_id=ids, redshift=z, split=split)
    src = open_source(str(tmp_path / "set.npz"))
    recs = list(src.records())
    assert [r.object_id for r in recs] == list(ids)
    assert [r.split for r in recs] == ["train", "train", "val", "test", "train"]
    assert [r.labels["redshift"] for r in recs] == pytest.approx(list(z))
    np.testing.assert_array_equal(recs[3].image, imgs[3, ..., :2])
    assert src.label_columns == ["redshift"]


def test_hdf5_default_and_custom_key(tmp_path):
    imgs = np.stack([_float_cube(i) for i in range(4)])
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["images"] = imgs
        f["images"].attrs["bands"] = ["g", "r", "z"]
        f["object_id"] = np.array([b"x0", b"x1", b"x2", b"x3"])
        f["mass"] = np.array([9.0, 10.0, 10.5, 11.0])
    src = open_source(str(tmp_path / "a.h5"))
    assert src.format == "hdf5" and src.bands == ("g", "r", "z")
    recs = list(src.records())
    assert [r.object_id for r in recs] == ["x0", "x1", "x2", "x3"]
    assert [r.labels["mass"] for r in recs] == [9.0, 10.0, 10.5, 11.0]
    assert [r.split for r in recs] == [split_of(f"x{i}") for i in range(4)]
    np.testing.assert_array_equal(recs[2].image, imgs[2])
    assert src.read(0, [3, 1])[0].object_id == "x3"

    with h5py.File(tmp_path / "b.hdf5", "w") as f:
        f["cutouts"] = imgs[:, :, :, 0]  # (N, H, W): one band
    with pytest.raises(ValueError, match="no dataset 'images'.*cutouts"):
        open_source(str(tmp_path / "b.hdf5"))
    src = open_source(str(tmp_path / "b.hdf5"), image_key="cutouts")
    np.testing.assert_array_equal(next(src.records()).image, imgs[0, :, :, :1])


# --------------------------------------------------------------------------------------------- parquet


def test_parquet_ours_folder_row_groups(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    a = _write_ours(d / "part-000.parquet", n=5, start=0, row_group_size=2)
    b = _write_ours(d / "part-001.parquet", n=3, start=5)
    src = open_source(str(d))
    assert src.format == "parquet" and src.layout == "raw-float32"
    assert len(src) == 8 and src.num_chunks == 4  # row groups 2+2+1 and 3
    assert src.bands == ("g", "r", "z") and src.image_shape == (H, W, 3)
    assert src.label_columns == ["redshift", "telescope"]
    recs = list(src.records())
    assert [r.object_id for r in recs] == [f"obj{i:04d}" for i in range(8)]
    assert [r.split for r in recs] == [("train", "val", "test")[i % 3] for i in range(8)]
    for r, img in zip(recs, a + b, strict=True):
        np.testing.assert_array_equal(r.image, img)
    assert recs[6].labels == {"redshift": pytest.approx(0.6), "telescope": "south"}
    np.testing.assert_array_equal(recs[0].spectrum, np.arange(10, dtype=np.float32))
    # glob and single file name the same data
    assert len(open_source(str(d / "part-*.parquet"))) == 8
    assert len(open_source(str(d / "part-001.parquet"))) == 3


def _smith42_rows(n, start=0):
    imgs = [_rgb(start + i, 64, 48) for i in range(n)]
    jpegs = [_jpeg(x) for x in imgs]
    meta = {
        "dr8_id": [f"{1000 + start + i}_south" for i in range(n)],
        "ra": [10.0 + i for i in range(n)],
        "redshift": [0.05 * (i + 1) for i in range(n)],
        "smooth-or-featured_smooth_fraction": [0.1 * i for i in range(n)],
    }
    return jpegs, meta


def test_parquet_smith42_jpeg_bytes(tmp_path):
    jpegs, meta = _smith42_rows(4)
    pq.write_table(pa.table({"image": jpegs, **meta}), str(tmp_path / "galaxies.parquet"))
    src = open_source(str(tmp_path / "galaxies.parquet"))
    assert src.layout == "encoded-bytes" and src.image_shape == (64, 48, 3)
    assert src.label_columns == ["ra", "redshift", "smooth-or-featured_smooth_fraction"]
    recs = list(src.records())
    assert [r.object_id for r in recs] == meta["dr8_id"]
    assert [r.split for r in recs] == [split_of(x) for x in meta["dr8_id"]]
    for r, jb in zip(recs, jpegs, strict=True):
        np.testing.assert_array_equal(r.image, _pil_decode(jb))
    assert recs[2].labels["redshift"] == pytest.approx(0.15)


def test_parquet_hf_image_struct_memory_fs(tmp_path):
    import fsspec

    jpegs, meta = _smith42_rows(5, start=3)
    struct = pa.array(
        [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(jpegs)],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"image": struct, **meta})
    mem = fsspec.filesystem("memory")
    with mem.open("/hf/train-00000-of-00001.parquet", "wb") as f:
        pq.write_table(table, f, row_group_size=2)
    src = open_source("memory:///hf")
    assert src.layout == "hf-image-struct" and len(src) == 5 and src.num_chunks == 3
    recs = list(src.records())
    assert [r.object_id for r in recs] == meta["dr8_id"]
    np.testing.assert_array_equal(recs[4].image, _pil_decode(jpegs[4]))
    # file:// URL of a local copy reads the same
    pq.write_table(table, str(tmp_path / "x.parquet"))
    again = list(open_source(f"file://{tmp_path}/x.parquet").records())
    assert [r.object_id for r in again] == meta["dr8_id"]
    mem.rm("/hf", recursive=True)


def test_parquet_written_by_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    jpegs, meta = _smith42_rows(3)
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in jpegs], **meta},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "dr8_id": datasets.Value("string"),
                "ra": datasets.Value("float64"),
                "redshift": datasets.Value("float64"),
                "smooth-or-featured_smooth_fraction": datasets.Value("float64"),
            }
        ),
    )
    ds.to_parquet(str(tmp_path / "train.parquet"))
    src = open_source(str(tmp_path / "train.parquet"))
    assert src.layout == "hf-image-struct"
    recs = list(src.records())
    assert [r.object_id for r in recs] == meta["dr8_id"]
    np.testing.assert_array_equal(recs[1].image, _pil_decode(jpegs[1]))


def test_image_dir_on_memory_fs():
    import fsspec

    mem = fsspec.filesystem("memory")
    for i in range(3):
        mem.pipe(f"/cut/g{i}.png", _png(_rgb(i)))
    src = open_source("memory:///cut")
    recs = list(src.records())
    assert [r.object_id for r in recs] == ["g0", "g1", "g2"]
    np.testing.assert_array_equal(recs[1].image, _rgb(1) / np.float32(255))
    mem.rm("/cut", recursive=True)


def test_keys_without_decoding(tmp_path):
    """chunk_keys must not decode images: a corrupt image does not disturb it, read does."""
    jpegs, meta = _smith42_rows(3)
    jpegs[1] = b"\xff\xd8 not really a jpeg"
    pq.write_table(pa.table({"image": jpegs, **meta}), str(tmp_path / "g.parquet"))
    src = open_source(str(tmp_path / "g.parquet"))
    ids, splits = src.chunk_keys(0)
    assert ids == meta["dr8_id"] and splits == [split_of(x) for x in ids]
    assert src.chunk_reads == 0
    assert [r.object_id for r in src.read(0, [2, 0])] == [meta["dr8_id"][2], meta["dr8_id"][0]]
    with pytest.raises(BadRecordError, match=r"g\.parquet row 1: cannot decode"):
        src.read(0, [1])


def test_detection_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(_rgb(0)))
    (tmp_path / "b.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes formats"):
        open_source(str(tmp_path))
    assert open_source(str(tmp_path), format="png").format == "images"
    with pytest.raises(ValueError, match="unknown format"):
        open_source(str(tmp_path), format="tiff")
    with pytest.raises(FileNotFoundError):
        open_source(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def good_dir(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for i in range(4):
        (d / f"ok{i}.jpg").write_bytes(_jpeg(_rgb(i)))
    return d


def _only(src, name):
    i = [r.rsplit("/", 1)[-1] for r in src.files].index(name)
    return src.read(i // src.chunk_rows, [i % src.chunk_rows])


def test_bad_truncated_jpeg(good_dir):
    (good_dir / "trunc.jpg").write_bytes(_jpeg(_rgb(7))[:600])
    src = open_source(str(good_dir))
    with pytest.raises(BadRecordError, match=r"trunc\.jpg: cannot decode: .*(?i:truncated)"):
        _only(src, "trunc.jpg")


def test_bad_corrupt_jpeg(good_dir):
    (good_dir / "corrupt.jpg").write_bytes(b"\x00\x01garbage" * 50)
    src = open_source(str(good_dir))
    with pytest.raises(BadRecordError, match=r"corrupt\.jpg: cannot decode: UnidentifiedImageError") as info:
        _only(src, "corrupt.jpg")
    assert type(info.value.__cause__).__name__ == "UnidentifiedImageError"  # the library's error is chained


def test_decoder_bug_is_not_a_bad_record(good_dir, monkeypatch):
    """Only damaged input becomes a BadRecordError (even under skip_bad); a programming error propagates."""

    def broken(data):
        raise AttributeError("a bug, not bad data")

    monkeypatch.setattr(ImageDirSource, "_decoder", staticmethod(broken))
    src = open_source(str(good_dir), skip_bad=True, expect_shape=(H, W, 3))
    with pytest.raises(AttributeError, match="a bug"):
        list(src.records())


def test_source_options_one_dataclass(good_dir, tmp_path):
    opts = SourceOptions(skip_bad=True, chunk_rows=3, split_fractions=[0.5, 0.25, 0.25])
    assert opts.split_fractions == (0.5, 0.25, 0.25)
    src = open_source(str(good_dir), options=opts, threads=1)  # keyword overrides change single fields
    assert src.options == SourceOptions(skip_bad=True, chunk_rows=3, split_fractions=(0.5, 0.25, 0.25), threads=1)
    assert src.num_chunks == 2 and src.threads == 1
    with pytest.raises(TypeError, match=r"unknown source option\(s\) \['skip_bd'\]"):
        open_source(str(good_dir), skip_bd=True)
    with pytest.raises(ValueError, match="split_fractions must be three non-negative numbers summing to 1"):
        SourceOptions(split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        SourceOptions(chunk_rows=0)


def test_bad_empty_file(good_dir):
    (good_dir / "empty.jpg").write_bytes(b"")
    src = open_source(str(good_dir))
    with pytest.raises(BadRecordError, match=r"empty\.jpg: file is empty \(0 bytes\)"):
        _only(src, "empty.jpg")


def test_bad_fits_all_nan_band(tmp_path):
    a = _float_cube(0)
    fits.PrimaryHDU(a.transpose(2, 0, 1).copy()).writeto(tmp_path / "good.fits")
    a[:, :, 1] = np.nan
    fits.PrimaryHDU(a.transpose(2, 0, 1).copy()).writeto(tmp_path / "nan.fits")
    src = open_source(str(tmp_path))
    with pytest.raises(BadRecordError, match=r"nan\.fits: band band1 is entirely NaN/masked \(1536 pixels\)"):
        list(src.records())


def test_bad_band_count(good_dir):
    (good_dir / "zgrey.png").write_bytes(_png(_rgb(1)[:, :, 0]))
    src = open_source(str(good_dir))
    assert src.image_shape == (H, W, 3)
    with pytest.raises(BadRecordError, match=r"zgrey\.png: wrong band count: .*\(32, 48, 1\) .* \(32, 48, 3\)"):
        _only(src, "zgrey.png")


def test_bad_image_size_requested_shape(good_dir):
    (good_dir / "zbig.jpg").write_bytes(_jpeg(_rgb(1, 64, 64)))
    src = open_source(str(good_dir))
    with pytest.raises(BadRecordError, match=r"zbig\.jpg: wrong image size: .*\(64, 64, 3\)"):
        _only(src, "zbig.jpg")
    src = open_source(str(good_dir), expect_shape=(64, 64, None))
    with pytest.raises(BadRecordError, match=r"ok0\.jpg: wrong image size: .* requested \(64, 64, None\)"):
        _only(src, "ok0.jpg")


def test_bad_parquet_row_names_file_and_row(tmp_path):
    _write_ours(tmp_path / "s.parquet", n=4)
    t = pq.read_table(tmp_path / "s.parquet")
    shapes = t.column("image_shape").to_pylist()
    shapes[2] = [H, W, 4]  # shape metadata inconsistent with the bytes
    t = t.set_column(t.schema.get_field_index("image_shape"), "image_shape", pa.array(shapes))
    pq.write_table(t, tmp_path / "s.parquet")
    src = open_source(str(tmp_path / "s.parquet"))
    with pytest.raises(BadRecordError, match=r"s\.parquet row 2: image has 18432 bytes but image_shape"):
        list(src.records())


def test_skip_bad_counts_and_manifest(good_dir, tmp_path, caplog):
    (good_dir / "trunc.jpg").write_bytes(_jpeg(_rgb(7))[:600])
    (good_dir / "empty.jpg").write_bytes(b"")
    (good_dir / "zgrey.png").write_bytes(_png(_rgb(1)[:, :, 0]))
    manifest = tmp_path / "bad.jsonl"
    src = open_source(str(good_dir), skip_bad=True, manifest=manifest)
    with caplog.at_level(logging.WARNING, logger="astrolom.data"):
        recs = list(src.records())
        list(src.records())  # a second pass does not count them twice
        line = src.log_summary()
    assert sorted(r.object_id for r in recs) == ["ok0", "ok1", "ok2", "ok3"]
    assert src.skipped == 3
    entries = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert [e["file"].rsplit("/", 1)[-1] for e in entries] == ["empty.jpg", "trunc.jpg", "zgrey.png"]
    assert "file is empty" in entries[0]["reason"] and "truncated" in entries[1]["reason"].lower()
    assert entries[2]["object_id"] == "zgrey"
    assert "skipped 3 bad record(s)" in line and str(manifest) in line
    assert any("skipped 3 bad record(s)" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------------------------- CLI


def test_inspect_cli(tmp_path, capsys):
    _write_ours(tmp_path / "s.parquet", n=6, row_group_size=4)
    assert cli.main(["inspect", "--data", str(tmp_path / "s.parquet"), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "format:        parquet (raw-float32)" in out
    assert "records:       6 in 2 chunks" in out
    assert "splits:        train 2, val 2, test 2" in out
    assert "image shape:   (32, 48, 3)" in out
    assert "label columns: redshift, telescope" in out
    assert out.count("  obj000") == 2 and "spectrum 10 px" in out
    # bad input gives one clear error line, not a traceback
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.jpg").write_bytes(b"")
    (tmp_path / "x" / "b.jpg").write_bytes(_jpeg(_rgb(0)))
    assert cli.main(["inspect", "--data", str(tmp_path / "x")]) == 2
    assert "a.jpg: file is empty (0 bytes)" in capsys.readouterr().err
    assert cli.main(["inspect", "--data", str(tmp_path / "x"), "--skip-bad"]) == 0
    assert "skipped 1 bad record(s)" in capsys.readouterr().out
