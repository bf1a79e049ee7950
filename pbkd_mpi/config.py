"""The job: frozen dataclasses read from TOML, overridden by --set, validated once.

Rank 0 builds and validates the job; the other ranks receive the finished object. Every
field carries its help text, allowed range and choices, so validation, error messages and
docs/job-file.md all come from the one table below.
"""

from __future__ import annotations

import dataclasses
import json
import os
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pbkd_mpi.errors import UserError

# Named here, where Keras is not imported, for the job's choices; model/students.py and
# model/allocation.py build what they name.
STUDENT_FAMILIES = ("separable", "inverted_residual", "low_rank")
ALLOCATIONS = ("uniform", "spectrum")
OBJECTIVES = ("latency", "flops", "params")
LATENCY_TARGETS = ("cpu", "tflite", "keras-cpu", "gpu")


def _opt(default, help, *, min=None, max=None, choices=None):
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TeacherConfig:
    source: str = _opt(
        "vgg_demo",
        "A `.keras` or `.h5` model file, or a built-in architecture name (`vgg_demo`: a "
        "2x2 max pool after every second conv; `vgg_deep`: VGG16's stages, a pool wherever "
        "the next conv's width changes, see jobs/deep.toml), which is trained on the job's "
        "data first and kept in the run directory.",
    )
    widths: tuple[int, ...] = _opt(
        [16, 16, 32, 32, 64, 64],
        "Built-in teacher only: output channels of each 3x3 conv; a 2x2 max pool follows "
        "every second conv.",
    )
    train_epochs: int = _opt(15, "Built-in teacher only: training epochs.", min=1)
    train_batch_size: int = _opt(32, "Built-in teacher only: training batch size.", min=1)
    learning_rate: float = _opt(1e-3, "Built-in teacher only: Adam learning rate.", min=0.0)


@dataclass(frozen=True)
class DataConfig:
    source: str = _opt(
        "demo",
        "`demo` (generated shapes), a directory of images in class subfolders, an `.npz` "
        "or an HDF5 file with `x_train, y_train, x_test, y_test` (optionally `x_val, y_val`).",
    )
    kind: str = _opt(
        "images",
        "`images`, of shape (N, H, W, C) (or (N, H, W), grey), or `sequences`, of shape "
        "(N, steps, channels) (or (N, steps)): audio and time series for a teacher built of "
        "Conv1D layers, read from an `.npz` or HDF5 `source` and used as stored "
        "(`image_size`, `scale` and the cache's augmented views are for images).",
        choices=("images", "sequences"),
    )
    image_size: tuple[int, ...] = _opt(
        [32, 32], "Height and width the images are resized to (image folders) or must have."
    )
    scale: str = _opt(
        "unit",
        "Pixel preprocessing, applied as images are read: `unit` divides by 255, "
        "`symmetric` maps to [-1, 1], `none` keeps values as stored (the teacher "
        "preprocesses inside its graph); `caffe`, `torch` and `tf` are keras.applications' "
        "modes (imagenet_utils.preprocess_input: BGR minus ImageNet's means; /255 then "
        "ImageNet's mean and std; [-1, 1]).",
        choices=("unit", "symmetric", "none", "caffe", "torch", "tf"),
    )
    bad_images: str = _opt(
        "refuse",
        "Image folders only: what to do with a file that is not a readable image: `refuse` "
        "stops with its name, `skip` leaves it out and counts it in the report.",
        choices=("refuse", "skip"),
    )
    val_fraction: float = _opt(
        0.1,
        "Share of the training data held out for validation (fixed seed) when the data "
        "set has no validation split.",
        min=0.0,
        max=0.5,
    )
    demo_train: int = _opt(8000, "Demo data only: number of training images.", min=100)
    demo_test: int = _opt(2000, "Demo data only: number of test images.", min=100)
    demo_classes: int = _opt(
        10, "Demo data only: number of classes (the first ones are the easiest).", min=2, max=10
    )
    demo_noise: float = _opt(0.12, "Demo data only: standard deviation of pixel noise.", min=0.0)


