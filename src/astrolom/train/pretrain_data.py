"""Pretraining data of one rank: the resumable training stream, a prefetch thread, and the cached validation batches.

`PretrainData` opens the source once, hands the trainer one micro-batch at a time (tokens on the training device,
D4-augmented if asked, flux features appended for flux-aware models) and saves/restores the stream position of the
last batch it handed out, so resume is exact whatever the prefetch thread had prepared.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import torch

from astrolom.data.augment import random_d4_batch
from astrolom.data.batching import batch_tokens
from astrolom.data.modalities import IMAGES, SPECTRA
from astrolom.data.multimodal import MultimodalBatches, SpectrumTokeniser, slice_inputs, source_wavelength
from astrolom.data.sources import open_source
from astrolom.data.stream import RecordStream, TokenBatches
from astrolom.train import parallel
from astrolom.train.config import PretrainConfig

_END = object()


class Prefetch:
    """A thread that tokenises the next batches while the model trains (pyarrow, numpy and torch release the GIL).

    Each batch travels with the stream position just after it, so the position the trainer saves is the one of the
    last batch it *used*, not of the last one prepared: resume stays exact.
    """

    def __init__(self, batches: TokenBatches, depth: int, pin: bool):
        self._batches, self._pin = batches, pin
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="astrolom-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for batch in self._batches:
                if self._pin:
                    key = "tokens" if "tokens" in batch else "pixels"
                    batch[key] = batch[key].pin_memory()
                if not self._put((batch, self._batches.state_dict())):
                    return
            self._put(_END)
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)

    def __next__(self) -> tuple[dict, dict]:
        item = self._queue.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class PretrainData:
    """The training stream (rank-aware, resumable) and the cached validation batches of one rank."""

    def __init__(self, cfg: PretrainConfig, env: parallel.DistEnv, micro: int, eval_samples: int):
        d = cfg.data
        if not d.path:
            raise ValueError("no data: pass --data DIR (or data.path=...)")
        self.cfg, self.env = d, env
        self.modalities = cfg.model.modalities
        self.multimodal = self.modalities != (IMAGES,)
        # flux-aware models read each token's per-band flux features after its standardised values
        self.flux_softening = cfg.model.flux_softening if cfg.model.flux_features else None
        # skipped records (skip_bad) are listed in RUN/skipped.jsonl; spectra are read only for spectra models
        manifest = Path(cfg.train.out_dir) / "skipped.jsonl" if d.skip_bad and cfg.train.out_dir else None
        self.source = open_source(
            d.path,
            d.format,
            skip_bad=d.skip_bad,
            manifest=manifest,
            split_fractions=d.split_fractions,
            split_seed=d.split_seed,
            spectra=SPECTRA in self.modalities,
            resample_spectra=d.resample_spectra,
            bands=d.bands,
        )
        self.spectra = None
        if SPECTRA in self.modalities:
            m = cfg.model
            grid = source_wavelength(self.source, d.path)
            self.spectra = SpectrumTokeniser(grid, patch=m.spectrum_patch, amplitude=m.spectrum_amplitude)
        self.train = self._batches("train", micro, shuffle=d.shuffle, epochs=None, output=d.token_format)
        self._train_iter = None
        self._prefetch: Prefetch | None = None
        self._position = self.train.state_dict()
        self.val_ids: list[str] = []  # object ids of the validation images (for checks and reports)
        self.val = self._take_val(micro, eval_samples) if eval_samples else []
        # what the data decides for the model: tokens per stamp, bands, patch grid
        probe = next(iter(self._batches("train", 1, shuffle=False, epochs=1)))
        self.tokens_per_stamp = probe["tokens"].shape[1]
        self.n_chan = probe["tokens"].shape[2] // (d.patch_size * d.patch_size)
        self.grid: tuple[int, int] = tuple(probe["grid"])
        # tokens the model sees per object: the stamp minus its last token, or every modality's tokens + BOMs
        self.sequence_length = self.tokens_per_stamp - 1
        if self.multimodal:
            bom = len(self.modalities) if cfg.model.modality_tokens and len(self.modalities) > 1 else 0
            image_tokens = self.tokens_per_stamp if IMAGES in self.modalities else 0
            spectrum_tokens = self.spectra.n_tokens if self.spectra is not None else 0
            self.sequence_length = image_tokens + spectrum_tokens + bom

    def _batches(
        self, split: str, batch_size: int, *, shuffle: bool, epochs: int | None, output: str = "float32"
    ) -> TokenBatches:
        stream = RecordStream(
            self.source,
            split=split,
            shuffle=shuffle,
            seed=self.cfg.seed,
            rank=self.env.rank,
            world_size=self.env.world_size,
            epochs=epochs,
        )
        batches = TokenBatches(
            stream, batch_size, patch_size=self.cfg.patch_size, image_size=self.cfg.image_size, output=output
        )
        return MultimodalBatches(batches, self.modalities, self.spectra) if self.multimodal else batches

    def _take_val(self, micro: int, n: int) -> list[torch.Tensor]:
        # Record k of the val stream is on rank k % world, so the first n of the stream are the first
        # ceil((n - rank) / world) of this rank's share: the same n images whatever the world size.
        env, split = self.env, self.cfg.val_split
        share = max(0, -(-(n - env.rank) // env.world_size))
        out, have = [], 0
        try:
            for batch in self._batches(split, micro, shuffle=False, epochs=1):
                if have >= share:
                    break
                if self.multimodal:
                    out.append(slice_inputs(batch["inputs"], share - have))
                else:
                    out.append(batch_tokens(batch, flux_softening=self.flux_softening)[: share - have])
                self.val_ids += batch["object_id"][: share - have]
                have += len(batch["object_id"][: share - have])
        except ValueError as err:  # the stream's "no records in split"
            raise ValueError(
                f"{err}; set data.val_split, or train.eval_interval=0 to train without validation"
            ) from None
        return out

    def next_train_batch(self) -> dict:
        if self.cfg.prefetch:
            if self._prefetch is None:
                self._prefetch = Prefetch(self.train, self.cfg.prefetch, pin=self.env.device.type == "cuda")
            batch, self._position = next(self._prefetch)
        else:
            if self._train_iter is None:
                self._train_iter = iter(self.train)
            batch = next(self._train_iter)
            self._position = self.train.state_dict()
        if self.cfg.augment == "d4":  # seeded by the batch position, so a resumed run draws the same transforms
            gen = torch.Generator().manual_seed(hash((self.cfg.seed, self.env.rank, self._position["batches"])) % 2**63)
            batch = random_d4_batch(batch, gen)  # tokens and their mean/std, before flux features are read off them
        if "pixels" in batch or self.flux_softening is not None:  # pixels: standardise on the training device
            batch["tokens"] = batch_tokens(batch, self.env.device, flux_softening=self.flux_softening)
        return batch

    def next_train(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """The next micro-batch: image tokens, or the multimodal model's dict input."""
        batch = self.next_train_batch()
        return batch["inputs"] if self.multimodal else batch["tokens"]

    def state_dict(self) -> dict:
        """Position after the last training batch handed to the trainer (JSON values)."""
        return self._position

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.train.load_state_dict(state)
        self._position = self.train.state_dict()

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None
        self._train_iter = None
