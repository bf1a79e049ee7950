"""A real user's setting, made here: a class-sorted photo folder and a teacher trained the
way Keras' image-classification tutorial teaches, then the job file to distil it.

    python benchmarks/user_folder.py OUT [--train 16000 --test 4000 --size 32 --epochs 10]
    mpirun -np 3 python -m pbkd_mpi run OUT/job.toml
    python -m pbkd_mpi baselines OUT/run --budget-factor 1

The folder is `OUT/photos/{train,test}/<class>/*.png` (the shapes of the built-in demo,
written by data/demo.write_image_folder), read by keras.utils.image_dataset_from_directory;
the teacher (`OUT/teacher.keras`) has Rescaling, RandomFlip and RandomTranslation
inside, a VGG-style body of 8 convs with BN, SpatialDropout2D and Dropout,
as users write it. Prints one JSON object: the teacher's test accuracy, its parameters and
the seconds each step took.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pbkd_mpi.data.demo import write_image_folder
from pbkd_mpi.mpi.devices import import_tensorflow

JOB = """\
[teacher]
source = "teacher.keras"

[data]
source = "photos"
image_size = [{size}, {size}]
scale = "none"                   # the teacher rescales inside

[run]
dir = "run"
"""


def tutorial_teacher(size: int, classes: int):
    """Keras' tutorial CNN, deeper: augmentation and rescaling inside the model."""
    import keras
    from keras import layers

    augment = keras.Sequential([layers.RandomFlip("horizontal"),
                                layers.RandomTranslation(0.05, 0.05)], name="augmentation")
    inputs = keras.Input((size, size, 3))
    x = layers.Rescaling(1 / 255.0)(augment(inputs))
    for stage, width in enumerate((16, 32, 64, 64)):
        for _ in range(2):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
        if stage < 3:
            x = layers.MaxPooling2D()(x)
            x = layers.SpatialDropout2D(0.05)(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    return keras.Model(inputs, layers.Dense(classes, activation="softmax")(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=16000)
    parser.add_argument("--test", type=int, default=4000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out)
    figures = {}
    started = time.perf_counter()
    if not (out / "photos" / "test").is_dir():
        write_image_folder(out / "photos", args.train, args.test, (args.size, args.size),
                           classes=args.classes)
    figures["folder_s"] = time.perf_counter() - started
    import_tensorflow()
    import keras

    load = dict(image_size=(args.size, args.size), batch_size=32, seed=0)
    train, val = keras.utils.image_dataset_from_directory(
        out / "photos" / "train", validation_split=0.1, subset="both", **load)
    test = keras.utils.image_dataset_from_directory(out / "photos" / "test", shuffle=False,
                                                    **load)
    keras.utils.set_random_seed(0)
    teacher = tutorial_teacher(args.size, len(train.class_names))
    teacher.compile(optimizer=keras.optimizers.Adam(1e-3),
                    loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    teacher.fit(train, validation_data=val, epochs=args.epochs, verbose=2)
    figures["teacher_train_s"] = time.perf_counter() - started
    teacher.save(out / "teacher.keras")
    (out / "job.toml").write_text(JOB.format(size=args.size))
    figures.update(teacher_params=int(teacher.count_params()),
                   teacher_test_accuracy=float(teacher.evaluate(test, verbose=0)[1]),
                   train=args.train, test=args.test, size=args.size)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