@dataclass(frozen=True)
class StudentConfig:
    depth_multiplier: int = _opt(
        2,
        "Depthwise filters per input channel in each student block: 1 is the plain "
        "depthwise-separable conv; 2 doubles the depthwise part and the pointwise inputs.",
        min=1,
    )
    family: str = _opt(
        "separable",
        "Student family: `separable` (depthwise + pointwise 1x1 + BN for a conv group, which "
        "starts from the teacher's factorised kernel; two separable units for a multi-layer "
        "block) or `inverted_residual` (MobileNetV2-style 1x1 expansion, depthwise, linear "
        "1x1 projection, starting fresh) or `low_rank` (dense: the teacher's kxk conv to r "
        "channels then a 1x1 conv, starting from the kernel's rank-r SVD; a plain 3x3 + 1x1 "
        "pair for a multi-layer block; r sized by `target_params`, else to a quarter of the "
        "block's parameters). All keep a skip connection where the block's input and output "
        "shapes match, except a single conv.",
        choices=STUDENT_FAMILIES,
    )
    fallback_family: str = _opt(
        "low_rank",
        "For a block whose student of the chosen family would not be smaller than the block "
        "(a 1x1 conv, the pointwise conv of a depthwise network): this family instead, if "
        "its student is smaller; `none` leaves such blocks the teacher's.",
        choices=(*STUDENT_FAMILIES, "none"),
    )
    target_params: float = _opt(
        0.0,
        "Each student's parameters as a fraction of its block's, e.g. 0.3, so the whole "
        "student's replaced parameters meet it too: each student's width (the rank of a "
        "`low_rank` student) is chosen to meet it; a single conv in the `separable` family, "
        "whose size `depth_multiplier` alone sets, gets the `low_rank` student instead. "
        "0: no target.",
        min=0.0, max=1.0,
    )
    allocation: str = _opt(
        "uniform",
        "How `target_params` is shared between blocks: `uniform` (every block the same "
        "share) or `spectrum` (the low-rank students of single convs share theirs so that "
        "the energy their ranks leave out of the teacher's kernels is smallest: blocks with "
        "flat singular-value spectra get wider students, the others narrower).",
        choices=ALLOCATIONS,
    )
    min_ratio: float = _opt(
        0.02,
        "`plan` and `run` warn about a student with fewer than this fraction of its block's "
        "parameters: it is unlikely to learn the block.",
        min=0.0, max=1.0,
    )
    objective: str = _opt(
        "latency",
        "What each block's student is chosen for, among the candidates that have no more "
        "parameters than the student `family` and `depth_multiplier` give (that student "
        "and the low-rank one of the largest rank within it): `latency` (each timed alone "
        "on `target` at each of `latency_batches`, with the teacher's own block when "
        "`keep_teacher`; the first of the teacher's block, the `family` student and the "
        "low-rank one within `min_speedup` of the fastest), `flops` (the fewest FLOPs) or "
        "`params` (the `family` student itself, as the published method). Acceptance "
        "retries a block "
        "that costs too much accuracy with the `family` student when another went first, "
        "else with the wider `family` student. Blocks named in `family_overrides` keep "
        "their family.",
        choices=OBJECTIVES,
    )
    target: str = _opt(
        "cpu",
        "Where `objective = \"latency\"` times the candidates (on the workers, their BNs "
        "folded, as in the saved student): `tflite` (TFLite float32, XNNPACK, 1 thread), "
        "`keras-cpu` (Keras on the CPU, the worker's TensorFlow threads), `cpu` (both: a "
        "candidate's relative time is "
        "the geometric mean over the two runtimes and the batches; the deep job's second "
        "conv ran 1.3x faster as a student in TFLite and 1.07x slower in Keras at batch "
        "32, so it keeps the teacher's block) or `gpu` (Keras on the worker's GPU; refused "
        "where there is none).",
        choices=LATENCY_TARGETS,
    )
    latency_batches: tuple[int, ...] = _opt(
        [1, 32],
        "The batches at which the candidates are timed (`objective = \"latency\"`). A "
        "candidate's time relative to the fastest is the geometric mean of its ratios at "
        "these batches (and runtimes). A batch is cut for a block where one call of the "
        "teacher's block would pass 2 GFLOPs (a 224 px ResNet50 block: batch 4).",
    )
    min_speedup: float = _opt(
        1.25,
        "A less accurate candidate goes first only when it is timed at least this many "
        "times faster (`objective = \"latency\"`): at equal parameters the low-rank "
        "students of the deep job's blocks ran 3-15% faster in TFLite than the separable "
        "ones and learned their blocks to 2-2.7x their relative error.",
        min=1.0,
    )
    keep_teacher: bool = _opt(
        True,
        "Under `objective = \"latency\"`, the teacher's own block is a candidate too: a "
        "block none of whose students is `min_speedup` times faster than it keeps the "
        "teacher's layers (not trained, no accuracy lost, its parameters kept; a first "
        "conv on three channels, typically). `false`: every block gets a student.",
    )
    family_overrides: tuple[str, ...] = _opt(
        [],
        "Per-block families, each `\"pattern=family\"`: blocks whose name matches the "
        "shell-style pattern (the first match wins; `plan` shows the names) get that family, "
        "e.g. `[\"conv5_*=inverted_residual\"]`.",
    )
    width_multiplier: float = _opt(
        1.0,
        "Channels inside a student, relative to the teacher block's narrowest conv (for a "
        "single conv: the smaller of its input and output channels). Applies to multi-layer "
        "separable students and to `inverted_residual` students.",
        min=0.0,
    )


