"""Galaxy images: one catalogue object rendered as a g, r, z stamp (`render_image`).

Per-object/per-band Moffat (β = 3) PSFs, sky noise plus source shot noise, pixel scale 0.262″,
units nanomaggies (AB zero-point 22.5), float32 (H, W, C) with bands g, r, z. Smooth components are drawn
in Fourier space with GalSim (exact Sérsic/Moffat transforms, pixel response) on a padded grid of fixed size,
so the cost does not explode for large nearby galaxies; arms and clumps are added on the same grid. The galaxy
sits at the stamp centre (the corner between the four central pixels) with ±0.5 px jitter. About 12% of stamps
contain a contaminating star (a blackbody of the drawn colour).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import special

from astrolom.mock.instruments import BANDS, PIXEL_SCALE, ZERO_POINT, is_resampled, lanczos_ft

# colour offsets (mag, g r z) of each component relative to the galaxy's mean colour
_COMPONENT_COLOUR = {
    "bulge": (0.15, 0.0, -0.08),
    "bar": (0.10, 0.0, -0.05),
    "disc": (0.0, 0.0, 0.0),
    "arms": (-0.12, 0.0, 0.06),
    "clumps": (-0.35, 0.0, 0.2),
}


@lru_cache(maxsize=16)
def _fft_size(size: int) -> int:
    """Side of the padded Fourier grid used for a stamp of `size` pixels."""
    import galsim

    return int(galsim.Image.good_fft_size(2 * size))


@dataclass(frozen=True)
class _Grid:
    N: int
    ky: np.ndarray  # (N,) rad/arcsec, numpy FFT order
    kx: np.ndarray  # (N//2 + 1,) rad/arcsec, non-negative (real-FFT half plane)
    pix: np.ndarray  # (N, N//2 + 1) pixel response
    ksq: np.ndarray  # (N, N//2 + 1) |k|²
    x: np.ndarray  # (N,) real-space coordinate (arcsec) with the centre at index N//2


@lru_cache(maxsize=8)
def _grid(N: int) -> _Grid:
    ky = 2 * np.pi * np.fft.fftfreq(N, d=PIXEL_SCALE)
    kx = 2 * np.pi * np.fft.rfftfreq(N, d=PIXEL_SCALE)
    pix = np.outer(np.sinc(ky * PIXEL_SCALE / (2 * np.pi)), np.sinc(kx * PIXEL_SCALE / (2 * np.pi)))
    ksq = ky[:, None] ** 2 + kx[None, :] ** 2
    return _Grid(N, ky, kx, pix, ksq, (np.arange(N) - N // 2) * PIXEL_SCALE)


def _khalf(obj, N: int) -> np.ndarray:
    """Fourier transform of a GalSim profile on the real-FFT half plane (N, N//2+1), numpy FFT order.

    Uses GalSim's own k-space drawing (exact Sérsic Hankel tables), the same call its drawFFT makes.
    """
    import galsim

    dk = 2 * np.pi / (N * PIXEL_SCALE)
    kim = galsim.ImageCD(galsim.BoundsI(0, N // 2, -N // 2, N // 2 - 1), scale=dk)
    obj._drawKImage(kim)
    return np.fft.ifftshift(kim.array, axes=0)


@lru_cache(maxsize=1)
def _moffat3_table() -> tuple[np.ndarray, np.ndarray]:
    """Fourier transform of a unit-flux β=3 Moffat, 0.5 x² K₂(x) with x = k α, tabulated for interpolation."""
    x = np.linspace(0.0, 60.0, 60001)
    with np.errstate(invalid="ignore", over="ignore"):
        f = 0.5 * x**2 * special.kv(2, np.maximum(x, 1e-300))
    f[0] = 1.0
    return x, np.nan_to_num(f)


@lru_cache(maxsize=16)
def _pixel_transfer(N: int, native: float) -> np.ndarray:
    """Pixel response on the (N, N//2+1) half plane: the 0.262" pixel, or a coarser camera pixel followed by the
    Lanczos-3 resampling onto the 0.262" grid (aliasing of the camera's sampling is neglected)."""
    grid = _grid(N)
    if not is_resampled(native):
        return grid.pix
    fy, fx = grid.ky / (2 * np.pi), grid.kx / (2 * np.pi)
    ty = np.sinc(fy * native) * lanczos_ft(fy * native)
    tx = np.sinc(fx * native) * lanczos_ft(fx * native)
    return np.outer(ty, tx)


@lru_cache(maxsize=16)
def _noise_filter(size: int, native: float) -> np.ndarray:
    """Transfer function (size, size//2+1) that turns white noise on the 0.262" grid into Lanczos-3 resampled noise
    from `native`-arcsec camera pixels (1 at zero frequency: the depth is kept)."""
    fy = np.fft.fftfreq(size, d=PIXEL_SCALE) * native
    fx = np.fft.rfftfreq(size, d=PIXEL_SCALE) * native
    return np.outer(lanczos_ft(fy), lanczos_ft(fx))


def _moffat_k(grid: _Grid, fwhm: float, g1: float, g2: float) -> np.ndarray:
    """Sheared β=3 Moffat PSF in Fourier space on the half plane (identical to GalSim's Moffat.shear)."""
    import galsim

    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / 3.0) - 1.0))
    a = galsim.Shear(g1=g1, g2=g2).getMatrix()  # symmetric, det 1: K'(k) = K(Aᵀ k)
    kx, ky = grid.kx[None, :], grid.ky[:, None]
    kxe = a[0, 0] * kx + a[1, 0] * ky
    kye = a[0, 1] * kx + a[1, 1] * ky
    xt, ft = _moffat3_table()
    # linear interpolation on the uniform table (np.interp's binary search is the bottleneck otherwise)
    t = np.minimum(np.sqrt(kxe**2 + kye**2) * (alpha / (xt[1] - xt[0])), xt.size - 1.0)
    i = np.minimum(t.astype(np.int64), xt.size - 2)
    return ft[i] + (ft[i + 1] - ft[i]) * (t - i)


