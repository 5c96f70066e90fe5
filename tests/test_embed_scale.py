"""Embedding at scale and the one recipe: resumable parts after SIGKILL, torchrun rank parts into `index`, skip-bad
carried through embed and index, `index --model` on an images + spectra run, and `recipe_of` on old metadata."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pretrain_helpers import TINY, pretrain_here, subprocess_env

from astrolom.cli import main
from astrolom.data.records import Record
from astrolom.eval import embed as em
from astrolom.eval.embed_job import write_embeddings
from astrolom.eval.embeddings import EmbeddingWriter, load_embeddings, skipped_records
from astrolom.eval.recipe import EmbeddingRecipe, recipe_of
from astrolom.model.astropt import AstroPT, ModelConfig
from astrolom.model.pretrained import load_model, save_pretrained
from astrolom.search.index import load_index


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = AstroPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, patch_size=8))
    return save_pretrained(model, tmp_path_factory.mktemp("embed_scale") / "model")


def _astrolom(args: list[str], *, nproc: int = 1, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "astrolom", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    return subprocess.run(cmd, env=subprocess_env(**env), capture_output=True, text=True, timeout=300, check=False)


# ------------------------------------------------------------------------------------------------------ recipe


def test_recipe_round_trip_and_the_metadata_written_before_it():
    r = EmbeddingRecipe(model="/m", layer=-2, tokens=64, scales=[4, 16, 64], symmetrize=True)
    assert r.scales == (4, 16, 64) and EmbeddingRecipe.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert recipe_of({"recipe": r.to_json(), "layer": 5}) == r  # the typed recipe wins over any flat key
    with pytest.raises(ValueError, match="newer"):
        EmbeddingRecipe.from_json({**r.to_json(), "version": 99})
    with pytest.raises(ValueError, match="unknown encoder"):
        EmbeddingRecipe(encoder="clip")
    # an images-only file as `astrolom embed` wrote it before the recipe
    old = recipe_of({"model": "/m", "layer": 1, "tokens": 16, "scales": [4, 16], "symmetrize": True, "data": "d"})
    assert (old.encoder, old.layer, old.tokens, old.scales, old.symmetrize) == ("astropt", 1, 16, (4, 16), True)
    # a multimodal file: joint `embedding`, final block; one written before segmented spectra is one mean
    cols = {"embedding": "joint", "embedding_images": "images", "embedding_spectra": "spectra"}
    mm = recipe_of({"model": "/m", "layer": -1, "tokens": 64, "columns": cols})
    assert (mm.encoder, mm.main_modality, mm.spectrum_segments, mm.layer) == ("multimodal", "joint", 1, -1)
    # an alignment run's file, and an index meta.json of one (its modalities, no columns)
    al = recipe_of({"model": "/run", "aligned": "/run", "tokens": 64, "columns": {"embedding": "images"}})
    assert al.aligned and al.model == "/run"
    idx = recipe_of({"model": "/run", "aligned": True, "embedding_modality": "images", "modalities": {"spectra": {}}})
    assert idx.aligned and idx.columns == {"embedding": "images", "embedding_spectra": "spectra"}
    assert recipe_of({}) == EmbeddingRecipe()  # nothing recorded: the paper's default readout, no model


# ---------------------------------------------------------------------------------------- resumable embedding


@pytest.mark.slow
def test_a_killed_embedding_job_resumes_without_duplicates_or_gaps(mock_survey, model_dir, tmp_path):
    model, meta = load_model(str(model_dir))
    whole = em.embed_dataset(model, str(mock_survey), tmp_path / "whole.parquet", metadata=meta, progress=False)
    ref = load_embeddings(whole)
    assert len(ref) == 64

    out = tmp_path / "parts"
    args = ["embed", "--model", str(model_dir), "--data", str(mock_survey), "--out", str(out), "--part-rows", "10",
            "--batch-size", "4", "--no-progress"]  # fmt: skip
    killed = _astrolom(args, ASTROLOM_EMBED_KILL_AFTER_PART="3")
    assert killed.returncode == -9, killed.stderr  # SIGKILL after the third part was finished
    progress = json.loads((out / "progress-00000.json").read_text())
    assert progress["rows"] == 30 and len(progress["parts"]) == 3 and not progress["done"]
    with pytest.raises(ValueError, match="has not finished.*stopped after 30 objects.*--resume"):
        load_embeddings(out)
    first = {p: (out / p).stat().st_mtime_ns for p in progress["parts"]}
    (out / "part-00000-00004.parquet").write_bytes(b"written after the last progress update")  # torn by the kill

    assert _astrolom([*args, "--resume"]).returncode == 0
    got = load_embeddings(out)
    assert len(got) == 64 and len(set(got.object_id)) == 64  # no object twice, none missing
    assert {p: (out / p).stat().st_mtime_ns for p in progress["parts"]} == first  # finished parts were not redone
    order = {oid: i for i, oid in enumerate(ref.object_id)}
    rows = [order[o] for o in got.object_id]
    np.testing.assert_allclose(got.X, ref.X[rows], atol=1e-5)
    assert list(got.split) == list(ref.split[rows])
    assert len(json.loads((out / "progress-00000.json").read_text())["parts"]) == 7  # 64 objects in parts of 10

    # resuming with another recipe is a different job: refused, naming what changed
    other = _astrolom([*args, "--resume", "--layer", "0"])
    assert other.returncode == 2 and "cannot resume a different job (changed: recipe)" in other.stderr
    # resume needs a parts directory
    rc = main(["embed", "--model", str(model_dir), "--data", str(mock_survey), "--out", str(tmp_path / "x.parquet"),
               "--resume", "--no-progress"])  # fmt: skip
    assert rc == 2 and not (tmp_path / "x.parquet").exists()


# ----------------------------------------------------------------------------------- labels that appear late


def _rec(oid: str, **labels):
    return Record(oid, np.zeros((1, 1, 1), np.float32), "test", labels)


def test_a_label_first_seen_in_a_later_batch_is_kept(tmp_path):
    """The readers set `spectrum_coverage` only on resampled spectra and an SDSS `redshift` only where SPECOBJ has
    one: such a label first appearing after rows were written widens the file instead of being dropped."""
    out = tmp_path / "emb.parquet"
    X = np.arange(24, dtype=np.float32).reshape(8, 3)
    with EmbeddingWriter(out, {"recipe": EmbeddingRecipe().to_json()}) as w:
        w.write([_rec("a0", mag=20.5, n_exp=2), _rec("a1", mag=21.0, n_exp=3, empty=None)], X[:2])
        w.write([_rec("b0", mag=19.0, n_exp=2.5), _rec("b1", mag=18.0, spectrum_coverage=0.25)], X[2:4])
        w.write([_rec("c0", mag=17.0, survey="sdss", empty="x"), _rec("c1", mag=np.float32(16.5))], X[4:6])
        w.write([_rec("d0"), _rec("d1", spectrum_coverage=1)], X[6:])
    f = pq.ParquetFile(out)
    assert f.metadata.num_row_groups == 4 and f.metadata.num_rows == 8  # rewritten row group by row group
    assert f.schema_arrow.names == ["object_id", "split", "mag", "n_exp", "empty", "spectrum_coverage", "survey",
                                    "embedding"]  # fmt: skip
    assert f.schema_arrow.field("n_exp").type == pa.float64()  # integers, then a float: the column is float
    t = load_embeddings(out)
    np.testing.assert_array_equal(t.X, X)
    nan = np.nan
    np.testing.assert_array_equal(t.labels["spectrum_coverage"], [nan, nan, nan, 0.25, nan, nan, nan, 1.0])
    np.testing.assert_array_equal(t.labels["n_exp"], [2, 3, 2.5, nan, nan, nan, nan, nan])
    np.testing.assert_array_equal(t.labels["mag"], [20.5, 21.0, 19.0, 18.0, 17.0, 16.5, nan, nan])
    assert list(t.labels["survey"]) == ["", "", "", "", "sdss", "", "", ""]
    assert list(t.labels["empty"]) == ["", "", "", "", "x", "", "", ""]  # all-null at first, text later
    assert [p.name for p in tmp_path.iterdir()] == ["emb.parquet"]  # no temporary file left behind

    # a label that changes type is an error naming the label and the record; no file is left
    bad = tmp_path / "bad.parquet"
    message = r"bad\.parquet: label 'redshift' of record 'z1' is string, but earlier records gave it as double"
    with pytest.raises(ValueError, match=message):
        with EmbeddingWriter(bad, {}) as w:
            w.write([_rec("z0", redshift=0.1)], X[:1])
            w.write([_rec("z1", redshift="0.2")], X[1:2])
    assert [p.name for p in tmp_path.iterdir()] == ["emb.parquet"]


@pytest.mark.parametrize("part_rows", [None, 5])
def test_late_labels_reach_the_file_and_every_part(mock_survey, tmp_path, part_rows):
    from astrolom.data.sources import open_source

    late = {7: 0.5, 12: 0.75}  # stream position -> coverage: the 8th and 13th objects only

    def embed_batches(records):
        batch = []
        for rec in records:
            if seen[0] in late:
                rec.labels["spectrum_coverage"] = late[seen[0]]
            seen[0] += 1
            batch.append(rec)
            if len(batch) == 3:
                yield batch, np.ones((3, 4), np.float32)
                batch = []
        if batch:
            yield batch, np.ones((len(batch), 4), np.float32)

    seen = [0]
    source = open_source(mock_survey)
    meta = {"recipe": EmbeddingRecipe().to_json(), "data": str(mock_survey)}
    out = write_embeddings(tmp_path / "emb", meta, source, ["train"], embed_batches, part_rows=part_rows,
                              progress=False)  # fmt: skip
    t = load_embeddings(out)
    n = int((t.split == "train").sum())
    assert n == len(t) > 13
    expected = np.full(n, np.nan)
    expected[list(late)] = list(late.values())
    np.testing.assert_array_equal(t.labels["spectrum_coverage"], expected)
    assert "redshift" in t.labels and np.isfinite(t.labels["redshift"]).all()
    if part_rows:  # parts after the label's first appearance carry its column; the one before it is filled in
        names = [pq.read_schema(f).names for f in sorted(out.glob("part-*.parquet"))]
        assert len(names) == -(-n // 5)
        assert ["spectrum_coverage" in x for x in names] == [False] + [True] * (len(names) - 1)


@pytest.mark.slow  # two torchrun ranks on a loaded 2-core machine
def test_torchrun_rank_parts_are_indexed_directly(mock_survey, model_dir, tmp_path):
    out, idx = tmp_path / "emb", tmp_path / "idx"
    args = ["embed", "--model", str(model_dir), "--data", str(mock_survey), "--out", str(out), "--part-rows", "12",
            "--splits", "val,test", "--no-progress"]  # fmt: skip
    done = _astrolom(args, nproc=2)
    assert done.returncode == 0, done.stdout + done.stderr
    states = [json.loads((out / f"progress-0000{r}.json").read_text()) for r in (0, 1)]
    assert [s["world_size"] for s in states] == [2, 2] and all(s["done"] for s in states)
    model, meta = load_model(str(model_dir))
    one = em.embed_dataset(model, str(mock_survey), tmp_path / "one.parquet", splits=["val", "test"], metadata=meta,
                           progress=False)  # fmt: skip
    single = load_embeddings(one)
    assert sum(s["rows"] for s in states) == len(single)
    assert main(["index", "--embeddings", str(out), "--out", str(idx), "--map", "none", "--no-progress"]) == 0
    from astrolom.search.index import load_index

    index = load_index(idx)
    assert sorted(index.object_id) == sorted(single.object_id)
    row = index.row_of(single.object_id[3])
    np.testing.assert_allclose(index.vectors([row])[0], index.prepare(single.X[3:4])[0], atol=1e-5)


# ------------------------------------------------------------------------------------------------------ skip-bad


def _png_folder(root, n: int = 12, size: int = 32):
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"gal{i:03d}.png")
    good = (root / "gal000.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "notes.png").write_bytes(b"observing notes, not an image\n")
    return root


@pytest.mark.slow
def test_a_skip_bad_run_is_embedded_and_indexed_with_its_skips_counted(tmp_path):
    data = _png_folder(tmp_path / "pngs")
    run = tmp_path / "run"
    assert pretrain_here(["--data", str(data), "--preset", "debug", "--max-steps", "2", *TINY, "data.skip_bad=true",
                          "train.batch_size=4", "train.eval_interval=0", "train.checkpoint_interval=0",
                          "--out", str(run)]) == 0  # fmt: skip
    emb = tmp_path / "emb.parquet"
    args = ["embed", "--model", str(run), "--data", str(data), "--out", str(emb), "--no-progress"]
    assert main(args) == 2 and not emb.exists()  # without --skip-bad a bad file is an error, nothing written
    assert main([*args, "--skip-bad"]) == 0
    table = load_embeddings(emb)
    assert len(table) == 12 and not any(oid in ("truncated", "notes") for oid in table.object_id)
    skipped = sorted(e["object_id"] for e in skipped_records(emb))
    assert skipped == ["notes", "truncated"] and sorted(e["object_id"] for e in table.skipped) == skipped

    idx = tmp_path / "idx"
    assert main(["index", "--embeddings", str(emb), "--out", str(idx), "--map", "none", "--no-progress"]) == 0
    meta = load_index(idx).meta  # meta.json of the index's current generation
    assert meta["skipped"]["records"] == 2 and meta["skipped"]["spectra"] == 0
    assert sorted(e["object_id"] for e in meta["skipped"]["entries"]) == skipped
    # `index --model` embeds with --skip-bad itself; without it, the bad file stops it with the reason
    idx2 = tmp_path / "idx2"
    base = ["index", "--model", str(run), "--data", str(data), "--out", str(idx2), "--map", "none", "--no-progress"]
    assert main(base) == 2
    assert main([*base, "--skip-bad"]) == 0
    assert load_index(idx2).meta["skipped"]["records"] == 2


# ----------------------------------------------------------------------------------- an images + spectra run


def test_index_model_of_an_images_and_spectra_run(tmp_path):
    """Issue 22 #11: `astrolom index --model` of a multimodal run used to fail with 'pass a dict of tensors'."""
    from astrolom.data.multimodal import SpectrumTokeniser
    from astrolom.mock import generate_survey, spectrum_wavelength
    from astrolom.search import query as sq
    from astrolom.search.index import load_index

    survey = generate_survey(tmp_path / "survey", n=40, size=32, seed=5, workers=1, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, patch_size=8, modalities=("images", "spectra"),
                      spectrum_patch=128)  # fmt: skip
    tok = SpectrumTokeniser(spectrum_wavelength(), patch=128)
    tokens = {"patch_size": 8, "spectra": tok.describe()}
    model_dir = save_pretrained(AstroPT(cfg), tmp_path / "run" / "final", tokens=tokens, data={"image_size": 32})
    out = tmp_path / "idx"
    args = ["index", "--model", str(tmp_path / "run"), "--data", str(survey), "--splits", "val,test", "--out", str(out),
            "--map", "none", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    index = load_index(out)
    emb = load_embeddings(out / "embeddings.parquet")
    assert index.recipe.encoder == "multimodal" and index.recipe.model == str(model_dir)
    assert index.main_modality == "joint" and set(index.modalities) == {"images", "spectra", "joint"}
    assert len(index) == len(emb) and set(emb.split) <= {"val", "test"}
    # a new image is embedded by the model's images pass: an indexed galaxy's own stamp finds itself first
    store = sq.open_store(index)
    oid = str(index.object_id[4])
    hit = sq.search_image(index, store.get(oid), k=3).neighbours[0]
    assert hit.object_id == oid and hit.similarity > 0.999
    # and a spectrum by the model's spectra pass, among the spectra
    has = np.flatnonzero(~np.isnan(emb.modalities["spectra"]).any(1))
    rec = store.get(str(emb.object_id[has[0]]))
    res = sq.search_spectrum(index, rec.spectrum, k=3, name="q")
    assert res.target_modality == "spectra" and res.neighbours[0].object_id == str(emb.object_id[has[0]])