@dataclass(frozen=True)
class BlocksConfig:
    granularity: str = _opt(
        "layer",
        "How the teacher is cut into blocks: `layer` (each Conv2D or Conv1D with the BN and "
        "activation right after it), `block` (the segments between tensors that every path "
        "from input to output passes, such as residual blocks with their skip connection), "
        "`stage` (`block` segments merged while the spatial size stays the same). Blocks "
        "whose student would not be smaller than the teacher block in any family stay the "
        "teacher's.",
        choices=("layer", "block", "stage"),
    )
    max_share: float = _opt(
        0.9,
        "A block holding more than this share of the teacher's parameters in blocks is too "
        "big to distil well: a stage is cut back into its blocks; a block that has no inner "
        "cut point is kept and `plan` and `run` warn about it.",
        min=0.0, max=1.0,
    )
    explicit: tuple[str, ...] = _opt(
        [],
        "Blocks named by hand instead, each `\"first_layer:last_layer\"`: every layer on a "
        "path between the two, which must have one input and one output tensor. When given, "
        "`granularity` is ignored.",
    )


@dataclass(frozen=True)
class DistillConfig:
    epochs: int = _opt(8, "Maximum epochs of MSE training per student block.", min=1)
    batch_size: int = _opt(64, "Batch size of block training.", min=1)
    learning_rate: float = _opt(5e-3, "Adam learning rate of block training.", min=0.0)
    patience: int = _opt(
        3, "Stop a block after this many epochs without a better validation MSE.", min=1
    )
    chained_epochs: int = _opt(
        4,
        "After the parallel phase (and acceptance), train each replaced block up to this many "
        "more epochs on the assembled student's own input to the block (see "
        "`chained_order`) against the teacher's output, so errors do not compound across blocks; a block keeps the new "
        "weights only when they lower its validation MSE on that input. Needs the activation "
        "cache: a job with `cache.mode = \"recompute\"` is refused unless it sets 0 (under "
        "`\"auto\"` the pass is skipped when the cache does not fit). 0: off. See "
        "docs/usage.md (4 brought the demo's merged student from 0.689 to 0.777).",
        min=0,
    )
    chained_order: str = _opt(
        "parallel",
        "How the chained pass orders its blocks. `parallel`: every block but the last at "
        "once, spread over the workers, each on the input the parallel phase's students "
        "before it compute (one forward pass writes all of them), then the last one on the "
        "chained students' input; `sequential`: one block after another, each on the input "
        "of the students before it after their own chained training (the other workers "
        "wait). See docs/usage.md for the two measured on the demo.",
        choices=("parallel", "sequential"),
    )
    head_weight: float = _opt(
        1.0,
        "In the chained pass, the last replaced block's loss adds Hinton distillation "
        "through the teacher's own head (the layers after it, frozen; every one of them is "
        "the student's too) between its output and the teacher's, at "
        "`finetune.temperature`, with this weight against the MSE; it then keeps the new "
        "weights when they raise the assembled student's validation accuracy. 0: MSE alone. See "
        "docs/usage.md (1.0 brought the demo's merged student from 0.784 to 0.806).",
        min=0.0,
    )


