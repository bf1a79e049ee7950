"""The student in deployable formats, each loaded back and checked against the Keras student.

`student.keras` holds only the student (the assembled graph has no teacher layer left), a
SavedModel directory (`model.export`, signature `serve`) for TF Serving and TF runtimes,
and TFLite flatbuffers: float32, and int8 (weights and activations quantised from a
representative data set of validation images; inputs and outputs stay float32 so callers
feed the same images). Each export is run on the same validation images as the Keras
student; the report gives the largest absolute difference of the outputs and the share of
images whose predicted class agrees.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pbkd_mpi import atomic
from pbkd_mpi.data.images import sample_images
from pbkd_mpi.output.logs import LOGGER, native_output_to_log
from pbkd_mpi.output.problems import Problems, attempt, one_line

SAVED_MODEL_DIR = "student_savedmodel"
TFLITE_FILES = {"float32": "student_float32.tflite", "int8": "student_int8.tflite"}
REPRESENTATIVE_SAMPLES = 200  # int8 calibration images (validation split)
CHECK_SAMPLES = 64  # images every export is compared on


def tflite_kinds(option: str) -> tuple[str, ...]:
    """The job's `export.tflite` value as the TFLite files to write."""
    return {"none": (), "float32": ("float32",), "int8": ("int8",),
            "both": ("float32", "int8")}[option]


def path_bytes(path: Path) -> int:
    """Size of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def export_saved_model(model, directory: Path) -> Path:
    """The SavedModel directory, whole or not at all (a kill mid-export leaves the last
    complete one, or none)."""
    with atomic.atomic_directory(directory) as tmp:
        model.export(str(tmp), format="tf_saved_model", verbose=False)
    return directory


def convert_tflite(saved_model: Path, kind: str, representative: np.ndarray | None = None,
                   select_tf_ops: bool = False) -> bytes:
    """The SavedModel as a TFLite flatbuffer of `kind`; `select_tf_ops` lets ops without a
    TFLite kernel run as TensorFlow ops (TF Select: the app must link the Flex delegate).
    What the converter prints goes to the rank's log (output/logs.native_output_to_log)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if kind == "int8":
        if representative is None or not len(representative):
            raise ValueError("int8 TFLite needs representative images; received none")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: (
            [representative[i:i + 1].astype(np.float32)] for i in range(len(representative)))
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif kind == "float32":
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    else:
        raise ValueError(f"TFLite kind must be 'float32' or 'int8', received {kind!r}")
    converter.target_spec.supported_ops = ops + (
        [tf.lite.OpsSet.SELECT_TF_OPS] if select_tf_ops else [])
    with native_output_to_log():
        return converter.convert()


def tflite_bytes(saved_model: Path, kind: str, representative) -> tuple[bytes, str]:
    """(the SavedModel as a TFLite flatbuffer of `kind`, the op sets it needs: "builtins",
    or "builtins+select_tf" where some op has no TFLite kernel). int8 is calibrated on a
    seeded random sample of REPRESENTATIVE_SAMPLES of `representative` (validation
    images: a split may be sorted by class). Raises the converter's error when even TF
    Select cannot convert it."""
    sample = (sample_images(representative, REPRESENTATIVE_SAMPLES) if kind == "int8"
              else None)
    try:
        return convert_tflite(saved_model, kind, sample), "builtins"
    except Exception as builtins_error:  # noqa: BLE001 - the converter raises several types
        LOGGER.warning("TFLite %s with builtin ops alone failed (%s); trying TF Select",
                       kind, one_line(builtins_error))
        return convert_tflite(saved_model, kind, sample, select_tf_ops=True), \
            "builtins+select_tf"


class TfliteModel:
    """A TFLite file as a callable on a float32 batch (the input is resized per batch)."""

    def __init__(self, path: Path, threads: int | None = None):
        import tensorflow as tf

        with warnings.catch_warnings(), native_output_to_log():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
            self.interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=threads)
        self.input = self.interpreter.get_input_details()[0]["index"]
        self.output = self.interpreter.get_output_details()[0]["index"]
        self.shape = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.shape != x.shape:
            with native_output_to_log():  # "Created TensorFlow Lite XNNPACK delegate ..."
                self.interpreter.resize_tensor_input(self.input, x.shape)
                self.interpreter.allocate_tensors()
            self.shape = x.shape
        self.interpreter.set_tensor(self.input, x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output).copy()


class SavedModelFunction:
    """A SavedModel directory's `serve` signature as a callable on a float32 batch."""

    def __init__(self, directory: Path):
        import tensorflow as tf

        self.module = tf.saved_model.load(str(directory))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.module.serve(np.asarray(x, np.float32)))


@dataclass(frozen=True)
class Export:
    format: str  # keras, saved_model, tflite_float32, tflite_int8
    path: Path
    ops: str | None = None  # TFLite: "builtins" or "builtins+select_tf"

    def load(self):
        """The export as a callable on a float32 batch, loaded from disk."""
        if self.format == "keras":
            import keras

            model = keras.saving.load_model(self.path, compile=False)
            return lambda x: np.asarray(model(np.asarray(x, np.float32), training=False))
        if self.format == "saved_model":
            return SavedModelFunction(self.path)
        return TfliteModel(self.path)


def write_exports(student, keras_path: Path, run_dir: Path, saved_model: bool,
                  tflite: tuple[str, ...], representative: np.ndarray,
                  problems: Problems | None = None) -> list[Export]:
    """Every export the job asks for that could be made (student.keras exists already);
    one that fails is recorded in `problems` (raised without it). A TFLite file needs the
    SavedModel, so asking for TFLite writes the SavedModel too."""
    run_dir = Path(run_dir)
    exports = [Export("keras", Path(keras_path))]
    if not (saved_model or tflite):
        return exports
    directory = attempt(problems, "export saved_model", export_saved_model, student,
                         run_dir / SAVED_MODEL_DIR)
    if directory is None:
        return exports
    exports.append(Export("saved_model", directory))
    for kind in tflite:
        path = run_dir / TFLITE_FILES[kind]
        converted = attempt(problems, f"export tflite_{kind}", tflite_bytes, directory, kind,
                             representative)
        if converted is not None:
            atomic.write_bytes(path, converted[0])
            exports.append(Export(f"tflite_{kind}", path, converted[1]))
    return exports


def check_exports(student, exports: list[Export], x: np.ndarray,
                  problems: Problems | None = None) -> dict:
    """{format: {path, bytes, ops, max_abs_diff, class_agreement}} against the Keras
    student, on a seeded random sample of CHECK_SAMPLES images of `x`; an export that
    cannot be run here is recorded in `problems` (None: raised) and left out."""
    x = sample_images(x, CHECK_SAMPLES)
    reference = np.asarray(student(x, training=False))
    checked = {}
    for export in exports:
        outputs = attempt(problems, f"check {export.format}",
                           lambda: np.asarray(export.load()(x)))
        if outputs is None:
            continue
        checked[export.format] = {
            "path": str(export.path),
            "bytes": path_bytes(export.path),
            "ops": export.ops,
            "max_abs_diff": float(np.max(np.abs(outputs - reference))),
            "class_agreement": float(np.mean(np.argmax(outputs, -1) == np.argmax(reference, -1))),
        }
    return checked
