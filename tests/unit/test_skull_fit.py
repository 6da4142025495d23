"""The skull fit that aligns every crop, on every synthetic scanner, against the generator's
own head (centre and axes in millimetres)."""

import math

import numpy as np
import pytest

from pipelines import biometry
from pipelines.data.synth_render import STYLES, make_anatomy, render
from pipelines.imaging.preprocess import MAX_HEAD_SEMI_AXIS_MM, PreprocessError, fit_skull


@pytest.mark.parametrize("style", sorted(STYLES))
def test_the_fitted_skull_is_the_generators_head_on_every_scanner(style):
    """Centre within 4 mm, long semi-axis within 85-105% of the true outer one (acoustic
    shadowing hides the far poles a little). `ember` is the bright scanner whose grey tissue
    merges with the head at Otsu's level: fitted there, the ellipse took in the fan's apex
    or the whole fan (long semi-axis up to twice the head's)."""
    for i, ga in enumerate((19.0, 24.0, 29.0, 34.0)):
        an = make_anatomy(ga, float(biometry.tcd_from_z(0.0, ga)), float(biometry.cm_from_z(0.0, ga)), 0.78)
        img, _, pl, _ = render(an, STYLES[style], np.random.default_rng(100 + i))
        skull = fit_skull(img.astype(np.float32) / 255, np.ones(img.shape, bool), (pl.spacing, pl.spacing))
        centre_error = math.hypot(skull.cx - pl.cx * pl.spacing, skull.cy - pl.cy * pl.spacing)
        assert centre_error < 4.0, (style, ga, centre_error)
        assert 0.85 < skull.a / an.a < 1.05, (style, ga, skull.a, an.a)


def test_a_blob_larger_than_any_fetal_head_is_not_taken_for_one():
    """A bright ellipse with a 150 mm long axis on a dark field: no head is that long."""
    yy, xx = np.mgrid[0:400, 0:400]
    grey = np.where(((xx - 200) / 150.0) ** 2 + ((yy - 200) / 115.0) ** 2 <= 1.0, 0.8, 0.05).astype(np.float32)
    assert 150 * 0.5 > MAX_HEAD_SEMI_AXIS_MM
    with pytest.raises(PreprocessError, match="implausible"):
        fit_skull(grey, np.ones(grey.shape, bool), (0.5, 0.5))
    assert fit_skull(grey, np.ones(grey.shape, bool), (0.3, 0.3)).a == pytest.approx(45.0, rel=0.05)