@dataclass(frozen=True)
class TasksConfig:
    max_attempts: int = _opt(
        2,
        "Tries of a block task that fails (an exception, NaN or Inf loss), each on another "
        "worker where possible; a block that fails them all stays the teacher's and the run "
        "ends with status `degraded`.",
        min=1,
    )
    silence_limit_s: float = _opt(
        30.0,
        "A worker training a block sends a heartbeat every sixth of this; one silent for "
        "longer (hung, stopped, its node gone) ends the job with a message naming its rank "
        "and block, within this plus 10 seconds.",
        min=5.0,
    )
    coordinator_trains: str = _opt(
        "auto",
        "Whether rank 0 also trains block tasks, in a thread, while it coordinates, and "
        "builds the cache and fine-tunes with the workers. `auto`: when it has a GPU that "
        "no worker rank on its node uses (fewer workers there than GPUs, e.g. `mpirun -np "
        "4` on 4 GPUs), so no GPU sits idle; otherwise it would share a worker's GPU or "
        "cores and slow every synchronous step. `yes` forces it (also on CPU), `no` never.",
        choices=("auto", "yes", "no"),
    )


@dataclass(frozen=True)
class ScheduleConfig:
    policy: str = _opt(
        "work-stealing",
        "Which worker trains which block when. `work-stealing`: per-worker queues seeded "
        "longest-first from the profile; a worker whose queue is empty takes the longest task "
        "left in the most loaded queue, and measured task times correct the estimates. "
        "`static-lpt`: longest first onto the least-loaded worker, fixed before the run. "
        "`round-robin`: block i to worker i mod W, fixed (the published baselines).",
        choices=("work-stealing", "static-lpt", "round-robin"),
    )
    split: bool = _opt(
        True,
        "`work-stealing` only: a block whose estimate exceeds the ideal makespan (total / "
        "workers) may be trained data-parallel by several workers at once, as many as the "
        "planner finds best by simulating the schedule.",
    )
    split_blocks: tuple[str, ...] = _opt(
        [],
        "Blocks trained data-parallel by a given number of workers whatever the planner "
        "finds, each `\"pattern=k\"` (shell-style pattern on the block name, k >= 2 and at "
        "most the workers), e.g. `[\"conv1=2\"]`. Needs `profile = true`.",
    )
    profile: bool = _opt(
        True,
        "Time a few training steps of every block on the workers before distillation and "
        "schedule from those measurements (`RUN/profile.json`); false uses the FLOP "
        "estimate, labelled as such.",
    )
    profile_steps: int = _opt(
        4, "Timed training steps per block when profiling, after 2 warm-up steps.", min=2
    )


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = _opt(
        10, "Maximum epochs of end-to-end fine-tuning of the student (0 skips it).", min=0
    )
    batch_size: int = _opt(64, "Batch size of fine-tuning.", min=1)
    learning_rate: float = _opt(1e-3, "Adam learning rate of fine-tuning.", min=0.0)
    patience: int = _opt(
        3, "Stop after this many epochs without a better validation accuracy.", min=1
    )
    loss: str = _opt(
        "distill",
        "Fine-tuning loss. `cross-entropy`: labels only. `distill`: Hinton distillation, "
        "`alpha` x T^2 x the KL divergence of the student's soft targets from the "
        "teacher's at temperature T, plus "
        "(1 - `alpha`) x cross-entropy on labels; the teacher's logits come from the "
        "activation cache, so the teacher does not run during fine-tuning.",
        choices=("cross-entropy", "distill"),
    )
    temperature: float = _opt(4.0, "`distill` only: softmax temperature T.", min=1.0)
    alpha: float = _opt(
        0.7, "`distill` only: weight of the soft-target term (1 - alpha: labels).",
        min=0.0, max=1.0,
    )
    schedule: str = _opt(
        "cosine",
        "Learning-rate schedule over `epochs`: `cosine` decays to zero, `constant` keeps it.",
        choices=("cosine", "constant"),
    )
    collapse_drop: float = _opt(
        0.2,
        "Divergence guard: a NaN/Inf loss, or a validation accuracy this far below the best "
        "so far, restores the best weights and lowers the learning rate (x0.3).",
        min=0.0, max=1.0,
    )
    max_recoveries: int = _opt(
        3, "Divergence guard: recoveries allowed before fine-tuning stops at the best weights.",
        min=0,
    )


