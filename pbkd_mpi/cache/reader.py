"""(input, target) batches for one block task: from the activation cache, or recomputed.

From the cache (`CachedPairs`): a block's arrays are loaded into RAM, as stored, when they
fit the memory budget (`cache.memory_budget_mb`), and shuffled whole; otherwise they are
streamed: the samples are cut into read units of about a chunk, the units are visited in a
random order, a window of units is read (each a contiguous slice, the fast way to read
HDF5) and shuffled within the window. Either way every sample comes exactly once per epoch,
a window at a time. For Keras (`dataset`), Python reads or gathers a window; TensorFlow
shuffles it, converts it to float32 and cuts it into batches, in C without the GIL. Nothing
is widened ahead: held float32 copies (and tf.data capturing them) took 2.4 times the
float16 bytes of a block in RAM (demo conv1: 1.5 GB for 0.3 GB of pairs). tf.data's
prefetch thread reads the next window while the block trains; `next_epoch` run by hand
reads in a background thread of its own.
tf.data's autotuning is off in every dataset made here (`without_autotune`).

Recomputed (`RecomputedPairs`, `cache.mode = "recompute"`): each batch of images goes
through the teacher up to the block's output, as the method's original implementation did;
nothing is stored.

Training cycles through the training set's views: epoch e reads view e mod (1 + views).
"""

from __future__ import annotations

import functools
from pathlib import Path
import queue
import threading
from dataclasses import dataclass, field

import h5py
import numpy as np

from pbkd_mpi.cache.layout import part_names, require_complete
from pbkd_mpi.config import DataConfig
from pbkd_mpi.data.augment import AugmentSpec, Views
from pbkd_mpi.data.dataset import load_checked
from pbkd_mpi.errors import UserError
from pbkd_mpi.keys import model_fingerprint
from pbkd_mpi.model.graph import boundary_tensor, flatten_model
from pbkd_mpi.model.teacher import load_model_file

PREFETCH_BATCHES = 4
READ_BYTES = 1 << 20  # a read unit: about one chunk of the input and one of the target
WINDOW_UNITS = 16  # units shuffled together: 16 random places of the split per window
EVAL_BATCH = 256


@dataclass(frozen=True)
class DataSource:
    """Where a block task's pairs come from; travels with the task to the worker."""

    mode: str = "cache"  # "cache" or "recompute"
    memory_budget_bytes: int = 2 << 30
    views: int = 0  # augmented views of the training set besides the plain one
    seed: int = 0  # the run's seed: the views' random draws (recompute mode)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    # recompute mode: the teacher file and the data, each checked against rank 0's hash
    teacher_file: str = ""
    teacher_fingerprint: str = ""
    data: DataConfig | None = None
    data_fingerprint: str = ""


