"""The embedded mock DESI Legacy Survey: g, r, z GalSim stamps, DESI-like spectra and the true physics of every object.

A simulator, not a reader: `astrolom.data` reads real data (including the shards this package writes); nothing in
the library imports this package except the demo and the `astrolom survey` command. The facts a reader needs
about a mock data set (volunteers per vote, emission-line wavelengths) travel in the data set's metadata.

Every object is drawn from physics that hangs together; one module per stage:

- `catalogue`: redshift, stellar mass, star formation, colours and magnitudes from SED templates, morphology,
  Galaxy-Zoo-like votes, emission-line fluxes and stellar populations (`sample_catalogue`, no rendering);
- `instruments`: the two telescopes (north: BASS/MzLS, south: DECaLS) and their switchable differences, the
  DESI-like spectrograph grid and its fibres (`fiber_fraction`);
- `images`: GalSim bulge + disc + bar, arms and clumps, PSF, pixel response and noise (`render_image`);
- `spectra`: continuum, lines, absorption features, noise, ivar and masks (`observe_spectrum`);
- `tables`: the priors, template/filter/cosmology tables and the counter-based random streams they draw from;
- `labels`: the label columns; `writer`: Parquet shards (`generate_survey`) or in-memory records
  (`generate_objects`); `cli`: `astrolom survey`.

Determinism: each object's randomness derives from (seed, index) only, so an object is the same whatever the
number of objects, workers or shard size. Splits come from a hash of the object id (`records.split_of`).
The paper splits its 8.6M galaxies 98/1/1; the default here is 80/10/10 because the mock is usually small.
"""

from astrolom.mock.catalogue import LINES, N_VOLUNTEERS, catalogue_row, object_id, sample_catalogue
from astrolom.mock.images import render_image
from astrolom.mock.instruments import (
    BANDS,
    FIBER_DIAMETER,
    FILTER_NAMES,
    INSTRUMENT_EFFECTS,
    NORTH_DEC,
    PIXEL_SCALE,
    SKY_LINES,
    SPEC_STEP,
    TELESCOPES,
    ZERO_POINT,
    check_instrument,
    fiber_fraction,
    parse_instrument,
    resampled_noise_factor,
    spectrum_wavelength,
)
from astrolom.mock.labels import BOOL_LABELS, COLUMNS, INT_LABELS, LABELS, STR_LABELS
from astrolom.mock.spectra import observe_spectrum, render_spectrum, sky_line_mask, spectrum_sigma
from astrolom.mock.writer import SurveyConfig, generate_objects, generate_survey, render_object

__all__ = [
    "BANDS",
    "BOOL_LABELS",
    "COLUMNS",
    "FIBER_DIAMETER",
    "FILTER_NAMES",
    "INSTRUMENT_EFFECTS",
    "INT_LABELS",
    "LABELS",
    "LINES",
    "NORTH_DEC",
    "N_VOLUNTEERS",
    "PIXEL_SCALE",
    "SKY_LINES",
    "SPEC_STEP",
    "STR_LABELS",
    "TELESCOPES",
    "ZERO_POINT",
    "SurveyConfig",
    "catalogue_row",
    "check_instrument",
    "fiber_fraction",
    "generate_objects",
    "generate_survey",
    "object_id",
    "observe_spectrum",
    "parse_instrument",
    "render_image",
    "render_object",
    "render_spectrum",
    "resampled_noise_factor",
    "sample_catalogue",
    "sky_line_mask",
    "spectrum_sigma",
    "spectrum_wavelength",
]