@dataclass(frozen=True)
class AcceptConfig:
    max_drop: float = _opt(
        0.03,
        "Per-block acceptance: each student block is swapped alone into the teacher and "
        "scored on the validation split; one that lowers the teacher's validation accuracy "
        "by more than this (a fraction: 0.03 = 3 points) is retrained once with a wider "
        "student, and stays the teacher's if that one costs too much too. 1.0 accepts all.",
        min=0.0, max=1.0,
    )
    widen: int = _opt(
        2, "The wider retrain's depth multiplier, times `student.depth_multiplier`.", min=2
    )


@dataclass(frozen=True)
class ExportConfig:
    saved_model: bool = _opt(
        True, "Also export the student as a SavedModel directory (`student_savedmodel/`)."
    )
    tflite: str = _opt(
        "float32",
        "TFLite files of the student: `float32` (`student_float32.tflite`), `int8` "
        "(`student_int8.tflite`: weights and activations quantised, calibrated on "
        "validation images; float32 inputs and outputs), `both` or `none`. Needs the "
        "SavedModel, which is then written too.",
        choices=("none", "float32", "int8", "both"),
    )
    fold_batchnorm: bool = _opt(
        True,
        "Fold each BatchNormalization that follows a conv, depthwise conv or Dense layer "
        "into it in the saved student (`student.keras` and its exports): the same outputs "
        "(checked on validation images), one pass over each tensor fewer in Keras and "
        "TensorFlow. `student-assembled.keras` keeps them for further training.",
    )
    latency_repeats: int = _opt(
        20,
        "Timed calls behind each latency figure of the report (their median), after 3 "
        "warm-up calls; teacher, student and each export at batch 1 and 32: a large model "
        "at 224 px spends a minute here at 20.",
        min=1,
    )


@dataclass(frozen=True)
class CacheConfig:
    mode: str = _opt(
        "cache",
        "Where block training gets its (input, target) pairs: `cache` computes the teacher's "
        "activations once into HDF5 (refused, with options, when the disk is too small); "
        "`recompute` runs the teacher up to each block on every batch instead (no disk, "
        "slower: the method's original way); `auto` caches when the estimate fits the disk, "
        "else recomputes.",
        choices=("cache", "recompute", "auto"),
    )
    dtype: str = _opt(
        "float16",
        "Storage type of cached teacher activations.",
        choices=("float16", "float32"),
    )
    compression: str = _opt(
        "none",
        "Compression of the cache files: `none` reads fastest; `lzf` is fast and makes ReLU "
        "activations smaller; `gzip` (level 1) smaller still and slowest. See docs/cache.md.",
        choices=("none", "lzf", "gzip"),
    )
    shard_samples: int = _opt(
        512,
        "Samples per cache shard file. Shards are built in parallel by the workers and kept "
        "when a build is interrupted; their boundaries do not depend on the rank count.",
        min=1,
    )
    views: int = _opt(
        0,
        "Augmented views of the training set cached besides the plain one (random flips, "
        "crops, colour jitter, drawn from `run.seed`); block training reads view e mod "
        "(1 + views) in epoch e.",
        min=0,
    )
    augment_flip: bool = _opt(True, "Views only: random horizontal flips.")
    augment_crop: int = _opt(
        4, "Views only: zero padding in pixels on each side before a random crop back to "
        "size (0: no crops).", min=0)
    augment_jitter: float = _opt(
        0.1, "Views only: random contrast and brightness change, as a fraction of each "
        "image's own spread (0: none).", min=0.0, max=1.0)
    memory_budget_mb: int = _opt(
        256,
        "Per worker: a block's cached arrays (all its parts) are loaded into RAM when they "
        "fit in this many MB (held as stored, float16 by default), else streamed from the "
        "file in shuffled chunks. Small, so that memory does not grow with the data set; "
        "raise it where a streamed epoch is slower than training (see docs/cache.md).",
        min=0,
    )


