"""Augmented views of the training set: random flips, crops and colour jitter, seeded.

A cache stores a fixed number of views, so each view must be the same images whoever
computes it: the random parameters of view v are drawn once for the whole split from a
generator seeded by (seed, v), and any subset of samples is augmented by indexing them.
A shard of samples 512..1023 on rank 3 and the recompute mode's batch 17 on a worker
therefore see exactly the pixels a single-process build would have cached. View 0 is the
training set itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AugmentSpec:
    views: int = 0  # augmented views besides the plain training set
    flip: bool = True  # random horizontal flips
    crop: int = 4  # pixels of zero padding on each side before a random crop back to size
    jitter: float = 0.1  # brightness and contrast change, as a fraction of the image's spread

    def to_dict(self) -> dict:
        return {"views": self.views, "flip": self.flip, "crop": self.crop, "jitter": self.jitter}


@dataclass(frozen=True)
class ViewParams:
    flip: np.ndarray  # bool per sample
    dy: np.ndarray  # crop offsets per sample, in [0, 2 * crop]
    dx: np.ndarray
    contrast: np.ndarray  # factor per sample around 1
    brightness: np.ndarray  # shift per sample, in units of the image's standard deviation


def view_params(spec: AugmentSpec, samples: int, seed: int, view: int) -> ViewParams:
    rng = np.random.default_rng([seed, view, 0x5EED])
    # Drawn in a fixed order for every sample, whether or not an option is on, so turning
    # one option off leaves the others' random values unchanged.
    flip = rng.random(samples) < 0.5
    dy = rng.integers(0, 2 * spec.crop + 1, samples)
    dx = rng.integers(0, 2 * spec.crop + 1, samples)
    contrast = 1.0 + rng.uniform(-spec.jitter, spec.jitter, samples)
    brightness = rng.uniform(-spec.jitter, spec.jitter, samples)
    return ViewParams(flip & spec.flip, dy, dx, contrast, brightness)


def augment(images: np.ndarray, params: ViewParams, indices, spec: AugmentSpec) -> np.ndarray:
    """View of `images` (the samples at `indices` of the split, NHWC float32)."""
    indices = np.asarray(indices)
    out = np.array(images, dtype=np.float32, copy=True)
    flip = params.flip[indices]
    out[flip] = out[flip, :, ::-1]
    if spec.crop:
        c = spec.crop
        height, width = out.shape[1:3]
        padded = np.pad(out, ((0, 0), (c, c), (c, c), (0, 0)))
        for row, (dy, dx) in enumerate(zip(params.dy[indices], params.dx[indices])):
            out[row] = padded[row, dy:dy + height, dx:dx + width]
    if spec.jitter:
        mean = out.mean(axis=(1, 2, 3), keepdims=True)
        spread = out.std(axis=(1, 2, 3), keepdims=True)
        contrast = params.contrast[indices][:, None, None, None].astype(np.float32)
        shift = params.brightness[indices][:, None, None, None].astype(np.float32)
        out = mean + contrast * (out - mean) + shift * spread
    return out


class Views:
    """The training images of every view, computed on demand for any slice of samples."""

    def __init__(self, x_train: np.ndarray, spec: AugmentSpec, seed: int):
        self.x, self.spec = x_train, spec
        self.params = [view_params(spec, len(x_train), seed, v) for v in range(1, spec.views + 1)]

    @property
    def count(self) -> int:
        return 1 + self.spec.views

    def images(self, view: int, indices) -> np.ndarray:
        if isinstance(indices, slice):
            indices = np.arange(len(self.x))[indices]
        if view == 0:
            return self.x[indices]
        return augment(self.x[indices], self.params[view - 1], indices, self.spec)
