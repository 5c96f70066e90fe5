"""The numbers README "Fibre apertures" and "Telescope islands" quote about the mock and the demo's maps.

1. Fibre apertures of the default population: `fiber_frac` and `fiber_seeing` percentiles, and the median continuum
   S/N per 2 Å pixel at 6,000-6,500 Å with the fibre and with the whole galaxy (`--spectrum-aperture total`).
2. With `--embeddings FILE ...` (e.g. demo/embeddings.parquet demo/probes/embeddings_random_init.parquet): the
   telescope neighbour agreement (`astrolom.eval.figures.neighbour_agreement`, k = 15) in the standardised
   embedding and in its UMAP map, against random assignment.

    PYTHONPATH=src python benchmarks/mock_fibre_islands.py [--n 8000] [--embeddings A.parquet B.parquet]
"""

from __future__ import annotations

import argparse

import numpy as np

from astrolom import mock as S


def fibre(n: int, n_spec: int) -> None:
    cat = S.sample_catalogue(n, seed=0)
    ff, see = cat["fiber_frac"], cat["fiber_seeing"]
    print(f"fiber_frac of {n} objects: median {np.median(ff):.2f}, 1-99% {np.percentile(ff, 1):.2f}-"
          f"{np.percentile(ff, 99):.2f}; fiber_seeing median {np.median(see):.2f}\"")  # fmt: skip
    win = (S.spectrum_wavelength() > 6000) & (S.spectrum_wavelength() < 6500)
    snr = []
    for j in range(n_spec):
        row = S.catalogue_row(cat, j)
        cont = S.render_spectrum(row, noise=False, lines=False)[win]
        snr.append(np.median(cont / S.spectrum_sigma(row)[win]))
    snr = np.array(snr)
    print(f"median continuum S/N per 2 A pixel at 6000-6500 A ({n_spec} objects): fibre {np.median(snr):.1f}, "
          f"whole galaxy {np.median(snr / ff[:n_spec]):.1f}")  # fmt: skip


def islands(paths: list[str]) -> None:
    from astrolom.eval import figures as fg
    from astrolom.eval.embeddings import load_embeddings

    print("\n| embeddings | objects | agreement, embedding | agreement, UMAP map | random assignment |")
    print("|---|---|---|---|---|")
    for path in paths:
        emb = load_embeddings(path)
        tel = np.asarray(emb.labels["telescope"])
        e = fg.neighbour_agreement(fg.standardised(emb.X), tel)
        m = fg.neighbour_agreement(fg.umap_coords(emb.X), tel)
        print(f"| {path} | {len(tel)} | {e['agreement']:.3f} | {m['agreement']:.3f} | {e['mixed']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8000, help="catalogue size for the fibre statistics")
    ap.add_argument("--spectra", type=int, default=400, help="spectra rendered for the S/N")
    ap.add_argument("--embeddings", nargs="*", default=[], help="embedding Parquet files with a telescope label")
    args = ap.parse_args()
    fibre(args.n, args.spectra)
    if args.embeddings:
        islands(args.embeddings)


if __name__ == "__main__":
    main()
