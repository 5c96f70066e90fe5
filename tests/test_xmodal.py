"""Cross-modal search (issues 9, 10): per-modality embeddings and indexes, spectrum queries, image <-> spectrum search.

Synthetic aligned pairs (spectrum i = a noisy copy of image i) pin the numbers; a tiny real alignment run on the mock
survey checks the wiring from `astrolom embed` of the run to queries by file.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from astrolom.eval.embeddings import load_embeddings
from astrolom.search import index as si
from astrolom.search import query as sq


def _fixed(a: np.ndarray, present: np.ndarray | None = None) -> pa.Array:
    mask = None if present is None else pa.array(~present)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1).astype(np.float32)), a.shape[1], mask=mask)


def synthetic_pairs(path, n: int = 400, d: int = 64, noise: float = 0.5, aligned: bool = True, seed: int = 0):
    """Parquet of aligned pairs: image i a random unit vector, spectrum i its noisy copy; every 4th has no spectrum."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, d)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    spec = img + noise / np.sqrt(d) * rng.normal(size=(n, d)).astype(np.float32)
    spec /= np.linalg.norm(spec, axis=1, keepdims=True)
    has = np.arange(n) % 4 != 3
    cols = {
        "object_id": pa.array([f"g{i:04d}" for i in range(n)]),
        "split": pa.array(["test"] * n),
        "redshift": pa.array(np.linspace(0, 1, n)),
        "embedding": _fixed(img),
        "embedding_images": _fixed(img),
        "embedding_spectra": _fixed(spec, has),
    }
    meta = {"columns": {"embedding": "images"}}
    if aligned:
        meta.update(aligned="/nowhere/run", model="/nowhere/run")
    table = pa.table(cols).replace_schema_metadata({b"astrolom": json.dumps(meta).encode()})
    pq.write_table(table, path)
    return img, spec, has


def test_per_modality_columns_are_read_as_vectors_not_labels(tmp_path):
    img, spec, has = synthetic_pairs(tmp_path / "e.parquet", n=20, d=8)
    t = load_embeddings(tmp_path / "e.parquet")
    assert set(t.modalities) == {"images", "spectra"} and list(t.labels) == ["redshift"]
    np.testing.assert_array_equal(t.modalities["images"], img)
    assert np.isnan(t.modalities["spectra"][~has]).all() and np.allclose(t.modalities["spectra"][has], spec[has])
    assert set(t.select(np.arange(5)).modalities) == {"images", "spectra"}


