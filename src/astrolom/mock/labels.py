"""The columns of a mock survey's shards: every label's name, unit, description and Arrow type, in column order."""

from __future__ import annotations

from astrolom.data.records import IMAGE, IMAGE_SHAPE, SPECTRUM, SPECTRUM_IVAR, SPECTRUM_MASK

# Labels written to the shards: name -> (unit, description). Order is the column order after object_id, split.
LABELS: dict[str, tuple[str, str]] = {
    "ra": ("deg", "right ascension"),
    "dec": ("deg", "declination; dec > 32.375 is the 'north' footprint"),
    "telescope": ("", "'north' (BASS/MzLS-like) or 'south' (DECaLS-like)"),
    "redshift": ("", "true redshift"),
    "log_mstar": ("log10 Msun", "stellar mass"),
    "log_ssfr": ("log10 1/yr", "specific star-formation rate"),
    "log_sfr": ("log10 Msun/yr", "star-formation rate"),
    "quenched": ("", "drawn as quenched (red sequence) rather than star forming"),
    "sed_type": ("", "template mix: 0 = E, 1 = Sbc, 2 = Scd, 3 = Im (CWW), linear in between"),
    "mag_g": ("AB mag", "apparent DECam g (total, noise-free)"),
    "mag_r": ("AB mag", "apparent DECam r (total, noise-free)"),
    "mag_z": ("AB mag", "apparent DECam z (total, noise-free)"),
    "g_minus_r": ("AB mag", "observed-frame g - r"),
    "r_minus_z": ("AB mag", "observed-frame r - z"),
    "abs_mag_g": ("AB mag", "rest-frame absolute DECam g (Planck18, k-corrected with the templates)"),
    "abs_mag_r": ("AB mag", "rest-frame absolute DECam r"),
    "abs_mag_z": ("AB mag", "rest-frame absolute DECam z"),
    "r_half_kpc": ("kpc", "half-light radius of the bulge+disc light (circularised, face-on), physical"),
    "r_half_arcsec": ("arcsec", "half-light radius on the sky (r_half_kpc / angular-diameter scale)"),
    "sersic_n": ("", "light-weighted Sérsic index: B/T * n_bulge + (1 - B/T) * 1"),
    "bulge_frac": ("", "bulge-to-total light ratio in r"),
    "axis_ratio": ("", "light-weighted projected axis ratio b/a of bulge and disc"),
    "inclination_deg": ("deg", "disc inclination (0 = face on); isotropic"),
    "position_angle_deg": ("deg", "major-axis position angle, from +x towards +y"),
    "edge_on": ("", "disc-dominated (B/T < 0.5) and inclination > 75 deg"),
    "arm_strength": ("", "fraction of the disc light in spiral arms (0 for quenched)"),
    "n_arms": ("", "number of spiral arms (0 when arm_strength = 0)"),
    "clump_frac": ("", "fraction of the disc light in star-forming clumps"),
    "has_bar": ("", "the disc has a bar"),
    "has_star": ("", "a contaminating star is in the stamp"),
    "psf_fwhm_g": ("arcsec", "Moffat (beta=3) PSF FWHM in g"),
    "psf_fwhm_r": ("arcsec", "Moffat PSF FWHM in r"),
    "psf_fwhm_z": ("arcsec", "Moffat PSF FWHM in z"),
    "noise_g": ("nanomaggies/pixel", "sky noise sigma per pixel in g (correlated in the resampled north g, r)"),
    "noise_r": ("nanomaggies/pixel", "sky noise sigma in r"),
    "noise_z": ("nanomaggies/pixel", "sky noise sigma in z"),
    "smooth": ("", "Galaxy-Zoo-like vote fraction: smooth (of 40 volunteers)"),
    "disc": ("", "vote fraction: featured or disc"),
    "artefact": ("", "vote fraction: star or artefact"),
    "edge_on_vote": ("", "vote fraction: edge-on, among the 'disc' voters (0 if none)"),
    "spiral": ("", "vote fraction: spiral arms, among face-on 'disc' voters (0 if none)"),
    "bar": ("", "vote fraction: bar, among face-on 'disc' voters (0 if none)"),
    "flux_ha": (
        "1e-17 erg/s/cm2",
        "observed (attenuated) total Halpha line flux (the spectrum holds fiber_frac of it)",
    ),
    "flux_hb": ("1e-17 erg/s/cm2", "observed Hbeta line flux"),
    "flux_oii": ("1e-17 erg/s/cm2", "observed [OII]3727 doublet flux"),
    "flux_oiii": ("1e-17 erg/s/cm2", "observed [OIII]5007 line flux"),
    "flux_nii": ("1e-17 erg/s/cm2", "observed [NII]6584 line flux"),
    "sigma_v": ("km/s", "emission-line velocity dispersion"),
    "spec_noise": ("1e-17 erg/s/cm2/A", "spectrum noise sigma per pixel at 6500 A"),
    "fiber_seeing": ("arcsec", "Moffat FWHM of the seeing while the spectrum was taken"),
    "fiber_frac": (
        "",
        "the spectrum's flux over the galaxy's total flux: fibre acceptance of the galaxy / of a point source "
        "(1 with --spectrum-aperture total)",
    ),
    "has_spectrum": (
        "",
        "the object has a spectrum (about 70%, missing at random); else the spectrum columns are null",
    ),
    "log_zstar": ("log10 Z/Zsun", "mass-weighted stellar metallicity (mass-metallicity relation)"),
    "age_mw_gyr": ("Gyr", "mass-weighted stellar age of the template mix at the galaxy's redshift"),
}
BOOL_LABELS = ("quenched", "edge_on", "has_bar", "has_star", "has_spectrum")
INT_LABELS = ("n_arms",)
STR_LABELS = ("telescope",)
COLUMNS = ("object_id", "split", *LABELS, IMAGE, IMAGE_SHAPE, SPECTRUM, SPECTRUM_IVAR, SPECTRUM_MASK)
