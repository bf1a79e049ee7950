"""A deterministic, procedurally drawn image classification set for the built-in demo.

Ten classes of shapes and textures, each drawn at a random position, scale and rotation in
a random foreground colour over a random background with a colour gradient and pixel noise.
Nothing is downloaded: the same seed always draws the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Ordered so that the first few classes are the most distinct: a job that asks for fewer
# classes (small tests) gets an easier problem, not a harder one.
CLASS_NAMES = (
    "cross",
    "ring",
    "striped disc",
    "two dots",
    "triangle",
    "checkered square",
    "crescent",
    "star",
    "square",
    "disc",
)
_SHAPE_OF_CLASS = (4, 1, 6, 8, 2, 7, 9, 5, 3, 0)  # class index -> drawing below


def _polygon(u, v, sides, apothem):
    angles = 2 * np.pi * np.arange(sides) / sides
    return np.max([u * np.cos(a) + v * np.sin(a) for a in angles], axis=0) - apothem


def _signed_distance(label, u, v, r, phi, jitter):
    """Negative inside the shape, positive outside, in units of the shape's radius."""
    if label == 0:
        return r - 0.9
    if label == 1:
        return np.abs(r - 0.78) - 0.2
    if label == 2:
        return _polygon(u, v, 3, 0.5)
    if label == 3:
        return np.maximum(np.abs(u), np.abs(v)) - 0.72
    if label == 4:
        bar_a = np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.28)
        bar_b = np.maximum(np.abs(u) - 0.28, np.abs(v) - 1.0)
        return np.minimum(bar_a, bar_b)
    if label == 5:
        return r - (0.62 + 0.36 * np.cos(5 * phi))
    if label == 6:
        frequency = 5.0 + 2.0 * jitter
        return np.maximum(r - 1.0, -0.25 * np.sin(frequency * u))
    if label == 7:
        frequency = 4.0 + 1.5 * jitter
        checker = np.sin(frequency * u) * np.sin(frequency * v)
        return np.maximum(np.maximum(np.abs(u), np.abs(v)) - 0.85, -0.25 * checker)
    if label == 8:
        left = np.hypot(u + 0.5, v) - 0.4
        right = np.hypot(u - 0.5, v) - 0.4
        return np.minimum(left, right)
    if label == 9:
        return np.maximum(r - 0.95, 0.8 - np.hypot(u - 0.45, v))
    raise ValueError(f"label must be in [0, 9], received {label}")


def make_shapes(n: int, size=(32, 32), seed: int = 0, noise: float = 0.12,
                classes: int = len(CLASS_NAMES)):
    """Return (images uint8 of shape (n, H, W, 3), labels int64 of shape (n,)) drawn from
    the first `classes` classes of CLASS_NAMES, in equal numbers."""
    if not 2 <= classes <= len(CLASS_NAMES):
        raise ValueError(f"classes must be in [2, {len(CLASS_NAMES)}], received {classes}")
    rng = np.random.default_rng(seed)
    height, width = size
    labels = rng.permutation(np.arange(n) % classes)
    ys, xs = np.meshgrid(
        np.linspace(-1, 1, height, dtype=np.float32),
        np.linspace(-1, 1, width, dtype=np.float32),
        indexing="ij",
    )
    centre = rng.uniform(-0.3, 0.3, size=(2, n)).astype(np.float32)
    scale = rng.uniform(0.5, 0.85, size=n).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
    jitter = rng.uniform(-1, 1, size=n).astype(np.float32)

    dx = xs[None] - centre[0, :, None, None]
    dy = ys[None] - centre[1, :, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = (cos * dx + sin * dy) / scale[:, None, None]
    v = (-sin * dx + cos * dy) / scale[:, None, None]
    r, phi = np.hypot(u, v), np.arctan2(v, u)

    mask = np.empty((n, height, width), np.float32)
    for label in range(classes):
        idx = labels == label
        distance = _signed_distance(_SHAPE_OF_CLASS[label], u[idx], v[idx], r[idx], phi[idx], jitter[idx, None, None])
        # Anti-aliased edge: about one pixel wide whatever the shape's scale.
        edge = scale[idx, None, None] * min(height, width) / 2
        mask[idx] = np.clip(0.5 - distance * edge, 0.0, 1.0)

    foreground = rng.uniform(0, 1, size=(n, 3)).astype(np.float32)
    # A background at least 0.6 away from the foreground in RGB, so every shape is visible.
    direction = rng.normal(size=(n, 3)).astype(np.float32)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    background = np.clip(foreground + direction * rng.uniform(0.6, 1.0, size=(n, 1)), 0, 1)
    gradient = rng.uniform(-0.15, 0.15, size=(n, 2, 3)).astype(np.float32)
    back = (
        background[:, None, None, :]
        + xs[None, :, :, None] * gradient[:, None, None, 0, :]
        + ys[None, :, :, None] * gradient[:, None, None, 1, :]
    )
    image = back * (1 - mask[..., None]) + foreground[:, None, None, :] * mask[..., None]
    image += rng.normal(0, noise, size=image.shape).astype(np.float32)
    images = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def write_image_folder(root, train: int, test: int, size=(32, 32), seed: int = 0,
                       noise: float = 0.12, classes: int = len(CLASS_NAMES),
                       chunk: int = 2000) -> dict:
    """The shapes as a photo folder the way users keep theirs: `root/train/<class>/` and
    `root/test/<class>/` of PNG files, so that a split read in the folder's order is sorted
    by class (what tests and benchmarks of real users' data need; the demo's arrays are
    shuffled). Written `chunk` images at a time. Returns {split: images written}."""
    root = Path(root)
    counts = {}
    for split, n, split_seed in (("train", train, seed), ("test", test, seed + 1)):
        for name in CLASS_NAMES[:classes]:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for start in range(0, n, chunk):
            images, labels = make_shapes(min(chunk, n - start), size, (split_seed, start),
                                         noise, classes)
            for i, (image, label) in enumerate(zip(images, labels)):
                Image.fromarray(image).save(
                    root / split / CLASS_NAMES[label] / f"{start + i:07d}.png")
        counts[split] = n
    return counts