def test_cross_modal_search_finds_the_true_partner(tmp_path, capsys):
    from astrolom.cli import main

    img, spec, has = synthetic_pairs(tmp_path / "e.parquet")
    out = tmp_path / "idx"
    assert main(["index", "--embeddings", str(tmp_path / "e.parquet"), "--out", str(out), "--map", "none"]) == 0
    idx = si.load_index(out)
    m = idx.meta["modalities"]
    assert idx.aligned and set(idx.modalities) == {"images", "spectra"}
    assert m["images"]["file"] == si.INDEX_FILE  # the `embedding` column itself: one index file, not two
    assert m["spectra"]["n"] == has.sum() == len(idx.space("spectra").rows) and len(idx) == 400
    assert idx.meta["standardize"] is None  # the shared space is searched by its raw cosine
    # image -> spectrum: the true partner is top-1 for nearly every object that has a spectrum (noise 0.5 in 64-d)
    top = [h[0].object_id for h in idx.neighbours(img, 1, target="spectra")]
    hit = np.array([t == f"g{i:04d}" for i, t in enumerate(top)])
    assert hit[has].mean() >= 0.95 and not hit[~has].any()  # without a spectrum, no partner to find
    assert all(int(t[1:]) % 4 != 3 for t in top)  # only objects with a spectrum are in the spectra index
    # spectrum -> image
    top = [h[0].object_id for h in idx.neighbours(spec[has], 1, target="images")]
    assert np.mean([t == f"g{i:04d}" for i, t in zip(np.flatnonzero(has), top, strict=True)]) >= 0.95
    # by id: --target spectra starts from the object's image; its own spectrum stays in the results
    res = sq.search_id(idx, "g0005", 3, "spectra")
    assert (res.query_modality, res.target_modality, res.cross_modal) == ("images", "spectra", True)
    assert res.neighbours[0].object_id == "g0005"
    assert sq.search_id(idx, "g0005", 3, "images").neighbours[0].object_id != "g0005"  # in-modal: itself left out
    assert main(["search", "--index", str(out), "--id", "g0007", "--target", "spectra", "--json", "-k", "2"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["query_modality"] == "images" and js["target_modality"] == "spectra" and js["query"] == "g0007"
    # an object without a spectrum cannot be a spectrum query by id
    with pytest.raises(ValueError, match="no spectra embedding"):
        idx.neighbours_of_id("g0003", 3, query="spectra", target="images")


def test_clear_errors_when_the_index_cannot(tmp_path, capsys):
    from astrolom.cli import main

    synthetic_pairs(tmp_path / "m.parquet", n=60, aligned=False)  # per-modality, separate spaces (multimodal AstroPT)
    idx = si.load_index(si.build_index(tmp_path / "m.parquet", tmp_path / "m", map_method="none", progress=False))
    assert not idx.aligned and idx.meta["modalities"]["spectra"]["standardize"] is not None
    assert sq.search_id(idx, "g0001", 3, "spectra").target_modality == "spectra"  # in-modal: fine
    with pytest.raises(ValueError, match=r"cross-modal search \(images -> spectra\) needs aligned embeddings"):
        sq.search_image(idx, sq.Record("q", np.zeros((32, 32, 3), np.float32)), 3, "spectra")
    # an index of one embedding column: no spectra, no targets; old indexes load and search as before
    rng = np.random.default_rng(0)
    old = si.build_index(
        si.EmbeddingTable(np.array(["a", "b", "c"]), np.array(["test"] * 3), rng.normal(size=(3, 4))),
        tmp_path / "old",
        map_method="none",
        progress=False,
    )
    assert main(["search", "--index", str(old), "--id", "a", "--target", "spectra"]) == 2
    err = capsys.readouterr().err
    assert "has no spectra index (one embedding column, no per-modality indexes)" in err
    assert main(["search", "--index", str(old), "--id", "a", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["target_modality"] == "images"


# ------------------------------------------------------------------------------------------- a real alignment run


@pytest.fixture(scope="module")
def aligned(mock_survey, tmp_path_factory):
    from search_helpers import make_aligned_index

    idx_dir, run = make_aligned_index(mock_survey, tmp_path_factory.mktemp("xmodal"))
    return mock_survey, idx_dir, run


def test_embed_of_an_alignment_run_matches_eval_align(aligned):
    from astrolom.align.encoder import load_aligned
    from astrolom.align.evaluate import aligned_embeddings
    from astrolom.align.features import FeatureCache
    from astrolom.align.train import FEATURES_NAME

    survey, idx_dir, run = aligned
    t = load_embeddings(run.parent / "aligned.parquet")
    assert len(t) == 64 and t.recipe.aligned and t.recipe.model == str(run.resolve())
    has = ~np.isnan(t.modalities["spectra"]).any(1)
    assert 10 < has.sum() < 64  # null where the mock object has no spectrum
    np.testing.assert_array_equal(t.X, t.modalities["images"])  # `embedding` = image
    # the objects of the run's feature cache land where eval-align's aligned_embeddings puts them (same code path)
    cache = FeatureCache.load(run / FEATURES_NAME)
    ref = aligned_embeddings(load_aligned(run)[0], cache)
    rows = [int(np.flatnonzero(t.object_id == o)[0]) for o in cache.object_ids]
    assert has[rows].all()
    np.testing.assert_allclose(t.modalities["images"][rows], ref["images"], atol=1e-5)
    np.testing.assert_allclose(t.modalities["spectra"][rows], ref["spectra"], atol=1e-5)


def test_embed_and_index_commands_take_an_alignment_run(aligned, tmp_path, capsys):
    from astrolom.cli import main

    survey, idx_dir, run = aligned
    out = tmp_path / "e.parquet"
    assert main(["embed", "--model", str(run), "--data", str(survey), "--out", str(out), "--no-progress"]) == 0
    assert "aligned space" in capsys.readouterr().out
    ref = load_embeddings(run.parent / "aligned.parquet")
    np.testing.assert_allclose(load_embeddings(out).modalities["spectra"], ref.modalities["spectra"], atol=1e-6)
    args = ["index", "--model", str(run), "--data", str(survey), "--out", str(tmp_path / "i"), "--map", "none"]
    assert main([*args, "--no-progress"]) == 0
    idx = si.load_index(tmp_path / "i")
    assert idx.aligned and set(idx.modalities) == {"images", "spectra"} and len(idx) == 64
    assert main(["embed", "--model", str(run), "--data", str(survey), "--out", str(out), "--symmetrize"]) == 2
    assert "--symmetrize does not apply to an alignment run" in capsys.readouterr().err


def test_queries_by_spectrum_and_image_file(aligned, tmp_path, capsys):
    from search_helpers import write_fits_spectrum

    from astrolom.cli import main

    survey, idx_dir, run = aligned
    idx = si.load_index(idx_dir)
    assert idx.aligned and idx.recipe.model == str(run.resolve())
    store = sq.open_store(idx)
    oid = str(idx.object_id[idx.space("spectra").rows[3]])
    rec = store.get(oid)
    f = write_fits_spectrum(tmp_path / "s.fits", store.wavelength(), rec.spectrum)
    res = sq.search_spectrum(idx, f, k=3)
    assert (res.query_modality, res.target_modality) == ("spectra", "spectra")
    assert res.neighbours[0].object_id == oid and res.neighbours[0].similarity > 0.999
    # the same spectrum as a bare flux array on the model grid, and across to the images
    flux = sq.read_spectrum_bytes(_npy(rec.spectrum), "s.npy")
    assert sq.search_spectrum(idx, flux, k=1).neighbours[0].object_id == oid
    assert main(["search", "--index", str(idx_dir), "--spectrum", str(f), "--target", "images", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert (js["query_modality"], js["target_modality"]) == ("spectra", "images") and len(js["neighbours"]) == 10
    # an image file: the object itself first, in the images and (cross-modal) among the spectra
    img = tmp_path / "q.npy"
    np.save(img, rec.image)
    assert sq.search_image(idx, img, k=1).neighbours[0].object_id == oid
    xres = sq.search_image(idx, img, k=64, target="spectra")
    assert xres.cross_modal and len(xres.neighbours) == len(idx.space("spectra").rows)
    # a query embeds exactly as `astrolom embed` of the run did
    t = load_embeddings(run.parent / "aligned.parquet")
    row = int(np.flatnonzero(t.object_id == oid)[0])
    np.testing.assert_allclose(sq.embed_spectrum(idx, f), t.modalities["spectra"][row], atol=1e-5)
    # a spectrum on a coarser grid is resampled (flux-conserving) onto the model's, and still finds itself
    wl = store.wavelength()
    coarse = write_fits_spectrum(tmp_path / "c.fits", wl[::2], rec.spectrum[::2])
    assert sq.search_spectrum(idx, coarse, k=1).neighbours[0].object_id == oid
    with pytest.raises(ValueError, match="not a FITS or .npy spectrum"):
        sq.read_spectrum_bytes(b"wavelength,flux\n1,2\n", "s.csv")


def _npy(arr) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(arr))
    return buf.getvalue()


def test_spectrum_query_with_a_multimodal_astropt(mock_survey, tmp_path):
    from search_helpers import write_fits_spectrum

    from astrolom.data.multimodal import SpectrumTokeniser
    from astrolom.eval.multimodal import embed_multimodal_dataset
    from astrolom.mock import spectrum_wavelength
    from astrolom.model.astropt import AstroPT, ModelConfig
    from astrolom.train.checkpoint import save_pretrained

    torch.manual_seed(0)
    small = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, patch_size=8)
    cfg = ModelConfig(**small, modalities=("images", "spectra"), spectrum_patch=128)
    tok = SpectrumTokeniser(spectrum_wavelength(), patch=128)
    model = save_pretrained(
        AstroPT(cfg), tmp_path / "mm", tokens={"patch_size": 8, "spectra": tok.describe()}, data={"image_size": 32}
    )
    emb = embed_multimodal_dataset(str(model), str(mock_survey), tmp_path / "e.parquet", progress=False)
    idx = si.load_index(si.build_index(emb, tmp_path / "i", map_method="none", progress=False, log=None))
    assert not idx.aligned and idx.main_modality == "joint" and "spectra" in idx.modalities
    store = sq.open_store(idx)
    oid = str(idx.object_id[idx.space("spectra").rows[2]])
    f = write_fits_spectrum(tmp_path / "s.fits", store.wavelength(), store.get(oid).spectrum)
    hits = sq.search_spectrum(idx, f, k=2).neighbours
    assert hits[0].object_id == oid and hits[0].similarity > 0.999
    with pytest.raises(ValueError, match="needs aligned embeddings"):
        sq.search_spectrum(idx, f, k=2, target="images")
