"""PSI and LPC-SI against golden values from the metric authors' own MATLAB code.

How the numbers below were produced (not needed at test time):

* The authors' files, unmodified in their code: ``PSI.m`` from github.com/feichtenhofer/PSI
  and ``lpc_si.m`` version 1.0 (Rania Hassen, 2013; the copy in github.com/zhenglab/IQA,
  ``Codes/OriginalVersion/LPC/lpc_si.m``), run under GNU Octave 7.3 with octave-image 2.14
  (Debian 12 packages ``octave`` and ``octave-image``) on ``255 * image`` for every image of
  :func:`golden_images`, written to disk as raw float64 (bit-exact inputs).
* ``PSI.m`` calls ``edge(I, 'sobel')``. Octave's ``edge`` thins the Sobel edges with another
  rule than MATLAB's, so ``PSI_GOLDEN`` was made with a small ``edge.m`` of our own put ahead of
  octave-image on Octave's path. It follows MATLAB's rule: bx, by = the image correlated with
  the Sobel kernels / 8 (replicate padding), b = bx^2 + by^2, cutoff = 4 mean(b); an edge where
  b > cutoff and either (|bx| >= |by| - 100 eps and b(r, c-1) <= b(r, c) > b(r, c+1)) or
  (|by| >= |bx| - 100 eps and b(r-1, c) <= b(r, c) > b(r+1, c)), a neighbour outside the image
  passing its test. ``PSI_OCTAVE_EDGE`` keeps what ``PSI.m`` gives with Octave's own ``edge``
  (called on I / 255, as it refuses doubles outside [0, 1]; its rule is scale-free), to show
  that it differs: our ``psi`` follows MATLAB, not Octave.
* ``lpc_si.m`` needs nothing but base Octave (``fft2``/``ifft2``); ``LPC_SI_GOLDEN`` is its output.

Our functions get the [0, 1] images with ``data_range=1.0``, which maps them to the same
``255 * image`` the .m files were given.
"""

import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from arssr_jax.metrics import lpc_si, psi

ANAT = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")
SIGMAS = (0.0, 0.5, 1.0, 2.0)


def _bases() -> dict:
    from skimage import data

    def unit(x):
        x = np.asarray(x, np.float64)
        return (x - x.min()) / (x.max() - x.min())

    anat = np.asarray(nib.load(ANAT).dataobj, np.float64)  # (33, 41, 25)
    axial = unit(ndimage.zoom(anat[:, :, 12], 4, order=3))  # 132 x 164
    coronal = unit(ndimage.zoom(anat[:, 20, :], 4, order=3))  # 132 x 100
    camera = data.camera() / 255.0
    rng = np.random.default_rng(14)
    rects = np.zeros((161, 199))  # piecewise constant on 8-bit levels: exact ties in the Sobel magnitude
    for _ in range(12):
        (r0, r1), (c0, c1) = np.sort(rng.integers(0, 161, 2)), np.sort(rng.integers(0, 199, 2))
        rects[r0:r1, c0:c1] = rng.integers(0, 256)
    return {
        "camera": camera,  # 512 x 512
        "moon": data.moon() / 255.0,  # 512 x 512
        "coins": data.coins() / 255.0,  # 303 x 384
        "camera_odd": camera[7:300, 11:270],  # 293 x 259: both sides odd, not multiples of 32
        "mr_axial": axial,
        "mr_axial_odd": axial[:-1, :-1],  # 131 x 163
        "mr_coronal": coronal,
        "rects": rects / 255.0,  # 161 x 199
        "noise": rng.random((129, 150)),
    }


def _mni_bases() -> dict:
    datasets = pytest.importorskip("nilearn.datasets")
    mni = datasets.load_mni152_template(resolution=1).get_fdata()  # (197, 233, 189), offline
    mni = (mni - mni.min()) / (mni.max() - mni.min())
    return {"mni_axial": mni[:, :, 90], "mni_coronal": mni[:, 110, :]}  # 197 x 233, 197 x 189


def golden_images(mni: bool = False) -> dict:
    """name -> [0, 1] float64 image: every base, sharp and Gaussian-blurred (sigma 0.5, 1, 2);
    the MNI152 slices (nilearn's template) when ``mni``."""
    out = {}
    for name, img in (_mni_bases() if mni else _bases()).items():
        for sigma in SIGMAS:
            out[f"{name}_s{sigma:g}"] = img if sigma == 0 else ndimage.gaussian_filter(img, sigma)
    return out