def _disc_plane(X: np.ndarray, Y: np.ndarray, pa: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """Sky coordinates → disc-plane coordinates (inverse of GalSim's area-preserving shear(q, beta=pa))."""
    c, s = math.cos(pa), math.sin(pa)
    xr = X * c + Y * s
    yr = -X * s + Y * c
    return xr * math.sqrt(q), yr / math.sqrt(q)


def _phase(grid: _Grid, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
    """Fourier phase of a shift by (x, y) arcsec (one plane per position when x, y are arrays)."""
    return (
        np.exp(-1j * np.multiply.outer(y, grid.ky))[..., :, None]
        * np.exp(-1j * np.multiply.outer(x, grid.kx))[..., None, :]
    )


def _combine(weights: np.ndarray, planes: list[np.ndarray]) -> np.ndarray:
    """(B, C) weights × C planes → B planes, without BLAS (its threads fight GalSim's OpenMP threads)."""
    out = np.zeros((weights.shape[0], *planes[0].shape), dtype=np.complex128)
    for b in range(weights.shape[0]):
        for c, plane in enumerate(planes):
            out[b] += weights[b, c] * plane
    return out


def render_image(obj: Mapping[str, Any], size: int = 64, noise: bool = True, rng=None) -> np.ndarray:
    """Render one catalogue object as an (size, size, 3) float32 g, r, z stamp in nanomaggies.

    Bulge, disc and bar are GalSim profiles drawn in Fourier space on a padded N×N grid (N = `_fft_size(size)`),
    multiplied by the pixel response and the per-band Moffat PSF and transformed back; clumps are Gaussian knots
    added in Fourier space, arms a real-space pattern on the same grid. Light beyond the padded grid wraps.
    """
    import galsim

    if rng is None:
        rng = np.random.default_rng([int(obj["_seed"]), int(obj["_index"]), 1])
    N = _fft_size(size)
    grid = _grid(N)
    pa = math.radians(obj["position_angle_deg"])
    beta = pa * galsim.radians
    r_d, r_b = obj["_r_disc"], obj["_r_bulge"]
    q_d, q_b = obj["_q_disc"], obj["_q_bulge"]
    bt = obj["bulge_frac"]
    h = r_d / 1.6783  # exponential scale length
    n_arms = int(obj["n_arms"])
    pitch = math.radians(obj["_pitch_deg"])
    phase0 = rng.uniform(0, 2 * np.pi)

    # r-band light fractions of the components
    bar_f = 0.2 * (1 - bt) if obj["has_bar"] else 0.0
    disc_total = 1.0 - bt - bar_f
    arm_f = obj["arm_strength"] * disc_total if n_arms > 0 else 0.0
    clump_f = obj["clump_frac"] * disc_total
    frac_r = {"bulge": bt, "bar": bar_f, "disc": disc_total - arm_f - clump_f, "arms": arm_f, "clumps": clump_f}

    analytic: dict[str, np.ndarray] = {}  # unit-flux transforms that still need the pixel response
    sampled: dict[str, np.ndarray] = {}  # pixel-sampled components (already pixelised)
    if bt > 0:
        analytic["bulge"] = _khalf(galsim.Sersic(obj["_n_bulge"], half_light_radius=r_b).shear(q=q_b, beta=beta), N)
    analytic["disc"] = _khalf(galsim.Exponential(half_light_radius=r_d).shear(q=q_d, beta=beta), N)
    if bar_f > 0:
        bar_angle = rng.uniform(0, np.pi) * galsim.radians
        bar = galsim.Gaussian(half_light_radius=0.5 * obj["_bar_len"] * r_d)
        analytic["bar"] = _khalf(bar.shear(q=0.3, beta=bar_angle).shear(q=q_d, beta=beta), N)
    if clump_f > 0:
        n_cl = int(rng.integers(4, 25))
        rad = rng.gamma(2.0, h, n_cl)
        if n_arms > 0:  # clumps trace the arms
            arm_i = rng.integers(0, n_arms, n_cl)
            phi = phase0 / n_arms + 2 * np.pi * arm_i / n_arms + np.log(rad / h + 1e-3) / math.tan(pitch)
            phi = phi + rng.normal(0, 0.25, n_cl)
        else:
            phi = rng.uniform(0, 2 * np.pi, n_cl)
        xr, yr = rad * np.cos(phi) / math.sqrt(q_d), rad * np.sin(phi) * math.sqrt(q_d)
        cx = xr * math.cos(pa) - yr * math.sin(pa)
        cy = xr * math.sin(pa) + yr * math.cos(pa)
        w = rng.gamma(1.5, 1.0, n_cl)
        w /= w.sum()
        ex = np.exp(-1j * np.outer(cx, grid.kx))  # (n_cl, N//2+1)
        ey = np.exp(-1j * np.outer(cy, grid.ky))  # (n_cl, N)
        sig = 0.25 / obj["_kpc_per_arcsec"]  # ~250 pc clumps
        # sum of shifted knots (broadcasting, not BLAS: see _combine)
        knots = ((w[:, None] * ey)[:, :, None] * ex[:, None, :]).sum(axis=0)
        analytic["clumps"] = knots * np.exp(-0.5 * sig**2 * grid.ksq)
    if arm_f > 0:
        X, Y = np.meshgrid(grid.x, grid.x)
        u, v = _disc_plane(X, Y, pa, q_d)
        r = np.hypot(u, v)
        spiral = np.cos(n_arms * (np.arctan2(v, u) - np.log(r / h + 1e-3) / math.tan(pitch)) - phase0)
        arms = np.exp(-r / h) * (1 - np.exp(-((r / (0.7 * h)) ** 2))) * (0.5 * (1 + spiral)) ** 3
        total = arms.sum()
        if total > 0:
            sampled["arms"] = np.fft.rfft2(np.fft.ifftshift(arms / total))
        else:
            frac_r["disc"] += frac_r.pop("arms")

    # per-band fluxes of each component, from the component colours
    names_a, names_s = list(analytic), list(sampled)
    fluxes = np.zeros((3, len(names_a) + len(names_s)))
    for b, band in enumerate(BANDS):
        flux = 10 ** (-0.4 * (obj[f"mag_{band}"] + obj[f"_zp_offset_{band}"] - ZERO_POINT))
        w = {c: f * 10 ** (-0.4 * _COMPONENT_COLOUR[c][b]) for c, f in frac_r.items()}
        tot = sum(w.values())
        fluxes[b] = [flux * w[c] / tot for c in names_a + names_s]
    na = len(names_a)
    kb = _combine(fluxes[:, :na], [analytic[c] for c in names_a])
    if obj["has_star"]:
        ang = rng.uniform(0, 2 * np.pi)
        rad_px = rng.uniform(0.25, 0.45) * size
        star = _phase(grid, rad_px * math.cos(ang) * PIXEL_SCALE, rad_px * math.sin(ang) * PIXEL_SCALE)
        m_r, gr = obj["_star_mag_r"], obj["_star_gr"]
        for b, (m, band) in enumerate(zip((m_r + gr, m_r, m_r - 0.7 * gr + 0.1), BANDS, strict=True)):
            kb[b] += 10 ** (-0.4 * (m + obj[f"_star_offset_{band}"] - ZERO_POINT)) * star
    natives = [float(obj[f"_native_scale_{band}"]) for band in BANDS]
    for b in range(3):
        kb[b] *= _pixel_transfer(N, natives[b])
    if names_s:
        ks = _combine(fluxes[:, na:], [sampled[c] for c in names_s])  # already sampled on 0.262" pixels
        for b in range(3):
            if is_resampled(natives[b]):
                ks[b] *= _pixel_transfer(N, natives[b]) / grid.pix
        kb += ks

    # PSF, and the shift that puts the centre on the corner between the four central pixels (+ jitter)
    for b, band in enumerate(BANDS):
        kb[b] *= _moffat_k(grid, obj[f"psf_fwhm_{band}"], obj["_psf_g1"], obj["_psf_g2"])
    kb *= _phase(grid, (obj["_offset_x"] - 0.5) * PIXEL_SCALE, (obj["_offset_y"] - 0.5) * PIXEL_SCALE)
    img = np.fft.fftshift(np.fft.irfft2(kb, s=(N, N)), axes=(1, 2))
    lo = N // 2 - size // 2
    img = img[:, lo : lo + size, lo : lo + size]
    if noise:
        for b, band in enumerate(BANDS):
            var = obj[f"_noise_white_{band}"] ** 2 + np.maximum(img[b], 0.0) / obj[f"_gain_{band}"]
            field = np.sqrt(var) * rng.standard_normal((size, size))
            if is_resampled(natives[b]):  # camera pixels resampled onto the coadd grid: correlated noise
                field = np.fft.irfft2(np.fft.rfft2(field) * _noise_filter(size, natives[b]), s=(size, size))
            img[b] += field
    return np.ascontiguousarray(img.transpose(1, 2, 0), dtype=np.float32)