@dataclass(frozen=True)
class RunConfig:
    dir: str = _opt("runs/demo", "Run directory: cache, block weights, student and report.")
    seed: int = _opt(0, "Seed of data splits, weight initialisation and shuffling.", min=0)
    threads: int = _opt(
        0,
        "TensorFlow intra-op threads per worker rank; 0 divides the node's cores among "
        "the worker ranks.",
        min=0,
    )
    memory_budget_mb: int = _opt(
        0,
        "Memory per rank in MB; 0 shares the node's memory (the least of the machine's, the "
        "cgroup's limit and Slurm's --mem) among the ranks on it. A job whose estimate "
        "exceeds it is refused before it reads its data, with the options.",
        min=0,
    )


@dataclass(frozen=True)
class GateConfig:
    max_accuracy_drop: float = _opt(
        1.0,
        "Quality gate: the largest teacher minus fine-tuned student test accuracy allowed, "
        "as a fraction (0.01: one point); 1 sets no bar. A student that misses any bar "
        "keeps its report and files, and the job exits 3.",
        min=0.0, max=1.0)
    min_param_reduction: float = _opt(
        0.0,
        "Quality gate: the least share of the teacher's parameters the student must save "
        "(0.5: half as many); 0 sets no bar.",
        min=0.0, max=1.0)
    max_latency_ratio: float = _opt(
        0.0,
        "Quality gate: the largest student/teacher latency ratio allowed at every batch "
        "size measured (report `deployment`, Keras on the CPU); 0 sets no bar.",
        min=0.0)
    allow_problems: bool = _opt(
        False,
        "Whether a run whose student was made but a later step failed (an export, a "
        "latency figure, a picture: report.json `problems`) exits 0 instead of 4.")


@dataclass(frozen=True)
class Job:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    accept: AcceptConfig = field(default_factory=AcceptConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    run: RunConfig = field(default_factory=RunConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def to_dict(self) -> dict:
        return {
            section.name: {
                f.name: _plain(getattr(getattr(self, section.name), f.name))
                for f in dataclasses.fields(getattr(self, section.name))
            }
            for section in dataclasses.fields(self)
        }


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Job)}

def load_job(path: str | Path | None, overrides: typing.Sequence[str] = (), run_dir=None) -> Job:
    """Read a TOML job file and apply overrides. Without a file, the defaults are the
    built-in demo job (jobs/demo.toml spells them out), so it needs no file on disk."""
    raw, source = {}, "the built-in demo job"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise UserError(f"Cannot read the job file {source!r}: {exc.strerror}.") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"The job file {source!r} is not valid TOML: {exc}.") from None
        _absolute_paths(raw, Path(path).resolve().parent)
    given: dict = {}  # the command line's values: paths relative to the current directory
    for item in overrides:
        _apply_override(given, item)
    if run_dir is not None:
        given.setdefault("run", {})["dir"] = str(run_dir)
    for section, values in given.items():
        if section in raw and not isinstance(raw[section], dict):
            raise UserError(f"[{section}] in {source} must be a table to take --set "
                            f"{section}.{next(iter(values))}.")
        raw.setdefault(section, {}).update(values)
    _absolute_paths(raw, Path.cwd())
    job = job_from_dict(raw, source=source)
    if "dir" not in raw.get("run", {}):  # the default run directory, under the current one
        job = dataclasses.replace(job, run=dataclasses.replace(
            job.run, dir=str(Path.cwd() / job.run.dir)))
    validate_job(job)
    return job


