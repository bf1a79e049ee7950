"""Data-parallel training of a small CNN with BatchNormalization, for tests/mpi/test_data_parallel.py.

    mpiexec -n RANKS python tests/mpi/data_parallel_driver.py OUT.json [ce|mse]

`ce` trains a classifier on the generated shapes (cross-entropy, validation accuracy through
`evaluate_sums`); `mse` regresses a fixed random conv's output (what block training does).
Rank 0 writes the weight digests of every rank, the per-epoch losses and the final metric.
"""

import hashlib
import json
import sys

import numpy as np
from mpi4py import MPI

from pbkd_mpi.mpi.collectives import gather_objects
from pbkd_mpi.mpi.devices import configure_tensorflow


def digest(model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


class Data:
    def __init__(self, **arrays):
        self.__dict__.update(arrays)


def quadrant_data(rng, n_train=1200, n_val=300, size=12):
    """Noise images whose class is the quadrant holding a faint bright square: learnable in
    a few epochs by a tiny CNN, but not in one step."""
    def make(n):
        y = rng.integers(0, 4, n)
        x = rng.normal(0.0, 1.0, (n, size, size, 3)).astype(np.float32)
        h = size // 2
        for i, label in enumerate(y):
            r, c = (label // 2) * h, (label % 2) * h
            x[i, r + 1:r + h - 1, c + 1:c + h - 1, :] += 0.3
        return x, y
    x_train, y_train = make(n_train)
    x_val, y_val = make(n_val)
    return Data(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, num_classes=4,
                image_shape=(size, size, 3))


def main():
    comm = MPI.COMM_WORLD
    out, mode = sys.argv[1], sys.argv[2]
    configure_tensorflow(1, comm.Get_rank(), 1, use_gpu=False)
    import keras

    from pbkd_mpi.mpi.data_parallel import fit, sparse_accuracy_sums

    data = quadrant_data(np.random.default_rng(0))
    # A different seed per rank: the trainer's broadcast must make the start identical.
    keras.utils.set_random_seed(100 + comm.Get_rank())
    if mode == "ce":
        model = keras.Sequential([
            keras.Input(data.image_shape),
            keras.layers.Conv2D(8, 3, padding="same"), keras.layers.BatchNormalization(),
            keras.layers.ReLU(), keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(16, 3, padding="same"), keras.layers.BatchNormalization(),
            keras.layers.ReLU(), keras.layers.Flatten(),
            keras.layers.Dense(data.num_classes),
        ])
        loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        x, targets = data.x_train, (data.y_train,)

        def loss_fn(outputs, targets):
            return loss_object(targets[0], outputs)

        def metric(trainer):
            correct, count = trainer.evaluate_sums(sparse_accuracy_sums,
                                                   [data.x_val, data.y_val])
            return correct / count
    else:
        keras.utils.set_random_seed(7)  # the target conv is the same on every rank
        target = keras.Sequential([keras.Input(data.image_shape),
                                   keras.layers.Conv2D(6, 3, padding="same", activation="relu")])
        keras.utils.set_random_seed(100 + comm.Get_rank())
        model = keras.Sequential([
            keras.Input(data.image_shape),
            keras.layers.SeparableConv2D(6, 3, padding="same"),
            keras.layers.BatchNormalization(), keras.layers.ReLU(),
        ])
        y_train = np.asarray(target.predict(data.x_train, verbose=0))
        y_val = np.asarray(target.predict(data.x_val, verbose=0))
        x, targets = data.x_train, (y_train,)

        def loss_fn(outputs, targets):
            return keras.ops.mean(keras.ops.square(outputs - targets[0]))

        def metric(trainer):
            sse, count = trainer.evaluate_sums(
                lambda m, xb, yb: [float(np.sum((np.asarray(m(xb, training=False)) - yb) ** 2)),
                                   float(yb.size)], [data.x_val, y_val])
            return sse / count

    metrics = []
    history = fit(model, x, targets, loss_fn, keras.optimizers.Adam(float(sys.argv[4]) if len(sys.argv) > 4 else 1e-2), comm,
                  epochs=int(sys.argv[3]) if len(sys.argv) > 3 else 5, batch_size=64, seed=5,
                  on_epoch_end=lambda trainer, stats: metrics.append(metric(trainer)) and False)
    digests = gather_objects(comm, digest(model))
    if comm.Get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"digests": digests, "losses": [s.loss for s in history],
                       "metric": metrics, "seconds": [s.seconds for s in history],
                       "local_samples": [s.local_samples for s in history]}, f)


if __name__ == "__main__":
    main()
