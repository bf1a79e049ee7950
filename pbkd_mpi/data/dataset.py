"""Data sets: the demo generator, image folders, .npz and HDF5 files; splits; preprocessing.

Images are `data/images.Images` (NHWC float32, read on demand), labels integer arrays in
memory. Image folders are an index of files, decoded batch by batch as they are read; HDF5
files are read by slices; the demo and .npz archives are held in memory (NumPy cannot map
a member of a zip archive: convert a large one to HDF5). The validation split is carved
from the training data with the job's seed unless the data set brings its own (a list of
rows, no copy), and the test split is kept apart for the final figures only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, UnidentifiedImageError

from pbkd_mpi.config import DataConfig
from pbkd_mpi.data.demo import make_shapes
from pbkd_mpi.data.images import SCALES, ArraySource, FileSource, Images
from pbkd_mpi.errors import UserError
from pbkd_mpi.keys import arrays_fingerprint, json_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
_TEST_FIELDS = frozenset({"x_test", "y_test"})
_SPLITS = ("train", "val", "test")
# Data sets rank 0 indexed and sent to the workers (WorkerContext.data_index), by
# fingerprint: a worker opens these instead of listing and checking every file again.
_RECEIVED: dict[str, "Dataset"] = {}


@dataclass(frozen=True)
class Dataset:
    x_train: Images
    y_train: np.ndarray
    x_val: Images
    y_val: np.ndarray
    x_test: Images
    y_test: np.ndarray
    num_classes: int
    source: str
    skipped_images: tuple[str, ...] = ()  # unreadable image files left out (data.bad_images)
    # Validation carved out of the training split (no val/ folder, no x_val): a user's
    # teacher has learned from it (model/evaluate.validation_warning).
    val_from_train: bool = False
    # Every read of x_test / y_test, in order: the test split is for the final figures only,
    # and the pipeline refuses to evaluate if anything read it before (honest selection).
    _test_reads: list = field(default_factory=list, init=False, repr=False, compare=False)
    # The data never changes, so its hash is computed once: for files it stats every one.
    _fingerprint: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __getattribute__(self, name):
        if name in _TEST_FIELDS:
            object.__getattribute__(self, "_test_reads").append(name)
        return object.__getattribute__(self, name)

    @property
    def test_reads(self) -> int:
        """How many times x_test or y_test was read (test_split() counts once)."""
        return len(object.__getattribute__(self, "_test_reads"))

    def test_split(self) -> tuple[Images, np.ndarray]:
        """(x_test, y_test) for the final evaluation: one counted read."""
        self._test_reads.append("test_split")
        return self.uncounted("x_test"), self.uncounted("y_test")

    def uncounted(self, name: str) -> np.ndarray:
        """A split's array without counting a test read: for hashing, sizes and label-range
        checks, which select nothing."""
        return object.__getattribute__(self, name)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def fingerprint(self) -> str:
        """Hash of the data: a cache or a teacher made from other data never matches. In
        memory, every array's values; read from files, what names the pixels (paths,
        sizes, modification times, rows, image size and scale) without reading them."""
        if not self._fingerprint:
            self._fingerprint.append(self._compute_fingerprint())
        return self._fingerprint[0]

    def _compute_fingerprint(self) -> str:
        images = [self.uncounted(f"x_{split}") for split in _SPLITS]
        if all(x.in_memory for x in images):
            return arrays_fingerprint((name, np.asarray(self.uncounted(name))) for name in
                                      ("x_train", "y_train", "x_val", "y_val", "x_test",
                                       "y_test"))
        labels = arrays_fingerprint((f"y_{split}", self.uncounted(f"y_{split}"))
                                    for split in _SPLITS)
        return json_key({"labels": labels, "images": [_describe(x) for x in images]})

    def summary(self) -> dict:
        return {
            "source": self.source,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "train": len(self.y_train),
            "val": len(self.y_val),
            "test": len(self.uncounted("y_test")),
            "skipped_images": len(self.skipped_images),
            "val_from_train": self.val_from_train,
        }


def load_dataset(config: DataConfig, seed: int) -> Dataset:
    if config.source == "demo":
        raw = _load_demo(config, seed)
    else:
        path = Path(config.source)
        if not path.exists():
            raise UserError(
                f"data.source {config.source!r} does not exist. Expected 'demo', a directory "
                f"of images in class subfolders, an .npz file or an HDF5 file."
            )
        if path.is_dir():
            raw = _load_image_folder(path, config.image_size, config.bad_images == "skip")
        elif path.suffix == ".npz":
            raw = _load_npz(path)
        elif path.suffix in (".h5", ".hdf5"):
            raw = _load_hdf5(path)
        else:
            raise UserError(
                f"data.source {config.source!r} has an unknown format. Expected a directory, "
                f"an .npz file or an .h5/.hdf5 file."
            )
    return _finish(raw, config, seed)


def portable_index(dataset: Dataset) -> Dataset | None:
    """The data set as rank 0 sends it to the workers: for images read from files, its
    index (paths or HDF5 dataset, labels, the rows of every split, the fingerprint) without
    a pixel; None when the images are held in memory (each rank loads those itself, as a
    copy pickled on rank 0 would double them there)."""
    if any(dataset.uncounted(f"x_{split}").in_memory for split in _SPLITS):
        return None
    dataset.fingerprint()  # computed once here (it stats every file), then travels along
    return dataset


def receive_index(dataset: Dataset | None) -> None:
    """A worker keeps the index rank 0 sent (`portable_index`), for `load_checked`."""
    if dataset is not None:
        _RECEIVED[dataset.fingerprint()] = dataset


def load_checked(config: DataConfig, seed: int, fingerprint: str) -> Dataset:
    """On a worker: rank 0's data set, opened from the index rank 0 sent, or else loaded
    here and checked against rank 0's fingerprint, so that every rank reads the same
    pixels in the same splits."""
    if fingerprint in _RECEIVED:
        return _RECEIVED[fingerprint]
    dataset = load_dataset(config, seed)
    if dataset.fingerprint() != fingerprint:
        raise UserError(f"The data set loaded on this rank has fingerprint "
                        f"{dataset.fingerprint()}, expected {fingerprint} (rank 0's).")
    return dataset


def _load_demo(config: DataConfig, seed: int) -> dict:
    size = tuple(config.image_size)
    options = {"noise": config.demo_noise, "classes": config.demo_classes}
    x_train, y_train = make_shapes(config.demo_train, size, seed=2 * seed, **options)
    x_test, y_test = make_shapes(config.demo_test, size, seed=2 * seed + 1, **options)
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "num_classes": config.demo_classes,
        "source": "demo",
    }


def _load_npz(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"Cannot read {str(path)!r} as an .npz archive: {exc}.") from None
    return _named_arrays(arrays, str(path))


def _load_hdf5(path: Path) -> dict:
    """Labels into memory; images stay in the file, read by slices (the file stays open)."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"Cannot read {str(path)!r} as an HDF5 file: {exc}.") from None
    arrays = {name: f[name] if name.startswith("x_") else f[name][()]
              for name in f.keys() if isinstance(f[name], h5py.Dataset)}
    return _named_arrays(arrays, str(path))


