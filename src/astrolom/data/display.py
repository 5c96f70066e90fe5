"""The Legacy Survey viewer's colour rendering of survey stamps: the one home of the grz -> RGB display stretch.

The AstroPT paper's 8.6M training stamps are 512x512 JPEGs from the DESI Legacy Survey viewer's cutout service
(DR8, 0.262"/px), so its models saw pixels rendered this way. Source: the viewer's code, `legacysurvey/imagine`,
`map/views.py` (read at commit 8402fc3, 2026-08-20):

- the `ls-dr8`/`ls-dr9` layers, north (BASS + MzLS) and south (DECaLS) alike, are `ReDecalsLayer`s whose `get_rgb`
  is `dr2_rgb`: the viewer's `sdss_rgb` with per-band (RGB plane, scale) g = (blue, 6.0), r = (green, 3.4),
  z = (red, 2.2) per nanomaggy, offset m = 0.03 and Q = 20. Both telescopes get the same scaling (their coadds are
  calibrated to the same AB nanomaggies); what differs between north and south JPEGs is the data;
- the `ls-dr10` south layer with g, r, i, z (`LsDr10Layer.get_rgb`) multiplies those scales by 1.5 (i = 3.0 x 1.5)
  and mixes the bands into the planes: g -> (0, 0, 0.75), r -> (0, 0.5, 0.25), i -> (0.25, 0.5, 0), z -> (0.75, 0, 0),
  each band clipped to [0, 1] before mixing.

The stretch (Lupton et al. 2004): x_b = img_b * scale_b + m; I = mean_b max(0, x_b); every band is multiplied by
asinh(Q I) / sqrt(Q) / I (I = 0 -> 1e-6), which keeps hues and compresses bright light; the result is clipped to
[0, 1]. The viewer writes it with matplotlib's `imsave` (float -> 8 bit by truncation, floor(255 v)) and netpbm's
`pnmtojpeg -quality 90` (`map/utils.py: save_jpeg`); `viewer_jpeg` does the same with Pillow at quality 90.

Orientation: rows are rendered as given. The viewer's JPEGs have north in their first row, its FITS cutouts south
(it negates the declination step for JPEGs), so a FITS cutout read by astrolom needs `image[::-1]` to come out as the
viewer's JPEG of the same object.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ViewerStretch:
    """One viewer layer's rendering: band -> scale per nanomaggy, band -> (R, G, B) weights, offset m, softening Q."""

    scales: dict[str, float]
    planes: dict[str, tuple[float, float, float]]
    m: float = 0.03
    q: float = 20.0
    clip_bands: bool = False  # DR10 griz clips each band to [0, 1] before mixing; grz clips the planes


_STRETCH_DR10 = 1.5  # imagine LsDr10Layer: rgb_stretch_factor
VIEWER_LAYERS = {
    "ls-dr9": ViewerStretch(
        scales={"g": 6.0, "r": 3.4, "z": 2.2},
        planes={"g": (0.0, 0.0, 1.0), "r": (0.0, 1.0, 0.0), "z": (1.0, 0.0, 0.0)},
    ),
    "ls-dr10-griz": ViewerStretch(
        scales={b: s * _STRETCH_DR10 for b, s in {"g": 6.0, "r": 3.4, "i": 3.0, "z": 2.2}.items()},
        planes={"g": (0.0, 0.0, 0.75), "r": (0.0, 0.5, 0.25), "i": (0.25, 0.5, 0.0), "z": (0.75, 0.0, 0.0)},
        clip_bands=True,
    ),
}
VIEWER_LAYERS["ls-dr8"] = VIEWER_LAYERS["ls-dr9"]  # the paper's data release: the same dr2_rgb rendering
JPEG_QUALITY = 90  # the viewer's pnmtojpeg -quality 90