# Keys naming files or folders, and the names that are not paths.
PATH_KEYS = {("teacher", "source"): ("vgg_demo", "vgg_deep"), ("data", "source"): ("demo",),
             ("run", "dir"): ()}


def _absolute_paths(raw: dict, base: Path) -> None:
    """Relative paths in `raw` made absolute against `base`: a job file's paths against
    its folder (the job runs the same from anywhere), the command line's against the
    current directory. The run's job.toml then holds absolute paths."""
    for (section, key), names in PATH_KEYS.items():
        value = raw.get(section, {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and value and value not in names \
                and not Path(value).expanduser().is_absolute():
            raw[section][key] = os.path.normpath(base / value)
        elif isinstance(value, str) and value.startswith("~"):
            raw[section][key] = str(Path(value).expanduser())


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise UserError(
            f"Expected --set section.key=value (for example --set distill.epochs=3), "
            f"received {item!r}."
        )
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # bare words such as paths need no quotes on the command line
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise UserError(f"[{parts[0]}] in the job file must be a table to take --set {key}.")
    section[parts[1]] = value


def job_from_dict(raw: dict, source: str = "<job>") -> Job:
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise UserError(f"Unknown section [{name}] in {source}.{_suggest(name, SECTIONS)}")
        if not isinstance(value, dict):
            raise UserError(f"[{name}] in {source} must be a table, received {value!r}.")
        sections[name] = _build_section(name, SECTIONS[name], value, source)
    return Job(**sections)


def _build_section(name: str, cls, values: dict, source: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(
                f"Unknown key {name}.{key} in {source}.{_suggest(key, fields)} "
                f"Valid keys of [{name}]: {', '.join(fields)}."
            )
        kwargs[key] = _check_value(f"{name}.{key}", hints[key], fields[key].metadata, value)
    return cls(**kwargs)


def _check_value(key: str, hint, meta, value):
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key} expects true or false, received {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} expects an integer, received {value!r}.")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} expects a number, received {value!r}.")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise UserError(f"{key} expects a string, received {value!r}.")
    elif typing.get_origin(hint) is tuple:
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, list) or not all(
            isinstance(v, item_type) and not isinstance(v, bool) for v in value
        ):
            raise UserError(
                f"{key} expects a list of {item_type.__name__}, received {value!r}."
            )
        value = tuple(value)
    if meta.get("choices") and value not in meta["choices"]:
        raise UserError(
            f"{key} expects one of {', '.join(map(repr, meta['choices']))}, received {value!r}."
        )
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low or high is not None and value > high:
        bounds = " and ".join(
            part for part in (low is not None and f">= {low}", high is not None and f"<= {high}")
            if part
        )
        raise UserError(f"{key} expects a value {bounds}, received {value!r}.")
    return value


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def validate_job(job: Job) -> None:
    """Checks that span several keys; single keys are checked as they are read."""
    if len(job.data.image_size) != 2 or min(job.data.image_size) < 8:
        raise UserError(
            f"data.image_size expects [height, width], each at least 8, "
            f"received {list(job.data.image_size)!r}."
        )
    if job.data.kind == "sequences":
        _check_sequences(job)
    if not job.student.latency_batches or min(job.student.latency_batches) < 1:
        raise UserError(f"student.latency_batches expects a list of batch sizes, each at "
                        f"least 1, received {list(job.student.latency_batches)!r}.")
    if job.teacher.source in ("vgg_demo", "vgg_deep") and not job.teacher.widths:
        raise UserError(f"teacher.widths expects at least one conv width for "
                        f"{job.teacher.source}.")
    for item in job.blocks.explicit:
        first, sep, last = item.partition(":")
        if not (sep and first and last):
            raise UserError(
                f"blocks.explicit expects entries \"first_layer:last_layer\", received {item!r}."
            )
    for item in job.student.family_overrides:
        pattern, sep, family = item.partition("=")
        if not (sep and pattern.strip()) or family.strip() not in STUDENT_FAMILIES:
            raise UserError(
                f"student.family_overrides expects entries \"pattern=family\" with family "
                f"{', '.join(STUDENT_FAMILIES)}, received {item!r}."
            )
    for item in job.schedule.split_blocks:
        pattern, sep, ways = item.partition("=")
        if not (sep and pattern.strip() and ways.strip().isdigit() and int(ways) >= 2):
            raise UserError(
                f"schedule.split_blocks expects entries \"pattern=k\" with k an integer >= 2, "
                f"received {item!r}."
            )
    if job.distill.chained_epochs and job.cache.mode == "recompute":
        raise UserError(
            "distill.chained_epochs expects the activation cache (the chained pass reads the "
            "teacher's targets from it), received cache.mode = \"recompute\"; set "
            "cache.mode = \"cache\" or distill.chained_epochs = 0."
        )
    if any(w < 1 for w in job.teacher.widths):
        raise UserError(f"teacher.widths expects positive integers, received {job.teacher.widths!r}.")


