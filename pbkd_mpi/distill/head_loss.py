"""The last replaced block also learns the teacher's predictions (`distill.head_weight`).

Block training weighs every element of a block's output alike, but the classifier reads
the last block's output through pooling and a linear layer: what it sees is a small part
of that error, and a student block with few parameters spends them on the rest. For the
last replaced block, every layer after it in the student is the teacher's own (no replaced
block follows), so the teacher's head, frozen, maps the block's output to exactly the
student's logits. In the chained pass that block's loss adds Hinton distillation between
the head applied to the student block's output and the head applied to the cached teacher
target (the teacher's logits, with nothing new cached or read), at the fine-tuning
temperature and scaled by T^2, to the MSE. On the demo this raised the merged student's
test accuracy from 0.784 (MSE alone, same epochs) to 0.806 (docs/usage.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pbkd_mpi.model.graph import boundary_tensor
from pbkd_mpi.model.logits import final_affine, logit_boundary


@dataclass(frozen=True, eq=False)  # holds arrays: identity, not value, equality
class HeadLoss:
    """The teacher's head after one block, and how much its distillation loss weighs.
    Travels with the block task to a worker, which has no teacher."""

    head_json: str  # block output -> the tensor the logits are computed from
    head_weights: tuple
    kernel: np.ndarray | None  # the final softmax Dense's affine part, when it has one
    bias: np.ndarray | None
    weight: float
    temperature: float

    def key(self) -> dict:
        """What a result trained with it depends on, besides the teacher (whose weights
        the cache fingerprint covers)."""
        return {"weight": self.weight, "temperature": self.temperature}

    def logits_function(self):
        """activation at the block's output -> the teacher's logits from there on."""
        import keras
        from keras import ops

        head = keras.models.model_from_json(self.head_json)
        head.set_weights(list(self.head_weights))
        head.trainable = False
        kernel, bias = self.kernel, self.bias

        def logits(activation):
            out = head(activation, training=False)
            if kernel is not None:
                out = ops.matmul(out, kernel)
                if bias is not None:
                    out = out + bias
            return out

        return logits

    def keras_loss(self):
        """MSE plus `weight` times T^2 times KL(teacher's softened predictions || the
        student block's), both through the frozen head."""
        from keras import ops

        logits = self.logits_function()
        weight, temperature = self.weight, self.temperature

        def loss(y_true, y_pred):
            mse = ops.mean(ops.square(y_true - y_pred))
            teacher = ops.log_softmax(logits(y_true) / temperature)
            student = ops.log_softmax(logits(y_pred) / temperature)
            kl = ops.sum(ops.exp(teacher) * (teacher - student), axis=-1)
            return mse + weight * temperature ** 2 * ops.mean(kl)

        return loss


def cut_head(teacher, block_output: str, weight: float, temperature: float) -> HeadLoss | None:
    """The teacher's layers from `block_output` (a layer name) to its logits, or None when
    they cannot be cut off on their own (they also read a tensor from before the block, as
    a skip connection would), cannot be rebuilt from their description, or there are
    none."""
    import keras

    end = logit_boundary(teacher)
    if weight <= 0 or end == block_output:
        return None
    try:
        head = keras.Model(boundary_tensor(teacher, block_output),
                           teacher.get_layer(end).output)
        description = head.to_json()
        # Rebuilt as the worker will: a custom layer Keras cannot rebuild fails here.
        keras.models.model_from_json(description)
    except (ValueError, TypeError):  # "graph disconnected": it needs more than the block's
        return None                  # output; or a layer that does not serialise
    kernel, bias = final_affine(teacher) or (None, None)
    return HeadLoss(description, tuple(np.asarray(w) for w in head.get_weights()), kernel,
                    bias, float(weight), float(temperature))