def _named_arrays(arrays: dict, source: str) -> dict:
    required = ("x_train", "y_train", "x_test", "y_test")
    missing = [name for name in required if name not in arrays]
    if missing:
        raise UserError(
            f"{source!r} must hold arrays named {', '.join(required)} (and optionally x_val, "
            f"y_val); missing: {', '.join(missing)}; found: {', '.join(sorted(arrays)) or 'none'}."
        )
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise UserError(f"{source!r} must hold both x_val and y_val, or neither.")
    raw = {name: arrays[name] for name in (*required, "x_val", "y_val") if name in arrays}
    raw["source"] = source
    return raw


def _load_image_folder(path: Path, image_size, skip_bad: bool) -> dict:
    """Class subfolders of images, like keras.utils.image_dataset_from_directory.

    A `train` and a `test` subfolder (and optionally `val`) each with class subfolders are
    the splits; otherwise the folder's class subfolders are the training data and a test
    split is carved off with the validation split.
    """
    splits = {name: path / name for name in ("train", "val", "test") if (path / name).is_dir()}
    skipped: list[str] = []
    if "train" in splits and "test" in splits:
        class_names = _class_names(splits["train"])
        raw = {}
        for split, folder in splits.items():
            raw[f"x_{split}"], raw[f"y_{split}"] = _read_images(folder, class_names, image_size,
                                                                skip_bad, skipped)
    else:
        class_names = _class_names(path)
        x, y = _read_images(path, class_names, image_size, skip_bad, skipped)
        raw = {"x_train": x, "y_train": y}
    raw["num_classes"] = len(class_names)
    raw["source"] = str(path)
    raw["class_names"] = class_names
    raw["skipped_images"] = skipped
    return raw


