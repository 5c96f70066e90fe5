"""RecordStream / TokenBatches: determinism, DDP round-robin, exact resume, bounded memory, tokenisation."""

from __future__ import annotations

import io
import json
from itertools import islice

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from astrolom.data import tokens as tok
from astrolom.data.batching import tokenize_records
from astrolom.data.records import Record
from astrolom.data.sources import PixelRecord, open_source
from astrolom.data.stream import RecordStream, TokenBatches

SPLIT_CYCLE = ("train", "train", "val", "train", "test")


def _img(i: int, h: int = 32, w: int = 48, c: int = 2) -> np.ndarray:
    rng = np.random.default_rng(i)
    return (rng.normal(size=(h, w, c)) + i).astype(np.float32)


def _write(path, ids, row_group_size):
    imgs = [_img(int(x[3:])) for x in ids]
    table = pa.table(
        {
            "object_id": ids,
            "split": [SPLIT_CYCLE[int(x[3:]) % 5] for x in ids],
            "image": [a.astype("<f4").tobytes() for a in imgs],
            "image_shape": [list(a.shape) for a in imgs],
            "mag_r": [20.0 + int(x[3:]) / 100 for x in ids],
        }
    )
    pq.write_table(table, str(path), row_group_size=row_group_size)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 files x 20 rows, row groups of 7 -> 9 chunks; 36 train, 12 val, 12 test records."""
    d = tmp_path_factory.mktemp("shards")
    for f in range(3):
        _write(d / f"part-{f}.parquet", [f"obj{f * 20 + i:03d}" for i in range(20)], row_group_size=7)
    return str(d)


def _ids(stream, n=None):
    return [r.object_id for r in islice(stream, n)]


TRAIN = [f"obj{i:03d}" for i in range(60) if SPLIT_CYCLE[i % 5] == "train"]


def test_order_deterministic_per_seed(shards):
    src = open_source(shards)
    assert src.num_chunks == 9 and len(src) == 60
    a = _ids(RecordStream(src, seed=0, epochs=2))
    b = _ids(RecordStream(open_source(shards), seed=0, epochs=2))
    c = _ids(RecordStream(src, seed=1, epochs=2))
    assert a == b and len(a) == 72
    assert a != c
    e0, e1 = a[:36], a[36:]
    assert sorted(e0) == TRAIN and sorted(e1) == TRAIN  # each epoch is a permutation of the split
    assert e0 != e1 and e0 != TRAIN  # reshuffled per epoch, and actually shuffled
    assert _ids(RecordStream(src, shuffle=False, epochs=1)) == TRAIN
    assert sorted(_ids(RecordStream(src, split="val", epochs=1))) == [
        f"obj{i:03d}" for i in range(60) if SPLIT_CYCLE[i % 5] == "val"
    ]
    assert len(_ids(RecordStream(src, split=None, epochs=1))) == 60


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_round_robin_union_equals_single(shards, world):
    n = 36 * 2 + 17  # crosses two epoch boundaries (36 % 3 == 0, 36 % 2 == 0; 17 leaves ranks uneven)
    single = _ids(RecordStream(open_source(shards), seed=5), n)
    per_rank = [
        _ids(RecordStream(open_source(shards), seed=5, rank=r, world_size=world), len(range(r, n, world)))
        for r in range(world)
    ]
    for r in range(world):
        assert per_rank[r] == single[r::world]
    first_epoch = [set(x for k, x in enumerate(single[:36]) if k % world == r) for r in range(world)]
    assert sum(len(s) for s in first_epoch) == 36 and len(set.union(*first_epoch)) == 36  # disjoint


def test_only_own_records_decoded(shards):
    src = open_source(shards)
    decoded = []
    orig = src.read_aligned
    src.read_aligned = lambda i, rows=None: decoded.extend(rows) or orig(i, rows)
    got = _ids(RecordStream(src, rank=1, world_size=3, epochs=1))
    assert len(got) == 12 and len(decoded) == 12


def test_token_batches_ddp_union_equals_single_batch(shards):
    b, world = 6, 2
    single = list(islice(TokenBatches(RecordStream(open_source(shards), seed=3), b), 9))  # 54 > 36: wraps
    ranks = [
        list(islice(TokenBatches(RecordStream(open_source(shards), seed=3, rank=r, world_size=world), b // world), 9))
        for r in range(world)
    ]
    for i in range(9):
        want = dict(zip(single[i]["object_id"], single[i]["tokens"], strict=True))
        got_ids = [x for rk in ranks for x in rk[i]["object_id"]]
        assert sorted(got_ids) == sorted(want)
        for rk in ranks:
            for oid, t in zip(rk[i]["object_id"], rk[i]["tokens"], strict=True):
                assert torch.equal(t, want[oid])


@pytest.mark.parametrize(("rank", "world", "skip"), [(0, 1, 23), (1, 3, 5), (0, 2, 17), (2, 3, 13)])
def test_record_stream_resume_exact(shards, rank, world, skip):
    s1 = RecordStream(open_source(shards), seed=7, rank=rank, world_size=world)
    it = iter(s1)
    list(islice(it, skip))
    state = json.loads(json.dumps(s1.state_dict()))  # JSON round trip
    assert len(json.dumps(state)) < 400
    cont = _ids(it, 40)  # crosses an epoch boundary for every case
    s2 = RecordStream(open_source(shards), seed=7, rank=rank, world_size=world)
    s2.load_state_dict(state)
    assert _ids(s2, 40) == cont


def test_resume_rejects_other_settings(shards):
    s = RecordStream(open_source(shards), seed=1)
    with pytest.raises(ValueError, match="seed: 1 vs 2"):
        RecordStream(open_source(shards), seed=2).load_state_dict(s.state_dict())


def test_token_batches_resume_and_rank_independent_state(shards):
    tb = TokenBatches(RecordStream(open_source(shards), seed=2), 5)
    it = iter(tb)
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(tb.state_dict()))
    assert state["batches"] == 3
    rest = [next(it) for _ in range(6)]  # 45 records in all: past the end of the first epoch
    tb2 = TokenBatches(RecordStream(open_source(shards), seed=2), 5)
    tb2.load_state_dict(state)
    again = list(islice(tb2, 6))
    for x, y in zip(rest, again, strict=True):
        assert x["object_id"] == y["object_id"] and torch.equal(x["tokens"], y["tokens"])
    assert first[0]["object_id"] != rest[0]["object_id"]

    # at a batch boundary all ranks hold the same state: rank 0's is enough to resume every rank
    world, b = 2, 3
    tbs = [TokenBatches(RecordStream(open_source(shards), seed=2, rank=r, world_size=world), b) for r in range(2)]
    its = [iter(t) for t in tbs]
    for _ in range(7):
        for i in its:
            next(i)
    assert tbs[0].state_dict() == tbs[1].state_dict()
    nxt = next(its[1])["object_id"]
    fresh = TokenBatches(RecordStream(open_source(shards), seed=2, rank=1, world_size=world), b)
    fresh.load_state_dict(json.loads(json.dumps(tbs[0].state_dict())))  # rank 0's state, saved after 7 batches
    assert next(iter(fresh))["object_id"] == nxt


def test_memory_bounded_chunk_reads(tmp_path):
    _write(tmp_path / "one.parquet", [f"obj{i:03d}" for i in range(60)], row_group_size=6)
    src = open_source(str(tmp_path / "one.parquet"))
    assert src.num_chunks == 10
    stream = RecordStream(src, split=None, seed=0)
    it = iter(stream)
    list(islice(it, 3))
    assert src.chunk_reads == 1 and src.key_reads == 1  # one chunk touched for 3 records
    list(islice(it, 57))
    assert src.chunk_reads == 10  # a full epoch reads each chunk exactly once
    d = tmp_path / "jpg"
    d.mkdir()
    for i in range(20):
        b = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), i * 10, np.uint8)).save(b, format="JPEG")
        (d / f"g{i:02d}.jpg").write_bytes(b.getvalue())
    src = open_source(str(d), chunk_rows=4)
    got = _ids(RecordStream(src, split=None, seed=1), 2)
    assert len(got) == 2 and src.chunk_reads == 1 and src.num_chunks == 5


def test_empty_split_is_an_error(tmp_path):
    _write(tmp_path / "s.parquet", ["obj000", "obj001"], row_group_size=2)  # train, train
    with pytest.raises(ValueError, match="no records in split 'test'"):
        next(iter(RecordStream(open_source(str(tmp_path / "s.parquet")), split="test")))


def test_stream_skips_bad_records_and_counts(tmp_path):
    d = tmp_path / "jpg"
    d.mkdir()
    for i in range(6):
        b = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), i * 10, np.uint8)).save(b, format="PNG")
        (d / f"g{i}.png").write_bytes(b.getvalue())
    (d / "g3.png").write_bytes(b"")
    src = open_source(str(d), skip_bad=True, threads=2)
    got = _ids(RecordStream(src, split=None, epochs=2))
    assert len(got) == 10 and "g3" not in got and src.skipped == 1
    with pytest.raises(ValueError, match=r"g3\.png: file is empty"):
        _ids(RecordStream(open_source(str(d)), split=None, epochs=1))


def test_every_record_bad_is_a_clear_error(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for i in range(5):
        (d / f"g{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg" * (i + 1))
    manifest = tmp_path / "skipped.jsonl"
    src = open_source(str(d), format="images", skip_bad=True, manifest=manifest, split_fractions=(1, 0, 0))
    endless = TokenBatches(RecordStream(src, split="train", epochs=None), 2)  # used to spin forever
    with pytest.raises(ValueError, match=r"every record of split 'train' is bad \(5 skipped by skip_bad \(listed in"):
        next(iter(endless))
    with pytest.raises(ValueError, match=r"is bad .*first: .*g\d\.jpg: cannot decode"):
        next(iter(TokenBatches(RecordStream(src, split="train", epochs=1), 2)))  # used to be a bare StopIteration
    assert len(manifest.read_text().splitlines()) == 5


def test_threaded_decode_is_deterministic(tmp_path):
    d = tmp_path / "jpg"
    d.mkdir()
    for i in range(12):
        b = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(b, "JPEG")
        (d / f"g{i:02d}.jpg").write_bytes(b.getvalue())
    one = list(RecordStream(open_source(str(d), threads=1), split=None, epochs=1))
    two = list(RecordStream(open_source(str(d), threads=2), split=None, epochs=1))
    assert [r.object_id for r in one] == [r.object_id for r in two]
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a.image, b.image)


# ---------------------------------------------------------------------------------------------- tokens


def _ref(images: np.ndarray, p: int):
    return tok.tokenize(torch.from_numpy(images), p)


def test_tokenize_records_matches_tokens_py_float_and_uint8():
    rng = np.random.default_rng(0)
    floats = [rng.normal(size=(32, 48, 3)).astype(np.float32) * 50 + 1000 for _ in range(3)]
    out = tokenize_records([Record(f"f{i}", a) for i, a in enumerate(floats)], patch_size=16)
    ref = _ref(np.stack(floats), 16)
    assert out["tokens"].shape == (3, 6, 768) and out["grid"] == (2, 3)
    torch.testing.assert_close(out["tokens"], ref.tokens, atol=2e-5, rtol=0)
    torch.testing.assert_close(out["mean"], ref.mean, atol=1e-3, rtol=1e-6)
    torch.testing.assert_close(out["std"], ref.std, atol=1e-5, rtol=1e-5)
    pix = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(3)]
    recs = [PixelRecord(f"p{i}", pixels=a) for i, a in enumerate(pix)]
    out = tokenize_records(recs, patch_size=16)
    ref = _ref(np.stack([r.image for r in recs]), 16)
    torch.testing.assert_close(out["tokens"], ref.tokens, atol=2e-5, rtol=0)
    torch.testing.assert_close(out["mean"], ref.mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["std"], ref.std, atol=1e-6, rtol=1e-5)
    back = tok.destandardise(out["tokens"], out["mean"], out["std"])
    raster = back[:, tok.inverse_spiral_order(2, 3)]
    img = tok.unpatchify(raster, (2, 3), 16)
    np.testing.assert_allclose(img.numpy(), np.stack([r.image for r in recs]), atol=1e-5)


def test_tokenize_flat_patches_and_labels():
    a = np.zeros((32, 32, 1), np.float32)
    a[:16, :16] = np.random.default_rng(1).normal(size=(16, 16, 1))  # one textured patch, three flat ones
    a[16:, 16:] = 7.0
    out = tokenize_records([Record("a", a, "train", {"z": 0.1})], patch_size=16)
    ref = _ref(a[None], 16)
    assert torch.isfinite(out["tokens"]).all()
    torch.testing.assert_close(out["tokens"], ref.tokens, atol=2e-5, rtol=0)
    torch.testing.assert_close(out["std"], ref.std, atol=0, rtol=1e-6)
    assert (out["std"] == tok.DEFAULT_EPS).sum() == 3 and (ref.std == tok.DEFAULT_EPS).sum() == 3
    assert out["labels"] == {"z": [0.1]} and out["split"] == ["train"] and out["object_id"] == ["a"]
    # flat 8-bit patches whose float mean does not round exactly: still exactly zero tokens
    p = np.full((32, 32, 3), 200, np.uint8)
    outp = tokenize_records([PixelRecord("p", pixels=p)], patch_size=16)
    assert torch.equal(outp["tokens"], torch.zeros(1, 4, 768))
    assert torch.allclose(outp["mean"], torch.full((1, 4, 1), 200 / 255)) and (outp["std"] == 1e-6).all()
    back = tok.destandardise(outp["tokens"], outp["mean"], outp["std"])
    torch.testing.assert_close(back, torch.full((1, 4, 768), 200 / 255), atol=1e-6, rtol=0)


def test_tokenize_crops(shards):
    rng = np.random.default_rng(2)
    big = rng.normal(size=(128, 128, 3)).astype(np.float32)
    centre = big[32:96, 32:96]
    out_big = tokenize_records([Record("b", big)], patch_size=16)
    out_crop = tokenize_records([Record("b", big)], patch_size=16, image_size=64)
    out_centre = tokenize_records([Record("c", centre)], patch_size=16)
    assert out_crop["tokens"].shape == (1, 16, 768)
    assert torch.equal(out_crop["tokens"], out_centre["tokens"])
    torch.testing.assert_close(out_big["tokens"][:, :16], out_centre["tokens"], atol=0, rtol=0)  # shared prefix
    odd = rng.normal(size=(37, 50, 3)).astype(np.float32)
    out = tokenize_records([Record("o", odd)], patch_size=16)
    cropped = tok.center_crop(torch.from_numpy(odd)[None], 16)
    assert cropped.shape == (1, 32, 48, 3)
    torch.testing.assert_close(out["tokens"], tok.tokenize(cropped, 16).tokens, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        tokenize_records([Record("o", odd)], patch_size=16, crop_to_patch=False)
    with pytest.raises(ValueError, match="record o: image of 37x50 px is smaller than image_size 48x48"):
        tokenize_records([Record("o", odd)], patch_size=16, image_size=48)
    with pytest.raises(ValueError, match="different sizes"):
        tokenize_records([Record("o", odd), Record("b", big)], patch_size=16)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        TokenBatches(RecordStream(open_source(shards)), 4, image_size=40)


def test_token_buffers_recycled_only_when_released(shards):
    tb = TokenBatches(RecordStream(open_source(shards), seed=4), 4, recycle=2)
    it = iter(tb)
    kept = next(it)["tokens"][:, :2]  # a view of batch 0, kept alive
    kept_np = next(it)["tokens"].numpy()  # a numpy array made from batch 1, kept alive
    copies = (kept.clone(), kept_np.copy())
    ptrs = set()
    for _ in range(6):
        ptrs.add(next(it)["tokens"].untyped_storage().data_ptr())
    assert torch.equal(kept, copies[0]) and np.array_equal(kept_np, copies[1])  # never overwritten
    assert kept.untyped_storage().data_ptr() not in ptrs
    assert len(ptrs) <= 3  # released batches' memory is reused (2 pool slots + the one being filled)
    off = TokenBatches(RecordStream(open_source(shards), seed=4), 4, recycle=0)
    a = [b["tokens"].clone() for b in islice(off, 8)]
    b = [b["tokens"] for b in islice(TokenBatches(RecordStream(open_source(shards), seed=4), 4), 8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