def _prefetched(produce, depth: int = PREFETCH_BATCHES):
    """Run the generator function `produce` in a background thread, `depth` items ahead.
    Leaving the loop early (an exception in training) stops the thread."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(item) -> bool:
        """Put `item` when there is room; False once the consumer has left (a plain put
        into a full queue nobody reads would block this thread, and the consumer's join,
        forever)."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in produce():
                if not offer(item):
                    return
            offer(done)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            offer(exc)

    thread = threading.Thread(target=run, name="pbkd-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def without_autotune(dataset):
    """`dataset` with tf.data's autotuning off. Its optimisation thread wakes up 10 ms,
    20 ms, 40 ms, ... after an iterator starts (each wait twice the last, up to 60 s), and
    destroying the iterator waits for that thread: Keras drops an iterator at the end of
    every epoch (and of every validation pass), from the main thread, holding the GIL, so
    an epoch stretched to the next wake-up, 10 ms x (2^k - 1) after its iterator began
    (2.56, 5.12, 10.24 s; docs/cache.md). Our pipelines have nothing to tune: fixed
    prefetch depths, one element in flight, one core."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def window_plan(samples: int, unit_rows: int, window_units: int, rng) -> list[list[slice]]:
    """An epoch's reads: contiguous units of `unit_rows` samples in a random order, grouped
    into windows whose samples are shuffled together."""
    units = [slice(s, min(s + unit_rows, samples)) for s in range(0, samples, unit_rows)]
    order = rng.permutation(len(units))
    return [[units[i] for i in order[w:w + window_units]]
            for w in range(0, len(order), window_units)]


class PairSource:
    """Epochs of (input, target) float32 batches; subclasses say how a part is read."""

    def __init__(self, parts, batch_size: int, seed: int, shuffle: bool, epoch: int = 0,
                 poison: bool = False):
        self.parts, self.batch_size, self.seed = list(parts), batch_size, seed
        self.shuffle, self.epoch, self.poison = shuffle, epoch, poison

    def part_for(self, epoch: int) -> str:
        return self.parts[epoch % len(self.parts)]

    def epoch_batches(self, epoch: int):
        """The batches of one epoch, computed in this thread."""
        rng = np.random.default_rng([self.seed, epoch])
        pending_x, pending_y, held = [], [], 0
        for x, y in self._pieces(self.part_for(epoch), rng):
            pending_x.append(x)
            pending_y.append(y)
            held += len(x)
            while held >= self.batch_size:
                xs, ys = np.concatenate(pending_x), np.concatenate(pending_y)
                yield self._finish(xs[:self.batch_size], ys[:self.batch_size])
                pending_x, pending_y = [xs[self.batch_size:]], [ys[self.batch_size:]]
                held -= self.batch_size
        if held:
            yield self._finish(np.concatenate(pending_x), np.concatenate(pending_y))

    def _finish(self, x, y):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        return self._poisoned(x), y

    def _poisoned(self, x):
        if self.poison:  # PBKD_FAULT nan: a NaN in every piece, so in every batch's reach
            x = x.copy()
            x[0] = np.nan
        return x

    def next_epoch(self, background: bool = True):
        """This source's next epoch as pieces of many samples in training order, prepared by
        a background thread of its own unless `background` is False (a caller that runs
        this in its own thread already)."""
        def pieces():
            for x, y in self._advancing(self._pieces):
                yield self._poisoned(x), y

        yield from (_prefetched(pieces) if background else pieces())

    def _advancing(self, produce):
        """`produce(part, rng)` for the current epoch; the epoch counter moves on once the
        epoch has been read to the end (Keras reads one per epoch)."""
        epoch = self.epoch
        yield from produce(self.part_for(epoch), np.random.default_rng([self.seed, epoch]))
        self.epoch = epoch + 1

    def sample(self, count: int) -> np.ndarray:
        """`count` inputs of the first part, a seeded random sample in this source's own
        shuffled order (for calibration: the cached split keeps the data's order, which in
        an image folder is by class)."""
        x, _ = next(iter(_Sample(self, count).epoch_batches(0)))
        return x

    def dataset(self):
        """A tf.data.Dataset of float32 batches over this source, one epoch per iteration
        (for Keras). Python hands over whole pieces, TensorFlow cuts them into batches."""
        import tensorflow as tf

        x_shape, y_shape = self.shapes()
        # tf.data's prefetch thread runs the generator while the block trains: a second
        # Python thread of ours would make the two fight for the GIL.
        pieces = tf.data.Dataset.from_generator(
            lambda: self.next_epoch(background=False),
            output_signature=(tf.TensorSpec((None, *x_shape), tf.float32),
                              tf.TensorSpec((None, *y_shape), tf.float32)))
        return self._for_keras(pieces.rebatch(self.batch_size))

    def _for_keras(self, batches):
        """One epoch of `batches` as Keras gets it: prefetched, with tf.data's autotuning
        off, and its length known, so that Keras counts steps from the first epoch on."""
        import tensorflow as tf

        count = -(-self.samples_per_epoch() // self.batch_size)
        return without_autotune(batches.prefetch(PREFETCH_BATCHES)
                                .apply(tf.data.experimental.assert_cardinality(count)))

    def target_variance(self) -> float:
        """Variance of every target value of the first part (float64 sums)."""
        total = squares = 0.0
        count = 0
        for _, y in self.epoch_batches(0):
            y = y.astype(np.float64)
            total, squares, count = total + y.sum(), squares + (y * y).sum(), count + y.size
        mean = total / max(count, 1)
        return float(squares / max(count, 1) - mean * mean)

    def samples_per_epoch(self) -> int:
        """Samples in one epoch (every part has as many: views of the same split)."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of what this source holds. tf.data never frees the generator a
        from_generator dataset was made with (the eager context keeps the dataset's
        functions), so a source is only freed by dropping its contents."""

    def _pieces(self, part: str, rng):
        raise NotImplementedError

    def shapes(self) -> tuple[tuple, tuple]:
        raise NotImplementedError


class _Sample(PairSource):
    """The first samples of a shuffled source's first part (its epoch 0 order, seeded),
    in one batch."""

    def __init__(self, source: PairSource, count: int):
        if not source.shuffle:
            raise ValueError("a sample is drawn from a shuffled source; received one that "
                             "reads in order")
        super().__init__(source.parts[:1], count, 0, shuffle=False, poison=source.poison)
        self.source = source
        self.count = count

    def _pieces(self, part, rng):
        taken = 0
        for x, y in self.source._pieces(part, np.random.default_rng([self.source.seed, 0])):
            yield x[:self.count - taken], y[:self.count - taken]
            taken += len(x)
            if taken >= self.count:
                return


class CacheStore:
    """One block's two arrays in the stitched cache file, for every part it reads; in RAM
    when they all fit the memory budget, else read from the file as needed.

    `input_path`: read the inputs from this HDF5 file instead (a group per part, a dataset
    named `input_name`, attribute `fingerprint` equal to `input_fingerprint`): the chained
    pass's student activations (distill/chain.py); the targets still come from the cache."""

    def __init__(self, path, fingerprint: str, parts, input_name: str, output_name: str,
                 memory_budget_bytes: int = 2 << 30, input_path: str = "",
                 input_fingerprint: str = ""):
        require_complete(path, fingerprint)
        self.names = (input_name, output_name)
        self.paths = (str(input_path or path), str(path))
        if input_path:
            _check_inputs(input_path, input_fingerprint, parts, input_name)
        with h5py.File(self.paths[0], "r") as fx, h5py.File(self.paths[1], "r") as fy:
            x, y = fx[parts[0]][input_name], fy[parts[0]][output_name]
            self.shapes = (x.shape[1:], y.shape[1:])
            self.dtype = x.dtype.name
            sample_bytes = x.dtype.itemsize * (int(np.prod(x.shape[1:]))
                                               + int(np.prod(y.shape[1:])))
            self.samples = {part: fy[part][output_name].shape[0] for part in parts}
            for part in parts:
                if fx[part][input_name].shape[0] != self.samples[part] or \
                        fx[part][input_name].dtype != fy[part][output_name].dtype:
                    raise UserError(
                        f"The inputs in {self.paths[0]!r} ({part}: "
                        f"{fx[part][input_name].shape} {fx[part][input_name].dtype}) do not "
                        f"match the targets' samples and dtype ({fy[part][output_name].shape} "
                        f"{fy[part][output_name].dtype}).")
        self.bytes = sample_bytes * sum(self.samples.values())
        # In RAM as stored (float16 by default): TensorFlow widens each window to float32
        # while it gathers it, so the budget buys twice the samples it would widened.
        self.in_memory = self.bytes <= memory_budget_bytes
        # A read unit of about READ_BYTES per array: whole chunks, few calls into HDF5.
        self.unit_rows = max(1, READ_BYTES // max(1, sample_bytes // 2))
        self._arrays: dict[str, tuple] = {}
        self._files: dict[str, h5py.File] = {}
        self._lock = threading.Lock()

    @property
    def path(self) -> str:
        return self.paths[1]

    def arrays(self, part: str) -> tuple:
        """The part's two arrays in RAM as NumPy arrays (the file's dtype), loaded once."""
        with self._lock:
            if part not in self._arrays:
                self._arrays[part] = tuple(_read_whole(path, part, name)
                                           for path, name in zip(self.paths, self.names))
            return self._arrays[part]

    def datasets(self, part: str) -> tuple:
        with self._lock:
            for path in self.paths:
                if path not in self._files:
                    self._files[path] = h5py.File(path, "r")
            return tuple(self._files[path][part][name]
                         for path, name in zip(self.paths, self.names))

    def close(self) -> None:
        """Close the files and drop the arrays held in RAM; reading again reopens them."""
        with self._lock:
            for handle in self._files.values():
                handle.close()
            self._files.clear()
            self._arrays.clear()


def _read_whole(path: str, part: str, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[part][name][()]


def _check_inputs(path, fingerprint: str, parts, name: str) -> None:
    try:
        with h5py.File(path, "r") as f:
            found = f.attrs.get("fingerprint")
            missing = [part for part in parts if part not in f or name not in f[part]]
    except OSError as exc:
        raise UserError(f"Cannot read the chained inputs {str(path)!r}: {exc}.") from None
    if found != fingerprint or missing:
        raise UserError(f"The chained inputs {str(path)!r} hold fingerprint {found!r} and lack "
                        f"{missing or 'nothing'}; expected fingerprint {fingerprint!r} and "
                        f"{name!r} in {list(parts)}.")


class CachedPairs(PairSource):
    """A block's pairs of some parts of the cache, whole-shuffled in RAM or streamed."""

    def __init__(self, store: CacheStore, parts, batch_size: int, seed: int = 0,
                 shuffle: bool = True, epoch: int = 0, poison: bool = False,
                 window_units: int = WINDOW_UNITS):
        super().__init__(parts, batch_size, seed, shuffle, epoch, poison)
        self.store, self.window_units = store, window_units

    def shapes(self):
        return self.store.shapes

    def close(self) -> None:
        self.store.close()

    def samples_per_epoch(self) -> int:
        return self.store.samples[self.parts[0]]

    def dataset(self):
        """A tf.data.Dataset of float32 batches, one epoch per iteration (for Keras), in
        next_epoch's order. Python reads or gathers each window (in tf.data's prefetch
        thread, while the block trains); TensorFlow shuffles, converts and cuts it into
        batches, one call per window: those copies run in C without the GIL."""
        import tensorflow as tf

        data = self._window_dataset()
        if self.poison:  # PBKD_FAULT nan: a NaN in every batch
            data = data.map(lambda x, y: (tf.tensor_scatter_nd_update(
                x, [[0]], tf.fill([1, *self.shapes()[0]], float("nan"))), y))
        return self._for_keras(data)

    def _window_dataset(self):
        import tensorflow as tf

        x_shape, y_shape = self.shapes()
        dtype = tf.as_dtype(self.store.dtype)
        windows = tf.data.Dataset.from_generator(
            lambda: self._advancing(self._shuffled_windows),
            output_signature=(tf.TensorSpec((None, *x_shape), dtype),
                              tf.TensorSpec((None, *y_shape), dtype),
                              tf.TensorSpec((None,), tf.int64)))
        # rebatch carries a window's last samples into the next batch: every batch full.
        return windows.map(lambda x, y, order: (
            tf.cast(tf.gather(x, order), tf.float32),
            tf.cast(tf.gather(y, order), tf.float32))).rebatch(self.batch_size)

    def _shuffled_windows(self, part, rng):
        """An epoch's windows with their orders. tf.data keeps the arrays without copying
        them (tested), so a window is never a buffer that is filled again."""
        for x, y, order in self._windows(part, rng):
            yield x, y, np.arange(len(x)) if order is None else order

    def _pieces(self, part, rng):
        for x, y, order in self._windows(part, rng):
            yield (x, y) if order is None else (x[order], y[order])

    def _windows(self, part, rng):
        """An epoch as (inputs, targets, order) per window, each window in buffers of its
        own, `order` its shuffle or None. In RAM: windows of rows drawn from a shuffle of
        the whole part (NumPy gathers them). Streamed: whole units read from the file."""
        samples, unit = self.store.samples[part], self.store.unit_rows
        shuffle = rng is not None and self.shuffle
        if self.store.in_memory:
            x_data, y_data = self.store.arrays(part)
            order = rng.permutation(samples) if shuffle else None
            step = unit * self.window_units
            for start in range(0, samples, step):
                rows = (slice(start, start + step) if order is None
                        else order[start:start + step])
                yield x_data[rows], y_data[rows], None  # a slice: a view of the held array
            return
        x_data, y_data = self.store.datasets(part)
        plan = (window_plan(samples, unit, self.window_units, rng) if shuffle else
                [[slice(s, min(s + unit, samples))] for s in range(0, samples, unit)])
        for window in plan:
            rows = sum(piece.stop - piece.start for piece in window)
            held = [np.empty((rows, *shape), self.store.dtype) for shape in self.shapes()]
            filled = 0
            for piece in window:
                size = piece.stop - piece.start
                for data, buffer in zip((x_data, y_data), held):
                    data.read_direct(buffer, piece, np.s_[filled:filled + size])
                filled += size
            yield held[0], held[1], rng.permutation(rows) if shuffle else None


class RecomputedPairs(PairSource):
    """A block's pairs computed per batch by the teacher, from the images of each view."""

    def __init__(self, teacher, views: Views, split_images: dict, parts, input_name: str,
                 output_name: str, batch_size: int, seed: int = 0, shuffle: bool = True,
                 epoch: int = 0, poison: bool = False):
        import keras

        super().__init__(parts, batch_size, seed, shuffle, epoch, poison)
        self.views, self.split_images = views, split_images
        self.prefix = keras.Model(teacher.inputs, [boundary_tensor(teacher, input_name),
                                                   boundary_tensor(teacher, output_name)])
        self._shapes = tuple(tuple(t.shape[1:]) for t in self.prefix.outputs)

    def shapes(self):
        return self._shapes

    def close(self) -> None:
        self.prefix = None

    def samples_per_epoch(self) -> int:
        return len(self.split_images["train" if self.parts[0].startswith("train") else "val"])

    def _pieces(self, part, rng):
        split = "train" if part.startswith("train") else part
        view = int(part[len("train_v"):]) if part.startswith("train_v") else 0
        count = len(self.split_images[split])
        order = (rng.permutation(count) if rng is not None and self.shuffle
                 else np.arange(count))
        for start in range(0, count, self.batch_size):
            rows = np.sort(order[start:start + self.batch_size])
            images = (self.views.images(view, rows) if split == "train"
                      else self.split_images[split][rows])
            x, y = self.prefix.predict_on_batch(images)
            yield x, y


@dataclass
class BlockData:
    """What train_block needs: training epochs, validation, and a training pass in order."""

    train: PairSource
    val: PairSource
    train_eval: PairSource

    def calibration(self, count: int) -> np.ndarray:
        """A seeded random sample of `count` training inputs (PairSource.sample)."""
        return self.train.sample(count)

    def train_dataset(self, first_epoch: int = 0):
        """Training epochs from `first_epoch` on (a resumed task picks up its view)."""
        self.train.epoch = first_epoch
        return self.train.dataset()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        # Without this every finished task's arrays stayed resident until the process
        # ended (a worker grew by each block's pairs: demo, 6 tasks, +1.3 GB).
        for source in (self.train, self.val, self.train_eval):
            source.close()


@functools.lru_cache(maxsize=2)
def load_teacher_and_data(teacher_file: str, teacher_fingerprint: str, data: DataConfig,
                      data_fingerprint: str, seed: int):
    """The teacher (flattened, as rank 0 cut it) and the data on a worker, loaded once per
    process and checked against the hashes rank 0 computed (the data: opened from the
    index rank 0 sent, data/dataset.load_checked), so the pairs are those rank 0 would
    have computed."""
    teacher = flatten_model(load_model_file(teacher_file))
    received = model_fingerprint(teacher)
    if received != teacher_fingerprint:
        raise UserError(f"The teacher file {teacher_file!r} has weights fingerprint "
                        f"{received}, expected {teacher_fingerprint} (rank 0's teacher).")
    return teacher, load_checked(data, seed, data_fingerprint)


def open_block_data(task, source: DataSource, poison: bool = False) -> BlockData:
    """The task's batches. `task`: a distill/train_block.BlockTask."""
    block, config = task.block, task.config
    names = (block.input_boundary, block.output_boundary)
    train_parts = ["train", *part_names(source.views)[2:]]
    if source.mode == "recompute":
        teacher, dataset = load_teacher_and_data(source.teacher_file, source.teacher_fingerprint,
                                             source.data, source.data_fingerprint, source.seed)
        views = Views(dataset.x_train, source.augment, source.seed)
        images = {"train": dataset.x_train, "val": dataset.x_val}

        def make(parts, shuffle, batch, poison):
            return RecomputedPairs(teacher, views, images, parts, *names, batch,
                                   seed=task.block_seed, shuffle=shuffle, poison=poison)
    else:
        if task.input_path:  # a chained task: the student's inputs, no augmented views
            train_parts = ["train"]
        store = CacheStore(task.cache_path, task.cache_fingerprint, [*train_parts, "val"],
                           *names, memory_budget_bytes=source.memory_budget_bytes,
                           input_path=task.input_path, input_fingerprint=task.input_digest)

        def make(parts, shuffle, batch, poison):
            return CachedPairs(store, parts, batch, seed=task.block_seed, shuffle=shuffle,
                               poison=poison)
    # The NaN fault poisons training and the calibration sample, as a broken input would.
    # Evaluation batches: EVAL_BATCH until the task knows its student (train_block sizes
    # them by the student's activations).
    return BlockData(train=make(train_parts, True, config.batch_size, poison),
                     val=make(["val"], False, EVAL_BATCH, False),
                     train_eval=make(["train"], False, EVAL_BATCH, poison))


def read_pair(path: Path, fingerprint: str, split: str, input_name: str, output_name: str):
    """A block's (input, target) arrays of one part, loaded into memory whole."""
    require_complete(path, fingerprint)
    with h5py.File(path, "r") as f:
        return f[split][input_name][()], f[split][output_name][()]
