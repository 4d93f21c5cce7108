"""Dense CRF refinement of per-pixel class probabilities (METHOD.md sections 3 and 4).

A thin wrapper over pydensecrf (``pip install pydensecrf2``, imported as ``pydensecrf``):
the unary is the negative log of the given probabilities, plus two pairwise terms,
a Gaussian (smoothness: nearby pixels agree) and a bilateral one (appearance: nearby
pixels of similar colour agree), followed by mean-field inference.

Reference settings, for orientation (all with a Gaussian term of sxy=3, compat=3 and
10 mean-field iterations, at PASCAL VOC resolution, about 500 x 375 pixels):
- PSA (Ahn & Kwak, CVPR 2018, ``tool/imutils.crf_inference``): bilateral sxy=80,
  srgb=13, compat=10, unary from the class scores.
- IRN (Ahn et al., CVPR 2019, ``misc/imutils.crf_inference_label``): bilateral sxy=50,
  srgb=5, compat=10, unary from hard labels.
The defaults here take sxy=50 with PSA's srgb=13. The bilateral sxy is a length in
pixels; for images much smaller than VOC's, :meth:`CRFParams.scaled` shrinks the
spatial widths in proportion (on the 96 px benchmark images 50 px already spans the
image, so the bilateral term is then close to a pure colour term; that is fine for the
edge snapping the CRF is used for).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from wsss import config as C

#: probabilities are clipped to at least this before the log of the unary
PROB_FLOOR = 1e-5
#: the long side, in pixels, of the images the defaults were chosen for (PASCAL VOC)
CRF_REFERENCE_SIZE = 500


@dataclass
class CRFParams:
    """Parameters of :func:`dense_crf` (METHOD.md section 3). Spatial widths in pixels."""

    iters: int = C.setting(10, "CRF mean-field iterations")
    gauss_sxy: float = C.setting(3.0, "CRF Gaussian width (px at VOC size)")
    gauss_compat: float = C.setting(3.0, "CRF Gaussian weight")
    bilateral_sxy: float = C.setting(50.0, "CRF bilateral spatial width (px at VOC size)")
    bilateral_srgb: float = C.setting(13.0, "CRF bilateral colour width")
    bilateral_compat: float = C.setting(10.0, "CRF bilateral weight")

    def scaled(self, factor: float) -> "CRFParams":
        """A copy with both spatial widths multiplied by ``factor``.

        E.g. ``CRFParams().scaled(image_size / 500)`` keeps the VOC-resolution settings
        proportionally the same on smaller images (colour width and weights unchanged).
        """
        if factor <= 0:
            raise ValueError(f"CRFParams.scaled: factor must be positive, got {factor}")
        return replace(self, gauss_sxy=self.gauss_sxy * factor, bilateral_sxy=self.bilateral_sxy * factor)

    def for_size(self, size: tuple[int, ...]) -> "CRFParams":
        """A copy scaled by max(H, W) / CRF_REFERENCE_SIZE: these settings, meant for a VOC
        image, made proportionally the same on an image of ``size`` (H, W)."""
        return self.scaled(max(size[:2]) / CRF_REFERENCE_SIZE)


def _check_inputs(image: np.ndarray, probs: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf: image must be (H, W, 3) uint8, got shape {image.shape}")
    if probs.ndim != 3:
        raise ValueError(f"dense_crf: probs must be (C, H, W), got shape {probs.shape}")
    if probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"dense_crf: probs {probs.shape} and image {image.shape} differ in size; "
                         "resize the probabilities to the image first")
    if probs.shape[0] == 0:
        raise ValueError("dense_crf: probs has no classes (C=0)")
    if not np.all(np.isfinite(probs)):
        raise ValueError("dense_crf: probs contains NaN or inf")


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None) -> np.ndarray:
    """Refine ``probs`` (C, H, W), a distribution over C per pixel, with a dense CRF on ``image``.

    ``image`` is (H, W, 3) uint8 RGB; either input may be non-contiguous (they are copied
    into C order as pydensecrf needs). Probabilities are clipped to at least
    :data:`PROB_FLOOR` before the log. Returns the mean-field marginals (C, H, W) float32,
    which sum to 1 over C. With a single class there is nothing to decide: the
    probabilities come back unchanged (as float32).
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    params = params or CRFParams()
    image, probs = np.asarray(image), np.asarray(probs)
    _check_inputs(image, probs)
    num_classes, height, width = probs.shape
    if num_classes == 1:
        return probs.astype(np.float32, copy=True)
    if image.dtype != np.uint8:
        raise ValueError(f"dense_crf: image must be uint8 (0..255), got {image.dtype}")

    crf = dcrf.DenseCRF2D(width, height, num_classes)
    unary = unary_from_softmax(probs.astype(np.float32), clip=PROB_FLOOR)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=params.bilateral_compat)
    marginals = crf.inference(params.iters)
    return np.asarray(marginals, dtype=np.float32).reshape(num_classes, height, width)


def crf_labels(image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None) -> np.ndarray:
    """The per-pixel argmax (H, W) int64 of :func:`dense_crf` (first class wins ties)."""
    return np.argmax(dense_crf(image, probs, params), axis=0)