PSI_GOLDEN = {  # PSI.m with an edge() following MATLAB's rule
    'camera_s0': 0.5197859560798604,
    'camera_s0.5': 0.43069179516520895,
    'camera_s1': 0.20630285194606687,
    'camera_s2': 0.11324579297945013,
    'moon_s0': 0.9987277333095897,
    'moon_s0.5': 0.23109301034004556,
    'moon_s1': 0.18899190196187654,
    'moon_s2': 0.11919253228712326,
    'coins_s0': 0.5010683168826943,
    'coins_s0.5': 0.36778967298625526,
    'coins_s1': 0.2195726649685169,
    'coins_s2': 0.11444750051913219,
    'camera_odd_s0': 0.30036429471333576,
    'camera_odd_s0.5': 0.26349958260935147,
    'camera_odd_s1': 0.19512078889442835,
    'camera_odd_s2': 0.13181705215767905,
    'mr_axial_s0': 0.2540360956790063,
    'mr_axial_s0.5': 0.2337509406405545,
    'mr_axial_s1': 0.25352678562413833,
    'mr_axial_s2': 0.1034384571361377,
    'mr_axial_odd_s0': 0.2540360956790063,
    'mr_axial_odd_s0.5': 0.2337509406405545,
    'mr_axial_odd_s1': 0.25352678562413833,
    'mr_axial_odd_s2': 0.1034384571361377,
    'mr_coronal_s0': 0.14222148517934846,
    'mr_coronal_s0.5': 0.14214494630782915,
    'mr_coronal_s1': 0.11570917569628196,
    'mr_coronal_s2': 0.11628899071910807,
    'rects_s0': 1.0,
    'rects_s0.5': 0.2518411415420167,
    'rects_s1': 0.1742689973513393,
    'rects_s2': 0.09012619179926214,
    'noise_s0': 0.4998441023343527,
    'noise_s0.5': 0.4993597955494094,
    'noise_s1': 0.34617340449976497,
    'noise_s2': 0.16737017734231552,
    'mni_axial_s0': 0.3184138075555738,
    'mni_axial_s0.5': 0.2638927504919601,
    'mni_axial_s1': 0.29716399412416444,
    'mni_axial_s2': 0.09272934989466393,
    'mni_coronal_s0': 0.3495027666110947,
    'mni_coronal_s0.5': 0.34749395020028495,
    'mni_coronal_s1': 0.20206015108220388,
    'mni_coronal_s2': 0.0750381285765536,
}

PSI_OCTAVE_EDGE = {  # PSI.m with octave-image 2.14's own edge(): not what MATLAB gives
    'camera_s0': 0.5241992388319937,
    'camera_s0.5': 0.4188891128759555,
    'camera_s1': 0.20635103917865583,
    'camera_s2': 0.11296019122521081,
    'moon_s0': 0.9991339566318647,
    'moon_s0.5': 0.27285497636441136,
    'moon_s1': 0.1985437646188022,
    'moon_s2': 0.11965701782027334,
    'coins_s0': 0.5087692177863009,
    'coins_s0.5': 0.364484705264752,
    'coins_s1': 0.21900760765237565,
    'coins_s2': 0.11452990832084398,
    'camera_odd_s0': 0.3745529459978267,
    'camera_odd_s0.5': 0.28210926090364796,
    'camera_odd_s1': 0.19653411598833329,
    'camera_odd_s2': 0.1307975086507418,
    'mr_axial_s0': 0.2540360956790063,
    'mr_axial_s0.5': 0.2337509406405545,
    'mr_axial_s1': 0.25352678562413833,
    'mr_axial_s2': 0.1034384571361377,
    'mr_axial_odd_s0': 0.2540360956790063,
    'mr_axial_odd_s0.5': 0.2337509406405545,
    'mr_axial_odd_s1': 0.25352678562413833,
    'mr_axial_odd_s2': 0.1034384571361377,
    'mr_coronal_s0': 0.14222148517934846,
    'mr_coronal_s0.5': 0.14214494630782915,
    'mr_coronal_s1': 0.11809714500060922,
    'mr_coronal_s2': 0.11628899071910807,
    'rects_s0': 1.0,
    'rects_s0.5': 0.2909444802643026,
    'rects_s1': 0.1742689973513393,
    'rects_s2': 0.09001702393991581,
    'noise_s0': 0.4998441023343527,
    'noise_s0.5': 0.4993597955494094,
    'noise_s1': 0.34617340449976497,
    'noise_s2': 0.16737017734231552,
    'mni_axial_s0': 0.3167210283826524,
    'mni_axial_s0.5': 0.2672032381226746,
    'mni_axial_s1': 0.30042903806209864,
    'mni_axial_s2': 0.09231005810562724,
    'mni_coronal_s0': 0.34962581670247256,
    'mni_coronal_s0.5': 0.34721060026309464,
    'mni_coronal_s1': 0.20206015108220388,
    'mni_coronal_s2': 0.0750381285765536,
}