def _check_sequences(job: Job) -> None:
    """Sequences come from the user's arrays, for the user's Conv1D teacher."""
    if Path(job.data.source).suffix not in (".npz", ".h5", ".hdf5"):
        raise UserError(
            f"data.kind = \"sequences\" expects data.source to be an .npz or HDF5 file with "
            f"x_train of shape (N, steps, channels), received {job.data.source!r}."
        )
    if job.teacher.source in ("vgg_demo", "vgg_deep"):
        raise UserError(
            f"data.kind = \"sequences\" expects teacher.source to be your Conv1D model "
            f"(.keras or .h5), received the built-in image teacher {job.teacher.source!r}."
        )
    if job.cache.views:
        raise UserError(
            f"cache.views expects 0 for data.kind = \"sequences\" (flips, crops and colour "
            f"jitter are image augmentations), received {job.cache.views}."
        )


def render_job_docs() -> str:
    """docs/job-file.md, from the field table above (a test keeps the file in step)."""
    lines = [
        "# Job file reference",
        "",
        "A job is a TOML file with the sections below; every key is optional and defaults to",
        "the built-in demo job (`jobs/demo.toml` spells the defaults out). Any key can be",
        "overridden on the command line with `--set section.key=value`, and `--run-dir DIR`",
        "sets `run.dir`. Unknown keys, wrong types and out-of-range values are refused before",
        "anything runs, with the closest valid key suggested. This page is generated from",
        "`pbkd_mpi/config.py` (`python -m pbkd_mpi.config > docs/job-file.md`).",
    ]
    job = Job()
    for section in dataclasses.fields(Job):
        cls = SECTIONS[section.name]
        hints = typing.get_type_hints(cls)
        lines += ["", f"## [{section.name}]", "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            type_name = (f"list of {typing.get_args(hint)[0].__name__}"
                         if typing.get_origin(hint) is tuple else hint.__name__)
            constraints = []
            if f.metadata.get("choices"):
                constraints.append("one of " + ", ".join(f"`{c}`" for c in f.metadata["choices"]))
            if f.metadata.get("min") is not None:
                constraints.append(f">= {f.metadata['min']}")
            if f.metadata.get("max") is not None:
                constraints.append(f"<= {f.metadata['max']}")
            default = _plain(getattr(getattr(job, section.name), f.name))
            help_text = f.metadata["help"] + (f" ({'; '.join(constraints)})" if constraints else "")
            lines.append(f"| `{f.name}` | {type_name} | `{json.dumps(default)}` | {help_text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_job_docs(), end="")
