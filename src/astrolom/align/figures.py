"""Figures of `astrolom eval-align`: image -> spectrum retrieval (AstroCLIP Fig. 2), TARP calibration, corner plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from astrolom.align.features import FeatureCache
from astrolom.align.posteriors import FLOW_TARGETS
from astrolom.data.display import display_rgb
from astrolom.data.modalities import IMAGES, SPECTRA


def retrieval_figure(cache: FeatureCache, emb: dict[str, np.ndarray], path: Path, n_query: int = 4, top: int = 3):
    """Query galaxies (image) with their top spectrum matches (AstroCLIP Fig. 2): images and spectra of the matches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = cache.rows("test")
    rng = np.random.default_rng(0)
    queries = rng.choice(len(test), size=min(n_query, len(test)), replace=False)
    sims = emb[IMAGES][test] @ emb[SPECTRA][test].T
    z = cache.label("redshift")[test] if "redshift" in cache.label_names else np.full(len(test), np.nan)
    fig, axes = plt.subplots(
        len(queries),
        top + 2,
        figsize=(2.2 * (top + 2) + 2.5, 2.2 * len(queries)),
        gridspec_kw={"width_ratios": [1] * (top + 1) + [2.5]},
    )
    axes = np.atleast_2d(axes)
    bands = cache.meta.get("bands")  # None (caches written before bands were recorded): shown min-max scaled
    spectra = cache.spectra.numpy()[test]
    # observed-frame wavelength in Å (caches written before the grid was recorded fall back to pixel index)
    wave = np.asarray(cache.meta.get("wavelength") or np.arange(spectra.shape[1]), dtype=np.float64)
    x_label = "observed wavelength [Å]" if cache.meta.get("wavelength") else "spectrum pixel"
    for r, q in enumerate(queries):
        order = np.argsort(-sims[q])[:top]
        axes[r, 0].imshow(display_rgb(cache.images[test[q]].numpy(), bands))
        axes[r, 0].set_title(f"query z={z[q]:.3f}", fontsize=8)
        for c, m in enumerate(order, start=1):
            axes[r, c].imshow(display_rgb(cache.images[test[m]].numpy(), bands))
            hit = " ✓" if m == q else ""
            axes[r, c].set_title(f"#{c} z={z[m]:.3f}{hit}", fontsize=8)
        ax = axes[r, -1]
        ax.plot(wave, spectra[q] / np.nanmedian(np.abs(spectra[q])), color="k", lw=0.6, label="query spectrum")
        for c, m in enumerate(order, start=1):
            ax.plot(wave, spectra[m] / np.nanmedian(np.abs(spectra[m])) + 1.5 * c, lw=0.5, label=f"match #{c}")
        ax.set_yticks([])
        ax.set_xlabel(x_label, fontsize=7)
        ax.tick_params(labelsize=6)
        if r == 0:
            ax.legend(fontsize=6, loc="upper right")
        for a in axes[r, :-1]:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(
        "image → spectrum retrieval on the test split: query, top matches (images of the objects whose "
        "spectra matched) and their spectra",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tarp_figure(post: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="ideal")
    for name, r in post.items():
        a, e = np.asarray(r["tarp"]["alpha"]), np.asarray(r["tarp"]["ecp"])
        ax.plot(a, e, lw=1, label=name)
    a, band = np.asarray(r["tarp"]["alpha"]), np.asarray(r["tarp"]["band"])
    ax.fill_between(a, a - band, a + band, color="grey", alpha=0.2, label="calibrated ±2σ")
    ax.set_xlabel("credibility level α")
    ax.set_ylabel("expected coverage")
    ax.set_title("TARP coverage, joint (z, log M*, log sSFR) flows", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def corner_figure(post: dict, feature_set: str, path: Path) -> Path:
    """Corner-style plots (pairwise sample scatter + marginals, truth marked) for a few test galaxies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, truth = post[feature_set]["samples"], post[feature_set]["truth"]
    n_gal, d = s.shape[1], s.shape[2]
    fig, axes = plt.subplots(d, d * n_gal, figsize=(1.6 * d * n_gal, 1.6 * d))
    for g in range(n_gal):
        for i in range(d):
            for j in range(d):
                ax = axes[i, g * d + j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j > i:
                    ax.axis("off")
                elif i == j:
                    ax.hist(s[:, g, i], bins=30, color="C0", histtype="step")
                    ax.axvline(truth[g, i], color="C3", lw=0.8)
                else:
                    ax.scatter(s[:, g, j], s[:, g, i], s=0.5, alpha=0.3, color="C0")
                    ax.plot(truth[g, j], truth[g, i], "x", color="C3")
                if i == d - 1:
                    ax.set_xlabel(FLOW_TARGETS[j], fontsize=6)
                if j == 0 and g == 0:
                    ax.set_ylabel(FLOW_TARGETS[i], fontsize=6)
    fig.suptitle(f"posteriors from {feature_set} embeddings for {n_gal} test galaxies (red: truth)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
