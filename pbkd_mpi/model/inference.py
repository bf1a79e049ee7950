"""The inference copy of a model: the same graph without the layers that only act in
training.

Users train their teachers the way Keras' examples teach, with random augmentation
(`RandomFlip`, `RandomTranslation`, ...), `Dropout` and noise layers inside the model. At
inference each is the identity, but it stays in the graph: TFLite has no kernel for the
random ops behind augmentation (`StatelessRandomUniformV2`, `ImageProjectiveTransformV3`:
the conversion of such a student failed and ended the run), and every such layer is one
more pass over its tensor in Keras. The deployed student and the teacher it is timed
against are these copies; the trainable graph (RUN/student-assembled.keras) keeps the
layers, since fine-tuning and the baselines train with them.

A layer is left out only when its class is one of Keras' training-only layers (by name, so
layers a Keras version lacks are simply not looked for) *and* a probe shows it returns its
input unchanged at inference (RandomCrop, for one, crops at inference: it stays).
"""

from __future__ import annotations

import keras
import numpy as np

from pbkd_mpi.model.graph import copied_graph, flatten_model, graph_nodes

TRAINING_ONLY = (
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "AlphaDropout",
    "GaussianDropout", "GaussianNoise", "ActivityRegularization", "AugMix", "CutMix",
    "MixUp", "RandAugment", "RandomBrightness", "RandomColorDegeneration",
    "RandomColorJitter", "RandomContrast", "RandomCrop", "RandomElasticTransform",
    "RandomErasing", "RandomFlip", "RandomGaussianBlur", "RandomGrayscale", "RandomHue",
    "RandomInvert", "RandomPerspective", "RandomPosterization", "RandomRotation",
    "RandomSaturation", "RandomSharpness", "RandomShear", "RandomTranslation", "RandomZoom",
)
_CLASSES = tuple(cls for cls in (getattr(keras.layers, name, None) for name in TRAINING_ONLY)
                 if isinstance(cls, type))
PROBE_SAMPLES = 2


def identity_at_inference(layer, input_shape, seed: int = 0) -> bool:
    """Whether `layer` returns a random probe of `input_shape` (batch axis first, None
    allowed there) unchanged when called with training=False."""
    shape = (PROBE_SAMPLES, *input_shape[1:])
    if any(size is None for size in shape):
        return False
    # Pixels in 0-255 and values around 0 alike: augmentation often comes before Rescaling.
    probe = np.random.default_rng(seed).uniform(0.0, 255.0, shape).astype(np.float32)
    output = np.asarray(layer(probe, training=False))
    # Compared in the layer's own dtype: under mixed_float16 the output is a float16 cast.
    return output.shape == probe.shape and np.array_equal(output, probe.astype(output.dtype))


def inference_copy(model) -> tuple[keras.Model, list[str]]:
    """(the model without its training-only layers, the names of the layers left out). The
    model itself, unchanged, when it has none. The copy's other layers are copies with the
    same weights: it computes what the model computes with training=False."""
    model = flatten_model(model)
    removable = set()
    # The model's own nodes, not the layer's: a layer also called outside this model (the
    # teacher's head reused in distillation) has more nodes than this graph holds.
    for node in graph_nodes(model):
        layer = node.operation
        if isinstance(layer, _CLASSES) and len(node.input_tensors) == 1 and \
                identity_at_inference(layer, tuple(node.input_tensors[0].shape)):
            removable.add(layer.name)
    if not removable:
        return model, []

    # Copies, not the model's layers: a second call of a layer would give it a second
    # node, which the graph code reading `_inbound_nodes[0]` of the teacher must never meet.
    copy = copied_graph(model, skip=removable)
    return copy, [layer.name for layer in model.layers if layer.name in removable]
