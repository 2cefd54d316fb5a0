"""DRAEM's anomaly simulator: Perlin-noise masks, anomaly-source textures, opacity blending.

Faithful to the official code (github VitjanZ/DRAEM @ 2dbf673: ``perlin.py`` ``rand_perlin_2d_np``,
``data_loader.py`` ``MVTecDRAEMTrainDataset.transform_image`` / ``augment_image``), with every random
draw taken from the ``numpy`` generator passed in (the trainer's per-batch ``Generator``):

1. with probability 0.3 the training image itself is rotated by an angle in [-90, 90) degrees (the
   official ``do_aug_orig``; the rotated image is also the reconstruction target);
2. the anomaly source (resized to the image size) goes through 3 distinct augmenters picked at random
   from the 10 of the official list (:data:`SOURCE_AUGMENTERS`);
3. Perlin noise (:func:`rand_perlin_2d`) with scales ``2**kx``, ``2**ky`` (``k`` uniform in 0..5) along
   rows and columns, rotated by an angle in [-90, 90), thresholded at 0.5: the mask ``M``;
4. ``beta`` uniform in [0, 0.8) and the official blend (:func:`blend`)::

       augmented = (1 - M) * image + (1 - beta) * M * source + beta * M * image

   so the source's opacity ``1 - beta`` lies in (0.2, 1]. The paper writes the same blend with the
   roles of ``beta`` and ``1 - beta`` swapped and ``beta`` in [0.1, 1.0]; the code, followed here, is
   what the published models were trained with (the golden fixture's ``augment_params`` also use
   [0, 0.8));
5. with probability 0.5 (:data:`NO_ANOMALY_PROBABILITY`) the image is returned unchanged with an
   empty mask (the official ``no_anomaly`` branch).

Departures, all documented: imgaug is not a dependency, so rotations are ``cv2.warpAffine`` (bilinear,
constant 0 border, about the image centre: imgaug ``Affine(rotate=...)``'s defaults) and the 10 source
augmenters are numpy/OpenCV re-implementations of imgaug's (see each function; Equalize uses OpenCV's
histogram equalisation, Autocontrast percentiles). The official code simulates an anomaly and then
discards it for a clean sample; here the clean branch is drawn first and the work skipped (the same
distribution). Images and sources are RGB here; the official ones are OpenCV's BGR, to which its
colour-space augmenters (luma, hue) are applied as if they were RGB; every other step is
channel-symmetric.

Anomaly sources (:class:`AnomalySources`): a user folder of texture images (``anomaly_source_path``;
the paper uses DTD, which cannot be downloaded here), read with :func:`kdad.data.io.read_image` and
``cv2.resize`` (bilinear, as the official code) to the image size, or, when no folder is given, textures
the project generates (:func:`generate_anomaly_sources`: fractal Perlin colour noise and the stripes of
:mod:`kdad.data.synthetic`), seeded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from kdad.data.io import IMAGE_EXTENSIONS, ImageReadError, read_image

#: Perlin scale exponents ``k`` are drawn from ``range(MIN, MAX)`` (official ``torch.randint(0, 6)``)
PERLIN_MIN_SCALE, PERLIN_MAX_SCALE = 0, 6
#: the official mask threshold on the Perlin noise
THRESHOLD = 0.5
#: ``beta = U[0, 1) * BETA_MAX`` (official ``torch.rand(1) * 0.8``)
BETA_MAX = 0.8
#: the official ``no_anomaly = torch.rand(1) > 0.5``: the image stays clean
NO_ANOMALY_PROBABILITY = 0.5
#: the official ``do_aug_orig = torch.rand(1) > 0.7``: the training image is rotated
ROTATE_IMAGE_PROBABILITY = 0.3
#: ``iaa.Affine(rotate=(-90, 90))`` of the noise and of the training image
ROTATION_DEGREES = 90.0
#: how many augmenters of :data:`SOURCE_AUGMENTERS` transform each source (official ``randAugmenter``)
AUGMENTERS_PER_SOURCE = 3
#: textures made by :func:`generate_anomaly_sources` when no folder is given
GENERATED_SOURCES = 64
#: resized folder sources kept in memory (bytes); beyond it they are read again when drawn
SOURCE_CACHE_BYTES = 512 * 2 ** 20


# --- Perlin noise ----------------------------------------------------------------------------------------

def fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic ``6 t^5 - 15 t^4 + 10 t^3``."""
    return 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3


