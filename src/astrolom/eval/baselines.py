"""What the embeddings are measured against: a random-init control, PCA of pixels, photometry and a supervised CNN.

All baselines see the same objects and splits as the probes of the embeddings (fit on the fit split, scored on the
test split):

- **random_init** (the control): embeddings of an AstroPT with the pretrained model's config and freshly initialised
  weights (fixed seed), extracted exactly like the pretrained ones. What pretraining adds is the difference.
- **pca_pixels**: PCA (fit on the fit split) of the central `pixel_crop` pixels, after the astronomers' arcsinh
  stretch `asinh(x / sigma_band)` (sigma: the band's sky noise of the fit images, `astrolom.data.sky.sky_sigma`),
  with as many components as the embedding has dimensions.
- **photometry**: aperture fluxes in circular apertures of radius 2, 4, 8, 16 px around the stamp centre in every
  band, as asinh magnitudes (softened at the aperture's sky noise), plus the colours between adjacent bands per
  aperture. Unlike the model (whose per-patch standardisation removes absolute flux) this sees absolute fluxes.
- **cnn**: a small CNN (4 conv layers, 16-64 channels, ~60k parameters) trained end-to-end on the fit split's labels
  of all targets at once (standardised regression targets with MSE, cross-entropy per class target), with flips
  and 90-degree rotations as augmentation and early stopping on 15% of the fit split. Plain torch, CPU-friendly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from astrolom.data.augment import d4, turns_then_mirror
from astrolom.data.sky import sky_sigma
from astrolom.data.sources import open_source
from astrolom.data.stream import RecordStream
from astrolom.data.tokens import center_crop
from astrolom.eval.embed import embed_dataset
from astrolom.eval.embeddings import EmbeddingTable, load_embeddings, split_rows
from astrolom.eval.probe_estimators import CLASSIFICATION
from astrolom.eval.probes import make_tasks
from astrolom.model.pretrained import load_model
from astrolom.train.engine import EarlyStopping

BASELINES = ("random_init", "pca_pixels", "photometry", "cnn")
APERTURES = (2.0, 4.0, 8.0, 16.0)  # radii in pixels


# ----------------------------------------------------------------------------------------------------- control


def random_init_embeddings(
    model_path: str,
    data: str | None,
    out: str | Path,
    like: EmbeddingTable,
    *,
    splits: tuple[str, ...] = ("val", "test"),
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
    progress: bool = True,
) -> EmbeddingTable:
    """Embeddings of a freshly initialised model of `model_path`'s config, extracted as `like` was (layer, tokens,
    scales, symmetry pooling)."""
    if not data:
        raise ValueError("the random-init control needs the data set: pass --data")
    model, meta = load_model(model_path, random_init=True, seed=seed)
    recipe = like.recipe
    embed_dataset(
        model,
        data,
        out,
        splits=splits,
        batch_size=batch_size,
        layer=recipe.layer,
        n_tokens=recipe.tokens,
        device=device,
        rank=0,
        world_size=1,
        metadata=meta,
        max_per_split=like.metadata.get("max_per_split"),
        symmetrize=recipe.symmetrize,
        scales=recipe.scales,
        progress=progress,
    )
    return load_embeddings(out)


# ------------------------------------------------------------------------------------------------------ pixels


def load_images(
    data: str, object_ids: dict[str, np.ndarray], pixel_crop: int | None = 64, split_settings: dict | None = None
) -> dict[str, np.ndarray]:
    """Images (N, h, w, C) float32 of the given objects per split, in the given order, centre-cropped to
    `pixel_crop` pixels (None: whole stamps, which must then share a size). `split_settings` (split_fractions,
    split_seed) split data sets without a split column the way their embeddings were split."""
    settings = dict(split_settings or {})
    if "split_fractions" in settings:
        settings["split_fractions"] = tuple(settings["split_fractions"])
    source = open_source(data, spectra=False, **settings)
    out = {}
    try:
        for split, ids in object_ids.items():
            want = {oid: i for i, oid in enumerate(ids)}
            images: list[np.ndarray | None] = [None] * len(ids)
            found = 0
            for rec in RecordStream(source, split=split, shuffle=False, epochs=1):
                i = want.get(str(rec.object_id))
                if i is None:
                    continue
                images[i] = center_crop(np.asarray(rec.image, np.float32), size=pixel_crop)
                found += 1
                if found == len(ids):
                    break
            if found < len(ids):
                missing = next(oid for oid, i in want.items() if images[i] is None)
                raise ValueError(f"{data}: {len(ids) - found} embedded objects (e.g. {missing!r}) not in split {split}")
            out[split] = np.stack(images)
    finally:
        source.close()
    return out


def stretch(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """The arcsinh stretch asinh(x / sigma_band): linear at the noise level, logarithmic for bright light."""
    return np.arcsinh(images / sigma)


def pca_pixels(fit: np.ndarray, test: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA features of stretched pixels (fit on the fit split)."""
    from sklearn.decomposition import PCA

    sigma = sky_sigma(fit)
    A = stretch(fit, sigma).reshape(len(fit), -1)
    B = stretch(test, sigma).reshape(len(test), -1)
    k = max(1, min(n_components, len(fit) - 1, A.shape[1]))
    pca = PCA(n_components=k, random_state=0).fit(A)
    return pca.transform(A).astype(np.float32), pca.transform(B).astype(np.float32)