def viewer_rgb(image: np.ndarray, bands: tuple[str, ...] = ("g", "r", "z"), layer: str = "ls-dr9") -> np.ndarray:
    """(H, W, C) image in nanomaggies -> (H, W, 3) float32 RGB in [0, 1], as the Legacy Survey viewer renders it.

    Args:
        image: one plane per band, in `bands` order (the Legacy Surveys' unit: nanomaggies, AB zero point 22.5).
        bands: the band names of the planes; all of the layer's bands must be present (extra ones are ignored).
        layer: a key of `VIEWER_LAYERS` ("ls-dr9" = "ls-dr8": g, r, z; "ls-dr10-griz": g, r, i, z).

    Raises:
        ValueError: for an unknown layer, or bands that do not include the layer's bands.
    """
    if layer not in VIEWER_LAYERS:
        raise ValueError(f"unknown viewer layer {layer!r}; choose one of {sorted(VIEWER_LAYERS)}")
    st = VIEWER_LAYERS[layer]
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != len(bands):
        raise ValueError(f"image of shape {img.shape} does not hold one plane per band of {tuple(bands)}")
    missing = [b for b in st.scales if b not in bands]
    if missing:
        raise ValueError(f"layer {layer} renders bands {','.join(st.scales)}; the image lacks {','.join(missing)}")
    x = {b: img[..., bands.index(b)] * np.float32(st.scales[b]) + np.float32(st.m) for b in st.scales}
    mean = sum(np.maximum(v, 0) for v in x.values()) / np.float32(len(x))
    stretched = np.arcsinh(np.float32(st.q) * mean) / np.float32(np.sqrt(st.q))
    factor = stretched / np.where(mean == 0, np.float32(1e-6), mean)
    rgb = np.zeros((*img.shape[:2], 3), np.float32)
    for b, v in x.items():
        v = v * factor
        if st.clip_bands:
            v = np.clip(v, 0, 1)
        for plane, weight in enumerate(st.planes[b]):
            if weight:
                rgb[..., plane] += np.float32(weight) * v
    return np.clip(rgb, 0, 1)


def display_rgb(image: np.ndarray, bands: tuple[str, ...] | None) -> np.ndarray:
    """(H, W, C) stamp -> (H, W, 3) float32 RGB in [0, 1] for any figure or page: the one display rendering.

    Stamps whose `bands` include g, r and z (by name, any order, extra bands ignored) get the viewer's ls-dr9 stretch
    (`viewer_rgb`), so the report, the figures and the explorer show a galaxy the way the Legacy Survey viewer and
    the paper's training JPEGs do. Other band sets (e.g. JPEG cutouts, whose planes are already display RGB, or
    bands = None) show their first three planes (one plane: grey), scaled between the 0.5 and 99.5 percentiles.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[..., None]
    bands = tuple(bands or ())
    if len(bands) == img.shape[2] and set(VIEWER_LAYERS["ls-dr9"].scales) <= set(bands):
        rgb = viewer_rgb(img, bands, "ls-dr9")
    else:
        x = img[..., :3] if img.shape[2] >= 3 else np.repeat(img[..., :1], 3, axis=2)
        lo, hi = np.nanpercentile(x, 0.5), np.nanpercentile(x, 99.5)
        rgb = np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1)
    return np.nan_to_num(rgb).astype(np.float32)  # masked (NaN) pixels show black


def to_8bit(rgb: np.ndarray) -> np.ndarray:
    """[0, 1] float RGB -> uint8 the way the viewer's matplotlib `imsave` converts it: floor(255 v)."""
    return (np.asarray(rgb, dtype=np.float32) * np.float32(255)).astype(np.uint8)


def viewer_jpeg(
    image: np.ndarray,
    bands: tuple[str, ...] = ("g", "r", "z"),
    layer: str = "ls-dr9",
    size: int | None = None,
    quality: int = JPEG_QUALITY,
) -> bytes:
    """JPEG bytes of `image` rendered as the viewer renders it (`viewer_rgb`, `to_8bit`, quality 90).

    Args:
        size: output pixels per side; the flux image is first resampled to it (Lanczos, flux per pixel scaled by the
            pixel-area ratio, as a cutout at another `pixscale` would be), so the stretch sees the same surface
            brightness. None: the image's own size.
    """
    from PIL import Image

    img = np.asarray(image, dtype=np.float32)
    if size is not None and size != img.shape[0]:
        if img.shape[0] != img.shape[1]:
            raise ValueError(f"resizing needs a square stamp, got shape {img.shape}")
        area = (img.shape[0] / size) ** 2  # flux per pixel scales with pixel area
        planes = [
            np.asarray(Image.fromarray(img[..., c], mode="F").resize((size, size), Image.LANCZOS)) * area
            for c in range(img.shape[2])
        ]
        img = np.stack(planes, axis=-1)
    buf = io.BytesIO()
    Image.fromarray(to_8bit(viewer_rgb(img, bands, layer)), mode="RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