def lerp(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(b - a) * w + a`` (the official ``lerp_np``)."""
    return (b - a) * w + a


def rand_perlin_2d(shape: Tuple[int, int], res: Tuple[int, int], rng: Any) -> np.ndarray:
    """2-D Perlin noise ``[H, W]`` (float64) with ``res[0] x res[1]`` lattice cells, the official
    ``rand_perlin_2d_np``: random gradient angles ``2 pi U[0, 1)`` at the ``(res[0]+1) x (res[1]+1)``
    lattice points, quintic fade, ``sqrt(2)`` scale.

    ``rng`` is anything with ``random(shape)``: a ``numpy.random.Generator`` in training, or a
    ``numpy.random.RandomState`` / the ``numpy.random`` module, whose draws equal the official
    ``np.random.rand`` (so ``np.random.seed(7)`` reproduces the official noise exactly). A size that is
    not a multiple of ``res`` (the official code needs one) is computed on the next multiple and cropped.
    """
    height, width = int(shape[0]), int(shape[1])
    r0, r1 = int(res[0]), int(res[1])
    d0, d1 = -(-height // r0), -(-width // r1)  # cell size in pixels
    full0, full1 = d0 * r0, d1 * r1
    # the official grid: np.mgrid[0:r0:r0/H, 0:r1:r1/W] % 1, i.e. index * delta, fractional part
    gy = ((np.arange(full0) * (r0 / full0)) % 1)[:height, None]
    gx = ((np.arange(full1) * (r1 / full1)) % 1)[None, :width]
    angles = 2 * math.pi * rng.random((r0 + 1, r1 + 1))
    grad = np.stack((np.cos(angles), np.sin(angles)), axis=-1)
    rows = np.arange(full0)[:height] // d0  # lattice cell of every pixel
    cols = np.arange(full1)[:width] // d1

    def ramp(dy: int, dx: int) -> np.ndarray:
        g = grad[rows + dy][:, cols + dx]  # the gradient at the cell's corner (dy, dx)
        return (gy - dy) * g[..., 0] + (gx - dx) * g[..., 1]

    ty, tx = fade(gy), fade(gx)
    return math.sqrt(2) * lerp(lerp(ramp(0, 0), ramp(1, 0), ty), lerp(ramp(0, 1), ramp(1, 1), ty), tx)


def perlin_mask_noise(size: int, rng: np.random.Generator) -> np.ndarray:
    """The official mask noise: scales ``2**kx``, ``2**ky`` (``k`` in 0..5), rotated by [-90, 90)."""
    kx, ky = rng.integers(PERLIN_MIN_SCALE, PERLIN_MAX_SCALE, 2)
    noise = rand_perlin_2d((size, size), (2 ** int(kx), 2 ** int(ky)), rng)
    return rotate(noise, rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES))


# --- geometric and photometric operations -------------------------------------------------------------

def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation about the centre, bilinear, constant 0 outside (imgaug ``Affine(rotate=...)``'s
    defaults ``order=1, mode='constant', cval=0``), same shape and dtype."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), float(degrees), 1.0)
    out = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.reshape(image.shape)


def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(table), 0, 255).astype(np.uint8)[image]


def apply_gamma(image: np.ndarray, gammas: Sequence[float]) -> np.ndarray:
    """``round(255 (x / 255) ** gamma_c)`` per channel ``c`` of an ``[H, W, 3]`` uint8 image."""
    levels = np.arange(256) / 255.0
    return np.stack([_lut(image[..., c], 255.0 * levels ** float(gammas[c])) for c in range(3)], axis=-1)


def gamma_contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``GammaContrast((0.5, 2.0), per_channel=True)``: :func:`apply_gamma` with gammas in [0.5, 2)."""
    return apply_gamma(image, rng.uniform(0.5, 2.0, 3))


def multiply_and_add_to_brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30))``: the luma (Y of YCrCb) times
    ``mul`` plus ``add``."""
    ycrcb = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)
    luma = ycrcb[..., 0].astype(np.float64) * rng.uniform(0.8, 1.2) + rng.uniform(-30.0, 30.0)
    ycrcb[..., 0] = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB)


def enhance_sharpness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``pillike.EnhanceSharpness(factor=(0, 2))``: PIL's blend ``smooth + factor (image - smooth)``
    with PIL's SMOOTH kernel ``[[1,1,1],[1,5,1],[1,1,1]] / 13`` (border pixels keep their value)."""
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13.0
    source = image.astype(np.float64)
    smooth = cv2.filter2D(source, -1, kernel, borderType=cv2.BORDER_REPLICATE)
    smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1] = source[0], source[-1], source[:, 0], source[:, -1]
    out = smooth + rng.uniform(0.0, 2.0) * (source - smooth)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def add_to_hue_and_saturation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``AddToHueAndSaturation((-50, 50), per_channel=True)``: independent shifts of hue (imgaug's
    [-255, 255] hue scale, i.e. ``v * 180 / 255`` of OpenCV's 0..179, cyclic) and saturation (clipped)."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.int64)
    add_hue, add_sat = rng.integers(-50, 51, 2)
    hsv[..., 0] = (hsv[..., 0] + int(round(add_hue * 180 / 255))) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] + add_sat, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def solarize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``Solarize(0.5, threshold=(32, 128))``: with probability 0.5 values >= a threshold in [32, 128)
    are inverted."""
    if rng.random() >= 0.5:
        return image
    threshold = rng.uniform(32.0, 128.0)
    return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


def posterize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``Posterize()``: keep the ``n`` high bits, ``n`` uniform in 1..8."""
    bits = int(rng.integers(1, 9))
    return (image & np.uint8((0xFF << (8 - bits)) & 0xFF)).astype(np.uint8)


def invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``Invert()``: ``255 - x`` (its default probability is 1)."""
    del rng
    return (255 - image).astype(np.uint8)


def autocontrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``pillike.Autocontrast(cutoff=(0, 20))``: per channel, cut ``cutoff`` percent of the histogram at
    each end and stretch the rest to 0..255 (percentiles instead of PIL's histogram walk)."""
    cutoff = rng.uniform(0.0, 20.0)
    out = np.empty_like(image)
    for c in range(3):
        channel = image[..., c].astype(np.float64)
        low, high = np.percentile(channel, [cutoff, 100.0 - cutoff])
        if high <= low:
            out[..., c] = image[..., c]
            continue
        out[..., c] = np.clip(np.rint((channel - low) * (255.0 / (high - low))), 0, 255)
    return out


def equalize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``pillike.Equalize()``: per-channel histogram equalisation (OpenCV's)."""
    del rng
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(image[..., c])) for c in range(3)], axis=-1)


def affine_rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``Affine(rotate=(-45, 45))``."""
    return rotate(image, rng.uniform(-45.0, 45.0))


#: the official ``augmenters`` list, in its order
SOURCE_AUGMENTERS: Tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...] = (
    gamma_contrast, multiply_and_add_to_brightness, enhance_sharpness, add_to_hue_and_saturation, solarize,
    posterize, invert, autocontrast, equalize, affine_rotate)


def augment_source(source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """3 distinct augmenters of :data:`SOURCE_AUGMENTERS` in random order (official ``randAugmenter``),
    applied to an ``[S, S, 3]`` uint8 image."""
    for index in rng.choice(len(SOURCE_AUGMENTERS), AUGMENTERS_PER_SOURCE, replace=False):
        source = SOURCE_AUGMENTERS[int(index)](source, rng)
    return np.ascontiguousarray(source, dtype=np.uint8)


# --- the simulation ------------------------------------------------------------------------------------

def blend(image: np.ndarray, source: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """The official blend of ``image`` (``[H, W, 3]`` in [0, 1]) with ``source`` (``[H, W, 3]`` uint8)
    inside ``mask`` (``[H, W]`` 0/1): ``(1 - M) x + (1 - beta) M s / 255 + beta M x``, float32."""
    m = mask.astype(np.float64)[..., None]
    x = image.astype(np.float64)
    out = x * (1 - m) + (1 - beta) * (source.astype(np.float32) * m / 255.0) + beta * x * m
    return out.astype(np.float32)


@dataclass
class Simulation:
    """One simulated training sample (``[S, S, 3]`` / ``[S, S]`` float32, RGB in [0, 1])."""

    target: np.ndarray      #: the clean image the reconstruction must restore (rotated when drawn so)
    augmented: np.ndarray   #: the network's input
    mask: np.ndarray        #: 0/1 anomaly mask (all 0 for a clean sample)
    anomalous: bool         #: False: the no-anomaly branch (``augmented`` equals ``target``)
    beta: float = 0.0       #: the blend's ``beta`` (anomalous samples)
    source: Optional[np.ndarray] = None  #: the augmented anomaly source, uint8 (anomalous samples)


def simulate(image: np.ndarray, sources: AnomalySources, rng: np.random.Generator) -> Simulation:
    """The official ``transform_image`` + ``augment_image`` for one ``[S, S, 3]`` float image in [0, 1]."""
    size = image.shape[0]
    if image.shape[:2] != (size, size):
        raise ValueError(f"the anomaly simulator takes square images, got {image.shape}")
    target = image.astype(np.float32)
    if rng.random() < ROTATE_IMAGE_PROBABILITY:
        target = rotate(target, rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES))
    if rng.random() < NO_ANOMALY_PROBABILITY:
        return Simulation(target, target.copy(), np.zeros((size, size), np.float32), False)
    source = augment_source(sources.get(int(rng.integers(len(sources))), size), rng)
    mask = (perlin_mask_noise(size, rng) > THRESHOLD).astype(np.float32)
    beta = float(rng.random() * BETA_MAX)
    return Simulation(target, blend(target, source, mask, beta), mask, True, beta, source)


def simulate_batch(images: np.ndarray, sources: AnomalySources,
                   rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``images`` ``[N, 3, S, S]`` float32 in [0, 1] -> ``(targets, augmented)`` ``[N, 3, S, S]`` and
    ``masks`` ``[N, 1, S, S]``, float32, one :func:`simulate` per image in order."""
    samples = [simulate(np.ascontiguousarray(im.transpose(1, 2, 0)), sources, rng) for im in images]
    targets = np.stack([s.target.transpose(2, 0, 1) for s in samples])
    augmented = np.stack([s.augmented.transpose(2, 0, 1) for s in samples])
    masks = np.stack([s.mask[None] for s in samples])
    return targets, augmented, masks