def aperture_fluxes(images: np.ndarray, radii: tuple[float, ...] = APERTURES) -> np.ndarray:
    """(N, len(radii), C) summed flux inside circles around the stamp centre (the corner of the 4 central pixels)."""
    h, w = images.shape[1:3]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy + 0.5 - h / 2, xx + 0.5 - w / 2)
    masks = np.stack([(r < rad).astype(np.float32) for rad in radii])  # (A, h, w)
    return np.einsum("ahw,nhwc->nac", masks, images, optimize=True)


def photometry(fit: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aperture asinh magnitudes and adjacent-band colours; softening from the fit split's sky noise."""
    sigma = sky_sigma(fit)
    h, w = fit.shape[1:3]
    radii = tuple(r for r in APERTURES if r <= min(h, w) / 2)
    area = np.array([math.pi * r * r for r in radii])[:, None]  # (A, 1)
    soft = sigma[None, :] * np.sqrt(area)  # (A, C): flux noise of each aperture

    def features(images: np.ndarray) -> np.ndarray:
        mags = -2.5 / math.log(10) * np.arcsinh(aperture_fluxes(images, radii) / (2 * soft))  # (N, A, C)
        colours = mags[:, :, :-1] - mags[:, :, 1:]
        return np.concatenate([mags.reshape(len(images), -1), colours.reshape(len(images), -1)], axis=1)

    return features(fit).astype(np.float32), features(test).astype(np.float32)


# --------------------------------------------------------------------------------------------------------- CNN


class SmallCNN(nn.Module):
    """Four conv layers (stride 2, 2, 2, 1) with GELU, global average pooling and a linear head."""

    def __init__(self, in_chan: int, n_out: int, width: int = 16):
        super().__init__()
        c = width
        self.features = nn.Sequential(
            nn.Conv2d(in_chan, c, 5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.GroupNorm(4, 2 * c),
            nn.GELU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1),
            nn.GroupNorm(4, 4 * c),
            nn.GELU(),
            nn.Conv2d(4 * c, 4 * c, 3, stride=1, padding=1),
            nn.GELU(),
        )
        self.head = nn.Linear(4 * c, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, n_out)
        return self.head(self.features(x).mean(dim=(2, 3)))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 90-degree rotation and flip of the whole (B, C, H, W) batch (galaxies have no preferred orientation)."""
    turns = int(torch.randint(4, (1,), generator=gen))
    mirror = bool(torch.randint(2, (1,), generator=gen))
    return d4(x, turns_then_mirror(turns, mirror), axes=(2, 3))


def train_cnn(
    fit_images: np.ndarray,
    test_images: np.ndarray,
    targets: dict[str, tuple[str, np.ndarray, np.ndarray]],
    *,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    holdout: float = 0.15,
    patience: int = 10,
    progress: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """Train one multi-task CNN; returns {target: predictions for every test image}.

    `targets` maps a name to (kind, fit rows with a label, their labels).
    """
    gen = torch.Generator().manual_seed(seed)
    sigma = sky_sigma(fit_images)

    def prep(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(stretch(images, sigma).astype(np.float32)).permute(0, 3, 1, 2).contiguous()

    x_fit, x_test = prep(fit_images), prep(test_images)
    mu, sd = x_fit.mean(dim=(0, 2, 3), keepdim=True), x_fit.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    x_fit, x_test = (x_fit - mu) / sd, (x_test - mu) / sd
    n = len(x_fit)

    heads, y_cols = [], []  # per target: (name, kind, output slice, extra)
    start = 0
    for name, (kind, rows, values) in targets.items():
        if kind == CLASSIFICATION:
            classes, codes = np.unique(values.astype(str), return_inverse=True)
            y = torch.full((n,), -100, dtype=torch.long)  # -100: cross_entropy's ignore index
            y[torch.as_tensor(rows)] = torch.as_tensor(codes)
            heads.append((name, kind, slice(start, start + len(classes)), classes))
            start += len(classes)
        else:
            v = values.astype(np.float64)
            m, s = float(v.mean()), float(v.std()) or 1.0
            y = torch.full((n,), float("nan"))
            y[torch.as_tensor(rows)] = torch.as_tensor((v - m) / s, dtype=torch.float32)
            heads.append((name, kind, slice(start, start + 1), (m, s)))
            start += 1
        y_cols.append(y)

    def loss_fn(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        total = out.new_zeros(())
        for (_, kind, sl, _), y in zip(heads, y_cols, strict=True):
            yi = y[idx]
            if kind == CLASSIFICATION:
                if bool((yi >= 0).any()):
                    total = total + F.cross_entropy(out[:, sl], yi, ignore_index=-100)
            else:
                ok = torch.isfinite(yi)
                if bool(ok.any()):
                    total = total + F.mse_loss(out[ok, sl.start], yi[ok])
        return total

    perm = torch.randperm(n, generator=gen)
    n_hold = int(holdout * n) if n >= 20 else 0
    hold, train = perm[:n_hold], perm[n_hold:]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = SmallCNN(x_fit.shape[1], start)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, math.ceil(len(train) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    early = EarlyStopping(patience, min_delta=1e-4)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(net(_augment(x_fit[idx], gen)), idx).backward()
            opt.step()
            sched.step()
        if n_hold:
            net.eval()
            with torch.no_grad():
                val = float(loss_fn(net(x_fit[hold]), hold))
            early.update(val, net)
        if progress and (epoch + 1) % 10 == 0:
            progress(
                f"  cnn epoch {epoch + 1}/{epochs}: holdout loss {early.best:.3f} ({time.perf_counter() - t0:.0f} s)"
            )
        if early.stop:
            break
    early.restore(net)
    net.eval()
    with torch.no_grad():
        out = torch.cat([net(x_test[i : i + 256]) for i in range(0, len(x_test), 256)])
    preds = {}
    for name, kind, sl, extra in heads:
        if kind == CLASSIFICATION:
            preds[name] = extra[out[:, sl].argmax(1).numpy()]
        else:
            m, s = extra
            preds[name] = out[:, sl.start].numpy().astype(np.float64) * s + m
    return preds


# ------------------------------------------------------------------------------------------------ orchestration


def pixel_baselines(
    data: str,
    embeddings: EmbeddingTable,
    *,
    fit_split: str = "val",
    test_split: str = "test",
    which: set[str] | tuple[str, ...] = BASELINES,
    targets: list[str] | None = None,
    classify: tuple[str, ...] = (),
    pixel_crop: int | None = 64,
    cnn_epochs: int = 40,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
    """Baselines computed from the pixels of the embedded fit/test objects.

    Returns (feature baselines {name: (X_fit, X_test)} in the embeddings' row order, supervised predictions
    {"cnn": {target: test predictions}}).
    """
    wanted = [b for b in ("pca_pixels", "photometry", "cnn") if b in which]
    if not wanted:
        return {}, {}
    fit, test = split_rows(embeddings, fit_split, test_split)
    t0 = time.perf_counter()
    ids = {fit_split: fit.object_id, test_split: test.object_id}
    imgs = load_images(data, ids, pixel_crop, embeddings.metadata.get("split_settings"))
    a, b = imgs[fit_split], imgs[test_split]
    if progress:
        progress(
            f"loaded {len(a)} + {len(b)} stamps of {a.shape[1]}x{a.shape[2]} px ({time.perf_counter() - t0:.1f} s)"
        )
    features, supervised = {}, {}
    if "pca_pixels" in wanted:
        features["pca_pixels"] = pca_pixels(a, b, n_components=fit.X.shape[1])
    if "photometry" in wanted:
        features["photometry"] = photometry(a, b)
    if "cnn" in wanted:
        tasks, _ = make_tasks(fit.labels, test.labels, list(targets or fit.labels), classify)
        spec = {t.name: (t.kind, t.fit_rows, t.y_fit) for t in tasks}
        if spec:
            t1 = time.perf_counter()
            if progress:
                progress(f"training the supervised CNN on {len(a)} stamps, {len(spec)} targets")
            supervised["cnn"] = train_cnn(a, b, spec, epochs=cnn_epochs, seed=seed, progress=progress)
            if progress:
                progress(f"  cnn done in {time.perf_counter() - t1:.0f} s")
    return features, supervised
