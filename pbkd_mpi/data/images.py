"""The images of one split, read on demand: memory grows with the batch, not the data set.

`Images` behaves like a read-only float32 array of shape (N, H, W, C) where it matters:
`len`, `.shape`, `[a:b]` (a lazy view, as NumPy slicing is a view) and `[index array]` (the
pixels, scaled, as a float32 NumPy array). Behind it is a source of raw pixels:

- `ArraySource`: an array already in memory (the demo, an .npz archive: NumPy cannot map a
  member of a zip archive), or an HDF5 dataset, read by slices and sorted row lists.
- `FileSource`: image files, decoded and resized when read, with the same TensorFlow calls
  as `keras.utils.image_dataset_from_directory` (decode_image, then a bilinear
  tf.image.resize to the job's image_size, float32), so a teacher trained on such a data
  set sees the pixels it was trained on.

The job's `data.scale` is applied as the pixels are read; `SCALES` holds the modes,
including keras.applications' `caffe`, `torch` and `tf` (imagenet_utils.preprocess_input).
"""

from __future__ import annotations

import h5py
import numpy as np

from pbkd_mpi.errors import UserError

# keras.applications.imagenet_utils: ImageNet's channel means (RGB) and standard deviations.
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
DECODE_PARALLEL = 8  # images decoded at once in one batch read (TensorFlow's inter-op pool)


def _caffe(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] != 3:
        raise UserError(f"data.scale = \"caffe\" needs RGB images (3 channels), received "
                        f"{x.shape[-1]} channel(s).")
    return x.astype(np.float32)[..., ::-1] - _CAFFE_MEAN_BGR


def _torch(x: np.ndarray) -> np.ndarray:
    if x.shape[-1] != 3:
        raise UserError(f"data.scale = \"torch\" needs RGB images (3 channels), received "
                        f"{x.shape[-1]} channel(s).")
    return (x.astype(np.float32) / 255.0 - _TORCH_MEAN) / _TORCH_STD


SCALES = {
    "unit": lambda x: x.astype(np.float32) / 255.0,
    "symmetric": lambda x: x.astype(np.float32) / 127.5 - 1.0,
    "tf": lambda x: x.astype(np.float32) / 127.5 - 1.0,  # keras.applications' name for it
    "caffe": _caffe,
    "torch": _torch,
    "none": lambda x: x.astype(np.float32),
}


class ArraySource:
    """Raw pixels in an array: a NumPy array, or an h5py dataset read a slice or a sorted
    row list at a time (what HDF5 reads fast)."""

    def __init__(self, array, sample_ndim: int = 3):
        # A sample is (H, W, C), or (steps, channels) for sequences; an array one axis
        # short has no channel axis (grey images, one-channel signals) and gets one.
        self.array, self.sample_ndim = array, sample_ndim
        self.image_shape = (tuple(array.shape[1:]) if array.ndim == sample_ndim + 1
                            else (*array.shape[1:], 1))

    def __len__(self) -> int:
        return len(self.array)

    @property
    def in_memory(self) -> bool:
        return isinstance(self.array, np.ndarray)

    def __getstate__(self):
        """An HDF5 dataset travels as its file and name (reopened where it lands)."""
        if self.in_memory:
            return self.__dict__
        return {"file": self.array.file.filename, "name": self.array.name,
                "image_shape": self.image_shape, "sample_ndim": self.sample_ndim}

    def __setstate__(self, state):
        if "array" in state:
            self.__dict__.update(state)
            return
        self.array = h5py.File(state["file"], "r")[state["name"]]
        self.image_shape, self.sample_ndim = state["image_shape"], state["sample_ndim"]

    def read(self, rows: np.ndarray) -> np.ndarray:
        if self.in_memory:
            out = self.array[rows]
        elif len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
            out = self.array[int(rows[0]):int(rows[-1]) + 1]  # contiguous: one hyperslab
        else:
            order = np.argsort(rows, kind="stable")
            out = np.empty((len(rows), *self.array.shape[1:]), self.array.dtype)
            if len(rows):
                out[order] = self.array[rows[order]]
        return out if out.ndim == self.sample_ndim + 1 else out[..., None]


