"""The one body every embedder writes through (images-only, multimodal, aligned): `write_embeddings` reads one rank's
records of some splits (`SplitStream`, a position that resumes exactly), embeds them batch by batch with the
embedder's function and writes the embedding table of `astrolom.eval.embeddings`: one file, or a directory of parts
with a progress file per rank that `resume` continues after the last finished part.

This module does not import torch: the embedders bring the model.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

from astrolom.data.records import SPLITS, Record
from astrolom.eval.embeddings import (
    PROGRESS_GLOB,
    EmbeddingWriter,
    Vectors,
    part_path,
    progress_path,
    read_progress,
    write_progress,
)
from astrolom.log import get_logger
from astrolom.log import progress as progress_bar

log = get_logger(__name__)

DEFAULT_PART_ROWS = 100_000  # objects per part of a parts directory: ~200 MB of 512-d float32 (bounded memory)
KILL_AFTER_PART_ENV = "ASTROLOM_EMBED_KILL_AFTER_PART"  # tests: SIGKILL the job once this many parts are finished


class SplitStream:
    """One rank's records of several splits in file order, with a position that resumes exactly.

    Split by split, each a `RecordStream` (record k of a split goes to rank k % world_size); `max_per_split` keeps
    the first N records of each split (the same objects on every run). `state_dict()` names the record after the
    last one yielded, so a stream restored with `load_state_dict` continues with exactly that record.
    """

    def __init__(
        self,
        source,
        splits: list[str],
        *,
        rank: int = 0,
        world_size: int = 1,
        max_per_split: int | None = None,
    ):
        self.source, self.splits, self.rank, self.world_size = source, list(splits), rank, world_size
        self.counts = source.split_counts()
        # this rank's share of the first max_per_split records of a split (records are dealt round-robin)
        self.limit = None if max_per_split is None else math.ceil((max_per_split - rank) / world_size)
        self._pos: dict = {"split": 0, "taken": 0, "stream": None}
        self._stream = None  # the RecordStream being read; its position is read only when asked for

    def total(self) -> int:
        """Records this rank reads in all (none read or decoded to count them)."""
        n = 0
        for s in self.splits:
            c = self.counts.get(s, 0)
            c = min(c, self.limit * self.world_size) if self.limit is not None else c
            n += c // self.world_size + (self.rank < c % self.world_size)
        return n

    def __iter__(self) -> Iterator[Record]:
        from astrolom.data.stream import RecordStream

        if self._stream is not None:  # a new iterator continues after the last record the previous one yielded
            self._pos["stream"] = self._stream.state_dict()
        while self._pos["split"] < len(self.splits):
            i = self._pos["split"]
            if self.counts.get(self.splits[i], 0):
                it = RecordStream(self.source, split=self.splits[i], shuffle=False, rank=self.rank,
                                  world_size=self.world_size, epochs=1)  # fmt: skip
                if self._pos["stream"] is not None:
                    it.load_state_dict(self._pos["stream"])
                self._stream, gen = it, iter(it)
                while self.limit is None or self._pos["taken"] < self.limit:
                    rec = next(gen, None)
                    if rec is None:
                        break
                    self._pos["taken"] += 1
                    yield rec
            self._stream, self._pos = None, {"split": i + 1, "taken": 0, "stream": None}

    def state_dict(self) -> dict:
        pos = dict(self._pos)
        if self._stream is not None:
            pos["stream"] = self._stream.state_dict()
        return pos

    def load_state_dict(self, state: dict) -> None:
        self._pos = {"split": int(state["split"]), "taken": int(state["taken"]), "stream": state.get("stream")}


EmbedBatches = Callable[[Iterator[Record]], Iterator[tuple[list[Record], Vectors]]]


def write_embeddings(
    out: str | Path,
    metadata: dict,
    source,
    splits: list[str],
    embed_batches: EmbedBatches,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_per_split: int | None = None,
    part_rows: int | None = None,
    resume: bool = False,
    alias: str | None = None,
    desc: str = "embed",
    progress: bool = True,
) -> Path:
    """Embed one rank's records of `splits` of `source` with `embed_batches` and write them; returns the path.

    The one body of every embedder (images-only, multimodal, aligned). One file at `out` for a single process
    without `part_rows`; otherwise a parts directory (`astrolom.eval.embeddings`): parts of `part_rows` objects,
    each renamed into place when complete, and this rank's progress file updated after each, so that `resume`
    continues a killed job after its last finished part (no object twice, none missing). Records skipped as bad
    (a source opened with skip_bad) are listed in the file's footer or the progress file.
    `metadata["recipe"]` must hold the `EmbeddingRecipe` (resuming checks it is the same job).
    """
    stream = SplitStream(source, splits, rank=rank, world_size=world_size, max_per_split=max_per_split)
    out = Path(out)
    tag = f"embed[{rank}]" if world_size > 1 else desc
    if part_rows is None and world_size == 1:
        if resume:
            raise ValueError("--resume continues a parts directory: start the job with --part-rows N")
        bar = progress_bar(stream.total(), desc=tag, unit="obj", enabled=progress)
        with EmbeddingWriter(out, metadata, alias) as writer:
            try:
                for recs, vecs in embed_batches(iter(stream)):
                    writer.write(recs, vecs)
                    bar.update(len(recs))
            finally:
                bar.close()
            if writer.rows == 0:
                raise ValueError(f"{metadata.get('data')}: no records in split(s) {splits}")
            writer.close(skipped=_skips(source, (0, 0)))
        return out
    return _write_parts(out, metadata, source, stream, embed_batches, part_rows or DEFAULT_PART_ROWS, resume, alias,
                        tag, progress)  # fmt: skip


def _skips(source, since: tuple[int, int]) -> list[dict]:
    """Records skipped whole and spectra dropped by `source` since it had listed `since` of each."""
    return [*source.bad[since[0] :], *source.bad_spectra[since[1] :]]


def _job(metadata: dict, world_size: int) -> dict:
    """What a resumed job must share with the one it continues."""
    keys = ("recipe", "data", "splits", "max_per_split", "skip_bad")
    return {**{k: metadata.get(k) for k in keys}, "world_size": world_size}


def _write_parts(out, metadata, source, stream, embed_batches, part_rows, resume, alias, tag, progress) -> Path:
    rank, world = stream.rank, stream.world_size
    out.mkdir(parents=True, exist_ok=True)
    job = json.loads(json.dumps(_job(metadata, world)))  # as it reads back from JSON
    prog = progress_path(out, rank)
    state = None
    if resume and prog.is_file():
        state = read_progress(prog)
        diff = sorted(k for k in job if state.get("job", {}).get(k) != job[k])
        if diff:
            raise ValueError(f"{out}: cannot resume a different job (changed: {', '.join(diff)}); start it afresh")
        if state["position"] is not None:
            stream.load_state_dict(state["position"])
        log.info("resuming %s: rank %d has %d objects in %d parts", out, rank, state["rows"], len(state["parts"]))
    else:
        prog.unlink(missing_ok=True)
    listed = set(state["parts"]) if state else set()
    for f in out.glob(f"part-{rank:05d}-*.parquet"):  # parts of an older job, or written after the last progress
        if f.name not in listed:
            f.unlink()
    if rank == 0:  # a job with fewer ranks than the last one: the extra ranks' files are not part of it
        for f in (*out.glob(PROGRESS_GLOB), *out.glob("part-*.parquet")):
            r = f.stem.split("-")[1]
            if r.isdigit() and int(r) >= world:
                f.unlink()
    if state is None:
        state = {"rank": rank, "world_size": world, "job": job, "parts": [], "rows": 0, "position": None,
                 "skipped": [], "done": False}  # fmt: skip
        write_progress(out, state)
    if state["done"]:
        log.info("%s: rank %d had already finished", out, rank)
        return out
    bar = progress_bar(stream.total(), desc=tag, unit="obj", enabled=progress, initial=state["rows"])
    kill_after = os.environ.get(KILL_AFTER_PART_ENV)
    records = iter(stream)  # one iterator for all parts: each part takes the next part_rows records
    labels: dict = {}  # each part starts with the label columns of the parts before it
    try:
        while True:
            since = (len(source.bad), len(source.bad_spectra))
            writer = EmbeddingWriter(part_path(out, rank, len(state["parts"])), metadata, alias, labels)
            with writer:
                for recs, vecs in embed_batches(islice(records, part_rows)):
                    writer.write(recs, vecs)
                    bar.update(len(recs))
                writer.close()
            labels = writer.label_types
            state["skipped"] += _skips(source, since)
            if writer.rows == 0:
                break
            state["parts"].append(writer.path.name)
            state["rows"] += writer.rows
            state["position"] = stream.state_dict()
            write_progress(out, state)
            if kill_after is not None and len(state["parts"]) == int(kill_after):  # fault injection for tests
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
    if state["rows"] == 0:
        raise ValueError(f"{metadata.get('data')}: no records in split(s) {stream.splits} for rank {rank}")
    state["done"] = True
    write_progress(out, state)
    return out


def check_splits(splits: Iterable[str] | None) -> list[str]:
    """The splits to embed (default all), each a known split name."""
    splits = list(SPLITS if splits is None else splits)
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"unknown split(s) {bad}; choose from {SPLITS}")
    return splits