# --- anomaly sources -------------------------------------------------------------------------------------

class AnomalySources:
    """Anomaly-source textures: generated ``[K, S0, S0, 3]`` uint8 RGB arrays or image files of a folder
    (read when first drawn; resized copies cached up to :data:`SOURCE_CACHE_BYTES`).
    :meth:`get` returns one resized to the training size with ``cv2.resize`` (bilinear, as the official)."""

    def __init__(self, images: Optional[Sequence[np.ndarray]] = None, paths: Sequence[str] = (),
                 origin: str = "generated") -> None:
        self.images: List[np.ndarray] = list(images or [])
        self.paths: List[str] = list(paths)
        self.origin = origin
        self._cache: Dict[Tuple[int, int], np.ndarray] = {}
        if not self.images and not self.paths:
            raise ValueError("no anomaly sources given")

    def __len__(self) -> int:
        return len(self.images) or len(self.paths)

    def get(self, index: int, size: int) -> np.ndarray:
        """Source ``index`` as ``[size, size, 3]`` uint8 RGB."""
        key = (int(index), int(size))
        if key in self._cache:
            return self._cache[key]
        image = self.images[index] if self.images else read_image(self.paths[index])
        if image.shape[:2] != (size, size):
            image = cv2.resize(image, (int(size), int(size)), interpolation=cv2.INTER_LINEAR)
        if (len(self._cache) + 1) * image.nbytes <= SOURCE_CACHE_BYTES:
            self._cache[key] = image
        return image