LPC_SI_GOLDEN = {  # lpc_si.m v1.0
    'camera_s0': 0.9497382691695457,
    'camera_s0.5': 0.9383274485152207,
    'camera_s1': 0.8652500939036314,
    'camera_s2': 0.37985025764557506,
    'moon_s0': 0.8440757038418982,
    'moon_s0.5': 0.8136598616155547,
    'moon_s1': 0.6660368297439742,
    'moon_s2': 0.25965383768855405,
    'coins_s0': 0.9203017573652458,
    'coins_s0.5': 0.8993388429727877,
    'coins_s1': 0.7778880222068745,
    'coins_s2': 0.28769427904238093,
    'camera_odd_s0': 0.9402993344096017,
    'camera_odd_s0.5': 0.9274452487037382,
    'camera_odd_s1': 0.854228139864004,
    'camera_odd_s2': 0.4037772137777491,
    'mr_axial_s0': 0.6176768042354724,
    'mr_axial_s0.5': 0.5937329045224167,
    'mr_axial_s1': 0.49839390410998485,
    'mr_axial_s2': 0.18747857193301057,
    'mr_axial_odd_s0': 0.6236781106680148,
    'mr_axial_odd_s0.5': 0.6000978315889638,
    'mr_axial_odd_s1': 0.5058510608214798,
    'mr_axial_odd_s2': 0.19382568424638,
    'mr_coronal_s0': 0.5765505132286174,
    'mr_coronal_s0.5': 0.5548812819388145,
    'mr_coronal_s1': 0.480789578176372,
    'mr_coronal_s2': 0.32770037141652253,
    'rects_s0': 0.949167940826628,
    'rects_s0.5': 0.935466313491711,
    'rects_s1': 0.8630022890466794,
    'rects_s2': 0.3933562765875536,
    'noise_s0': 0.8832652788709286,
    'noise_s0.5': 0.8547896556833461,
    'noise_s1': 0.6968831058980972,
    'noise_s2': 0.1315497179133716,
    'mni_axial_s0': 0.907309485903537,
    'mni_axial_s0.5': 0.8902663372095744,
    'mni_axial_s1': 0.8049830436969233,
    'mni_axial_s2': 0.3457518318321096,
    'mni_coronal_s0': 0.9083215289257057,
    'mni_coronal_s0.5': 0.8857103996107082,
    'mni_coronal_s1': 0.7586520825725321,
    'mni_coronal_s2': 0.2728260366534774,
}


def _images(names, mni=False):
    return [pytest.param(name, id=name) for name in names if name.startswith("mni") == mni]


@pytest.fixture(scope="module")
def images():
    return golden_images()


@pytest.fixture(scope="module")
def mni_images():
    return golden_images(mni=True)


def _check(metric, golden, image):
    got = metric(image, data_range=1.0)
    assert got == pytest.approx(golden, rel=1e-9, abs=1e-12)  # measured: <= 5e-16 (PSI), 5e-14 (LPC-SI)


@pytest.mark.parametrize("name", _images(PSI_GOLDEN))
def test_psi_equals_psi_m(name, images):
    _check(psi, PSI_GOLDEN[name], images[name])


@pytest.mark.parametrize("name", _images(LPC_SI_GOLDEN))
def test_lpc_si_equals_lpc_si_m(name, images):
    _check(lpc_si, LPC_SI_GOLDEN[name], images[name])


@pytest.mark.parametrize("name", _images(PSI_GOLDEN, mni=True))
def test_mni_slices_equal_the_originals(name, mni_images):
    _check(psi, PSI_GOLDEN[name], mni_images[name])
    _check(lpc_si, LPC_SI_GOLDEN[name], mni_images[name])


def test_golden_set_tells_matlab_edge_from_octave_edge():
    # The thinning rule matters: on these images Octave's edge() moves PSI by more than 1e-2.
    changed = [n for n in PSI_GOLDEN if abs(PSI_OCTAVE_EDGE[n] - PSI_GOLDEN[n]) > 1e-2 * PSI_GOLDEN[n]]
    assert len(changed) >= 5, changed


def test_intensity_convention(images):
    # data_range maps to 255, the scale both originals expect: 8-bit input with data_range=255
    # is passed through unchanged, and an offset changes nothing.
    img = images["coins_s0"]
    for metric in (psi, lpc_si):
        ref = metric(img, data_range=1.0)
        assert metric(img * 255.0, data_range=255.0) == pytest.approx(ref, rel=1e-12)
        default = metric(img, data_range=float(img.max() - img.min()))  # coins spans 1..252
        assert metric(img * 3.0) == pytest.approx(default, rel=1e-9)
        assert metric(img + 7.0, data_range=1.0) == pytest.approx(ref, rel=1e-9)


def test_phase_coherence_product_equals_angle_sum():
    # lpc_si's fast path (products of phasors for integer weights) against cos(sum w angle).
    from arssr_jax.metrics.no_reference import _phase_coherence

    rng = np.random.default_rng(3)
    resp = rng.standard_normal((3, 40, 50)) + 1j * rng.standard_normal((3, 40, 50))
    resp[:, 0, 0] = 0.0  # an exact zero falls back to the angles
    w = (1.0, -3.0, 2.0)
    expected = np.cos(np.tensordot(np.asarray(w), np.angle(resp), axes=(0, 0)))
    np.testing.assert_allclose(_phase_coherence(resp, w), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(_phase_coherence(resp, (1.0, -2.5, 2.0)),
                               np.cos(np.tensordot(np.asarray((1.0, -2.5, 2.0)), np.angle(resp), axes=(0, 0))),
                               rtol=0, atol=1e-12)