class FileSource:
    """Image files decoded and resized on read, as keras.utils.image_dataset_from_directory
    does (RGB, bilinear, no crop)."""

    def __init__(self, paths, image_size):
        self.paths = np.asarray(paths, dtype=object)
        self.size = tuple(int(s) for s in image_size)
        self.image_shape = (*self.size, 3)
        self.in_memory = False
        self._decode = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self):
        return {**self.__dict__, "_decode": None}  # a tf.function does not travel

    def _decoder(self):
        if self._decode is None:
            import tensorflow as tf

            size = self.size

            def load(path):
                image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                                           expand_animations=False)
                return tf.image.resize(image, size, method="bilinear")

            self._decode = tf.function(
                lambda paths: tf.map_fn(load, paths, fn_output_signature=tf.float32,
                                        parallel_iterations=DECODE_PARALLEL),
                input_signature=[tf.TensorSpec([None], tf.string)])
        return self._decode

    def read(self, rows: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        paths = [str(p) for p in self.paths[rows]]
        if not paths:
            return np.zeros((0, *self.image_shape), np.float32)
        try:
            return self._decoder()(tf.constant(paths)).numpy()
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
            for path in paths:  # which one: decode them one by one
                try:
                    self._decoder()(tf.constant([path]))
                except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as exc:
                    raise UserError(
                        f"Cannot read the image {path!r}: {exc.message.splitlines()[0]}. "
                        f"Remove or replace it; files that are not images at all are left "
                        f"out when data.bad_images = \"skip\", but a file that is "
                        f"damaged inside is found only when it is read.") from None
            raise


class Images:
    """N images of one split (rows of a source), scaled as read; see the module's doc."""

    def __init__(self, source, rows: np.ndarray | None = None, scale: str = "none"):
        self.source, self.scale = source, scale
        self.rows = np.arange(len(source)) if rows is None else np.asarray(rows, np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple:
        return (len(self.rows), *self.source.image_shape)

    @property
    def in_memory(self) -> bool:
        return self.source.in_memory

    def __getitem__(self, key):
        if isinstance(key, slice):
            return Images(self.source, self.rows[key], self.scale)
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        rows = self.rows[np.asarray(key)]
        return SCALES[self.scale](self.source.read(rows))

    def __array__(self, dtype=None, copy=None):
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype, copy=False)


def read_images(x, index) -> np.ndarray:
    """`x[index]` as float32 NumPy, for `Images` and plain arrays alike."""
    return np.asarray(x[index], dtype=np.float32)


def image_batches(x, batch_size: int):
    """Consecutive float32 batches of every image of `x`, in order."""
    for start in range(0, len(x), batch_size):
        yield np.asarray(x[start:min(start + batch_size, len(x))], dtype=np.float32)


def sample_rows(total: int, count: int, seed: int = 0) -> np.ndarray:
    """`count` (at most `total`) distinct row indices drawn at random with `seed`, in
    random order. Every sample of a split is taken this way, never as its first rows: an
    image folder's split keeps its class folders' order, so the first 2,000 of 20,000
    photos were 1,817 of one class and 183 of the next."""
    rng = np.random.default_rng(seed)
    if count >= total:
        return rng.permutation(total)
    return rng.choice(total, size=count, replace=False)


def sample_images(x, count: int, seed: int = 0) -> np.ndarray:
    """A seeded random sample of `count` images of `x` as one float32 array (sample_rows),
    read in row order (what HDF5 and image files read fastest)."""
    return read_images(x, np.sort(sample_rows(len(x), count, seed)))


def sample_batches(x, batch_size: int, count: int, seed: int = 0):
    """float32 batches of a seeded random sample of `count` images of `x`, each batch a
    random mix of the whole split (statistics averaged over batches, as BN re-estimation's
    are, are then those of the split, not of one class per batch)."""
    rows = sample_rows(len(x), count, seed)
    for start in range(0, len(rows), batch_size):
        yield read_images(x, np.sort(rows[start:start + batch_size]))


def keras_batches(x, y: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0):
    """What Keras' fit and evaluate take: `(x, y)` as arrays when the pixels are in memory
    (unchanged behaviour), else `(PyDataset, None)` reading one batch at a time, shuffled
    each epoch (with sorted rows inside a batch: the fast way to read HDF5)."""
    if getattr(x, "in_memory", True):
        return np.asarray(x, np.float32), y
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self.order = self._order()

        def _order(self):
            if not shuffle:
                return np.arange(len(y))
            return np.random.default_rng([seed, self.epoch]).permutation(len(y))

        def __len__(self):
            return -(-len(y) // batch_size)

        def __getitem__(self, index):
            rows = np.sort(self.order[index * batch_size:(index + 1) * batch_size])
            return read_images(x, rows), y[rows]

        def on_epoch_end(self):
            self.epoch += 1
            self.order = self._order()

    return Batches(), None