def list_source_files(folder: str) -> List[str]:
    """Image files (:data:`kdad.data.io.IMAGE_EXTENSIONS`) in ``folder`` and its subfolders (DTD keeps
    ``images/<class>/*.jpg``), sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, name) for name in sorted(files)
                  if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    return found


def load_anomaly_sources(folder: str) -> AnomalySources:
    """The textures of a folder (``anomaly_source_path``); a clear error naming the folder when it is
    missing or holds no readable image (files are checked in order until one reads; a file that fails
    later names itself)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"anomaly_source_path '{folder}' is not a folder")
    paths = list_source_files(folder)
    for path in paths:
        try:
            read_image(path)
        except ImageReadError:
            continue
        return AnomalySources(paths=paths, origin=folder)
    raise ValueError(f"anomaly_source_path '{folder}' holds no readable image ({len(paths)} files named "
                     f"{'/'.join(IMAGE_EXTENSIONS)}, none decodable; subfolders are searched too)")


def fractal_noise(size: int, res: int, octaves: int, rng: np.random.Generator) -> np.ndarray:
    """Sum of ``octaves`` Perlin noises with doubling lattice resolution and halving amplitude."""
    noise = np.zeros((size, size))
    for octave in range(octaves):
        cells = min(res * 2 ** octave, size)
        noise += 0.5 ** octave * rand_perlin_2d((size, size), (cells, cells), rng)
    return noise


def perlin_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A colour texture: fractal Perlin noise mapped through a ramp of three random colours, with a
    second noise field modulating brightness; ``[size, size, 3]`` uint8 RGB."""
    base = fractal_noise(size, int(2 ** rng.integers(1, 5)), 4, rng)
    base = (base - base.min()) / max(float(np.ptp(base)), 1e-12)
    colours = rng.uniform(0, 255, (3, 3))
    first = np.clip(base * 2, 0, 1)[..., None]
    second = np.clip(base * 2 - 1, 0, 1)[..., None]
    image = colours[0] + (colours[1] - colours[0]) * first + (colours[2] - colours[1]) * second
    shade = fractal_noise(size, int(2 ** rng.integers(2, 6)), 2, rng)[..., None]
    image = image * (1 + 0.3 * shade) + rng.normal(0, 6, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def generate_anomaly_sources(size: int, seed: int, count: int = GENERATED_SOURCES) -> AnomalySources:
    """``count`` textures of ``size`` px made by the project, seeded: even ones :func:`perlin_texture`,
    odd ones the stripes texture of :mod:`kdad.data.synthetic` (the source augmenters then vary their
    colours and contrast)."""
    from kdad.data.synthetic import _normal_texture

    images = []
    for index in range(count):
        rng = np.random.default_rng([int(seed), index, 0xD7AE])
        images.append(perlin_texture(size, rng) if index % 2 == 0 else _normal_texture(size, rng))
    return AnomalySources(images=images, origin="generated")


def anomaly_sources_from_config(config: Any, size: int) -> AnomalySources:
    """The folder ``anomaly_source_path`` when set, else :func:`generate_anomaly_sources` (``seed``)."""
    folder = str(config.get("anomaly_source_path", "") or "")
    if folder:
        return load_anomaly_sources(folder)
    return generate_anomaly_sources(int(size), int(config.get("seed", 0)))
