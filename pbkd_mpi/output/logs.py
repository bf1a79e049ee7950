"""Per-rank log files (RUN/logs/rank-N.log, one timestamped line per event) and
TensorBoard scalars (RUN/tb/).

Only rank 0 writes to the terminal (see cli.py); every rank, rank 0 included, writes its own
file, so what a worker did (tasks, losses per epoch, warnings, errors) can be read without
untangling N interleaved streams.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

LOGGER = logging.getLogger("pbkd_mpi")
# Until a rank opens its log file, events go nowhere: never to the terminal through
# Python's last-resort handler, which would print every rank's copy.
LOGGER.addHandler(logging.NullHandler())
LOGGER.propagate = False


def open_rank_log(run_dir, rank: int) -> Path:
    """Send this rank's events to RUN/logs/rank-N.log (appending: a resumed run continues
    the same file)."""
    path = Path(run_dir) / "logs" / f"rank-{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    for handler in list(LOGGER.handlers):
        LOGGER.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s rank {rank} %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    return path


def epoch_logger(what: str, emit=LOGGER.info):
    """A Keras callback emitting one line per epoch with its losses (to this rank's log
    file, or through `emit`, e.g. rank 0's console, which also writes the file)."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            values = ", ".join(f"{k} {float(v):.5g}" for k, v in (logs or {}).items())
            emit(f"{what}: epoch {epoch + 1}: {values}")

    return EpochLog()


def tensorboard_logger(log_dir):
    """A Keras callback writing each epoch's losses and metrics as TensorBoard scalars
    (tf.summary event files: `tensorboard --logdir RUN/tb` shows them)."""
    import keras
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    # What tf.summary.scalar writes, without needing the tensorboard package installed:
    # a float tensor tagged for TensorBoard's scalars plugin.
    scalar = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

    class EpochScalars(keras.callbacks.Callback):
        writer = None

        def on_train_begin(self, logs=None):
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.writer = tf.summary.create_file_writer(str(log_dir))

        def on_epoch_end(self, epoch, logs=None):
            with self.writer.as_default():
                for key, value in (logs or {}).items():
                    tf.summary.write(key, tf.constant(float(value), tf.float32), step=epoch + 1,
                                     metadata=scalar)
            self.writer.flush()

        def on_train_end(self, logs=None):
            self.writer.close()

    return EpochScalars()


@contextmanager
def native_output_to_log():
    """Within the block, what C++ code writes to the process's stdout and stderr (the
    TFLite converter's MLIR dumps, its interpreter's "Created TensorFlow Lite XNNPACK
    delegate" line, TensorFlow's own logging) goes to this rank's log file, not the
    console; with no log file open, nowhere. Python's own streams are flushed first so
    nothing of theirs lands in the log."""
    target = next((h.baseFilename for h in LOGGER.handlers
                   if isinstance(h, logging.FileHandler)), os.devnull)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    try:
        with open(target, "ab") as sink:
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
