"""The teacher: a user's saved Keras model, or a built-in architecture trained on the job's data.

A built-in teacher is trained once and kept in the run directory under a name keyed by a
hash of everything that shaped it, so a second run with the same job loads it instead.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import h5py

from pbkd_mpi.atomic import atomic_path
from pbkd_mpi.config import TeacherConfig
from pbkd_mpi.data.dataset import Dataset
from pbkd_mpi.data.images import keras_batches
from pbkd_mpi.errors import UserError
from pbkd_mpi.keys import json_key
from pbkd_mpi.model.graph import copied_graph


if TYPE_CHECKING:  # keras is imported where used: start-up stays fast without TensorFlow
    import keras

BUILTIN_TEACHERS = ("vgg_demo", "vgg_deep")
BUILTIN_VERSION = 1  # bump when build_vgg_demo changes, so old trained teachers are not reused


def build_vgg_demo(input_shape, num_classes: int, widths, pool_after=None,
                   name: str = "vgg_demo") -> "keras.Model":
    """VGG-style: 3x3 conv + BN + ReLU per width, a 2x2 max pool after every second conv
    (or after the convs numbered in `pool_after`, from 1), global average pooling and a
    softmax classifier."""
    import keras
    from keras import layers

    if pool_after is None:
        pool_after = [i for i in range(2, len(widths), 2)]
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    pools = 0
    for i, width in enumerate(widths, start=1):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        if i in pool_after and i < len(widths):
            pools += 1
            x = layers.MaxPooling2D(name=f"pool{pools}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name=name)


def build_vgg_deep(input_shape, num_classes: int, widths) -> "keras.Model":
    """VGG16's rule for a deeper teacher: the convs come in stages of equal width and a
    2x2 max pool ends each stage (wherever the next conv's width changes), e.g. widths
    16,16 | 24,24 | 32,32,32 | 48,48,48 | 64,64,64: 13 convs, 4 pools."""
    pool_after = [i for i in range(1, len(widths)) if widths[i] != widths[i - 1]]
    return build_vgg_demo(input_shape, num_classes, widths, pool_after, name="vgg_deep")


def build_builtin(name: str, input_shape, num_classes: int, widths) -> "keras.Model":
    """The built-in teacher `name` (one of BUILTIN_TEACHERS), untrained."""
    builders = {"vgg_demo": build_vgg_demo, "vgg_deep": build_vgg_deep}
    if name not in builders:
        raise UserError(f"teacher.source {name!r} is not a built-in teacher; expected one of "
                        f"{', '.join(BUILTIN_TEACHERS)}")
    return builders[name](input_shape, num_classes, widths)


def load_teacher(config: TeacherConfig, dataset: Dataset, run_dir: Path, seed: int,
                 callbacks=()):
    """Return (model, description) where description says where the teacher came from."""
    if config.source in BUILTIN_TEACHERS:
        model, info = _builtin_teacher(config, dataset, run_dir, seed, callbacks)
    else:
        model, info = load_model_file(config.source), {"source": config.source, "trained_here": False}
    check_teacher_fits_data(model, dataset)
    return model, info


def load_model_file(source: str):
    import keras

    path = Path(source)
    if not path.exists():
        raise UserError(
            f"teacher.source {source!r} does not exist. Expected a .keras or .h5 model file, "
            f"or a built-in architecture: {', '.join(BUILTIN_TEACHERS)}."
        )
    if path.suffix not in (".keras", ".h5", ".hdf5"):
        raise UserError(
            f"teacher.source {source!r} is not a .keras or .h5 file (received a "
            f"{path.suffix or 'suffix-less'} path). Save the model with model.save('name.keras')."
        )
    _check_container(path, source)
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a foreign or broken file
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"teacher.source {source!r} could not be loaded as a Keras model: {message}"
        ) from None
    if not isinstance(model, keras.Model):
        raise UserError(
            f"teacher.source {source!r} holds a {type(model).__name__}, expected a keras.Model."
        )
    return in_float32(model)


def in_float32(model):
    """`model`, or where a layer computes in another dtype (a `mixed_float16` or
    `mixed_bfloat16` policy) a flat copy of it computing in float32 with the same weights
    (mixed policies keep float32 variables). Activations, students and exports are then
    float32 throughout: TFLite has no float16 kernels for a float16 graph's convs, and a
    block trained on half-precision targets learns their rounding."""
    import keras

    def reduced(layer) -> bool:
        return getattr(getattr(layer, "dtype_policy", None), "compute_dtype",
                       "float32") not in ("float32", "int32", "int64", "bool", None)

    if not any(reduced(layer) for layer in model._flatten_layers(include_self=False)):
        return model
    # Weights set as they are: a float16 array is cast by the float32 variable.
    return copied_graph(model, lambda layer: layer.__class__.from_config(
        layer.get_config() | ({"dtype": "float32"} if reduced(layer) else {})))


def _check_container(path: Path, source: str) -> None:
    """A .keras file is a zip archive and a .h5 file HDF5: say so plainly, instead of the
    "file not found" Keras reports for a file that exists but is something else."""

    if path.suffix == ".keras":
        expected, ok = "a zip archive (what model.save('name.keras') writes)", \
            zipfile.is_zipfile(path)
    else:
        expected, ok = "an HDF5 file (what model.save('name.h5') writes)", h5py.is_hdf5(path)
    if not ok:
        with open(path, "rb") as file:
            head = file.read(16)
        raise UserError(
            f"teacher.source {source!r} is not a Keras model file: a {path.suffix} model is "
            f"{expected}, but this file ({path.stat().st_size} bytes) starts with {head!r}.")


def check_teacher_fits_data(model, dataset: Dataset) -> None:
    expected = tuple(model.inputs[0].shape[1:]) if model.inputs else None
    if expected is None or expected != dataset.image_shape:
        raise UserError(
            f"The teacher expects inputs of shape {expected}, but the data set's samples "
            f"have shape {dataset.image_shape}. Set data.image_size (and the image channels) "
            f"to match the teacher; a teacher of sequences (steps, channels) needs "
            f"data.kind = \"sequences\"."
        )
    outputs = model.outputs[0].shape
    if len(outputs) != 2 or outputs[-1] != dataset.num_classes:
        raise UserError(
            f"The teacher's output has shape {tuple(outputs)}, but the data set has "
            f"{dataset.num_classes} classes: expected (None, {dataset.num_classes})."
        )
    for split in ("train", "val", "test"):
        labels = dataset.uncounted(f"y_{split}")  # a range check, not an evaluation
        if len(labels) and labels.max() >= outputs[-1]:
            raise UserError(
                f"y_{split} holds label {labels.max()}, outside the teacher's "
                f"{outputs[-1]} classes [0, {outputs[-1] - 1}]."
            )


def _builtin_teacher(config: TeacherConfig, dataset: Dataset, run_dir: Path, seed: int,
                     callbacks=()):
    import keras

    # 12 digits: the length of the names of teachers already trained.
    key = json_key({
            "arch": config.source,
            "version": BUILTIN_VERSION,
            "widths": list(config.widths),
            "epochs": config.train_epochs,
            "batch": config.train_batch_size,
            "lr": config.learning_rate,
            "data": dataset.fingerprint(),
            "seed": seed,
            "keras": keras.__version__,
    }, digits=12)
    path = run_dir / f"teacher-{key}.keras"
    info = {"source": config.source, "file": str(path), "trained_here": False}
    if path.exists():
        return keras.saving.load_model(path, compile=False), info
    keras.utils.set_random_seed(seed)
    model = build_builtin(config.source, dataset.image_shape, dataset.num_classes, config.widths)
    history, _ = fit_classifier(
        model, dataset, epochs=config.train_epochs, batch_size=config.train_batch_size,
        learning_rate=config.learning_rate, patience=config.train_epochs, probabilities=True,
        seed=seed, callbacks=callbacks,
    )
    save_model_atomically(model, path)
    info.update(
        trained_here=True,
        epochs=len(history.history["loss"]),
        val_accuracy=float(max(history.history["val_accuracy"])),
    )
    return model, info


def save_model_atomically(model, path: Path) -> None:
    """Write next to the target and rename, so a crash never leaves a half-written model."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def fit_classifier(model, dataset: Dataset, *, epochs: int, batch_size: int,
                   learning_rate: float, patience: int, probabilities: bool, seed: int,
                   callbacks=()):
    """Train with labels in one process (Adam, cross-entropy), keeping the weights of the
    epoch with the best validation accuracy (the built-in teacher's training). Returns
    (Keras history, best epoch counted from 1)."""
    import keras

    keras.utils.set_random_seed(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not probabilities),
        metrics=["accuracy"],
    )
    best = keras.callbacks.EarlyStopping(
        monitor="val_accuracy", mode="max", patience=patience, restore_best_weights=True
    )
    x, y = keras_batches(dataset.x_train, dataset.y_train, batch_size, shuffle=True, seed=seed)
    history = model.fit(
        x,
        y,
        batch_size=batch_size if y is not None else None,
        epochs=epochs,
        validation_data=keras_batches(dataset.x_val, dataset.y_val, batch_size, shuffle=False),
        callbacks=[best, *callbacks],
        shuffle=True,
        verbose=0,
    )
    return history, int(best.best_epoch) + 1