def _class_names(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise UserError(
            f"The image folder {str(folder)!r} must hold one subfolder per class (at least 2), "
            f"found {len(names)}."
        )
    return names


def _read_images(folder: Path, class_names, image_size, skip_bad: bool, skipped: list):
    """The folder's image files (sorted, as Keras lists them) and their labels, checked by
    their headers only: the pixels are decoded when they are read (data/images.py)."""
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        if not class_dir.is_dir():
            raise UserError(f"{str(folder)!r} has no subfolder for class {name!r}.")
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as image:  # reads the header, not the pixels
                    image.size
            except (OSError, UnidentifiedImageError) as exc:
                if skip_bad:
                    skipped.append(str(file))
                    continue
                raise UserError(
                    f"Cannot read the image {str(file)!r}: {exc}. Set data.bad_images = "
                    f"\"skip\" to leave unreadable images out (they are counted in the report)."
                ) from None
            paths.append(str(file))
            labels.append(label)
    if not paths:
        raise UserError(
            f"The image folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})."
        )
    return FileSource(paths, image_size), np.asarray(labels, np.int64)


def _finish(raw: dict, config: DataConfig, seed: int) -> Dataset:
    source = raw["source"]
    arrays = {}
    for split in ("train", "val", "test"):
        if f"x_{split}" not in raw:
            continue
        arrays[split] = _check_split(raw[f"x_{split}"], np.asarray(raw[f"y_{split}"]), split,
                                     source, config)
    num_classes = raw.get("num_classes") or int(
        max(arrays[s][1].max() for s in arrays) + 1
    )
    if num_classes < 2:
        raise UserError(f"{source!r} has labels of only one class; classification needs two.")
    expected = tuple(config.image_size)
    for split, (x, _) in arrays.items():
        if config.kind == "images" and x.shape[1:3] != expected:
            raise UserError(
                f"The {split} images of {source!r} are {x.shape[1]}x{x.shape[2]}, but "
                f"data.image_size is {expected[0]}x{expected[1]}. Set data.image_size to the "
                f"images' size (or resize the data)."
            )
    if "test" not in arrays:  # an image folder without a test subfolder
        arrays["train"], arrays["test"] = _carve(*arrays["train"], config.val_fraction, seed + 1)
    val_from_train = "val" not in arrays
    if val_from_train:
        arrays["train"], arrays["val"] = _carve(*arrays["train"], config.val_fraction, seed)
    return Dataset(*arrays["train"], *arrays["val"], *arrays["test"], num_classes, source,
                   tuple(raw.get("skipped_images", ())), val_from_train)


def _check_split(x, y, split, source, config: DataConfig):
    """(Images, labels) of one split. Pixels in memory are scaled once, here, and checked
    for NaN; pixels read from files are scaled as they are read. Sequences are used as
    stored."""
    images_kind = config.kind == "images"
    scale = config.scale if images_kind else "none"
    if isinstance(x, FileSource):
        images = Images(x, scale=scale)
    else:
        sample_ndim = 3 if images_kind else 2
        if x.ndim not in (sample_ndim, sample_ndim + 1):
            expected = ("images of shape (N, H, W, C)" if images_kind
                        else "sequences of shape (N, steps, channels)")
            raise UserError(f"x_{split} of {source!r} must be {expected} (data.kind = "
                            f"{config.kind!r}), received shape {x.shape}.")
        if isinstance(x, np.ndarray):
            x = SCALES[scale](x if x.ndim == sample_ndim + 1 else x[..., None])
            if not np.isfinite(x).all():
                raise UserError(f"x_{split} of {source!r} holds NaN or Inf values.")
            images = Images(ArraySource(x, sample_ndim))
        else:  # an HDF5 dataset
            images = Images(ArraySource(x, sample_ndim), scale=scale)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != len(images):
        raise UserError(
            f"y_{split} of {source!r} must be {len(images)} integer labels, received shape "
            f"{y.shape}."
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"y_{split} of {source!r} must hold integers, received {y.dtype}.")
    if len(y) and y.min() < 0:
        raise UserError(f"y_{split} of {source!r} holds negative labels (min {y.min()}).")
    return images, y.astype(np.int64)


def _carve(x: Images, y, fraction, seed):
    count = int(round(len(y) * fraction))
    if count < 1 or count >= len(y):
        raise UserError(
            f"data.val_fraction {fraction} leaves no validation or no training samples "
            f"out of {len(y)}; raise it, or give x_val/y_val."
        )
    order = np.random.default_rng(seed).permutation(len(y))
    train, val = np.sort(order[count:]), np.sort(order[:count])
    return (_rows(x, train), y[train]), (_rows(x, val), y[val])


def _rows(x: Images, index: np.ndarray) -> Images:
    return Images(x.source, x.rows[index], x.scale)


def _describe(x: Images) -> dict:
    """What names the pixels of a split read from files (for the fingerprint)."""
    source = x.source
    if isinstance(source, FileSource):
        files = [Path(p).stat() for p in source.paths]
        named = {"paths": [str(p) for p in source.paths], "size": list(source.size),
                 "bytes": [f.st_size for f in files], "mtime": [f.st_mtime_ns for f in files]}
    else:
        array = source.array
        stat = Path(array.file.filename).stat()
        named = {"file": array.file.filename, "dataset": array.name, "bytes": stat.st_size,
                 "mtime": stat.st_mtime_ns, "shape": list(array.shape), "dtype": str(array.dtype)}
    return {**named, "rows": json_key(x.rows.tolist()), "scale": x.scale}
