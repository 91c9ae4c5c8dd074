"""Training input: batches streamed from the memory-mapped arrays through ``tf.data``, augmented on the fly.

Every random draw of an epoch (the order of its cells, each cell's flips and colour jitter) is
a stateless function of ``(seed, epoch)``: the same epoch gives the same batches in any process,
so a resumed run trains on exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from modules import config
from modules.modeling.network import MASK_OUTPUT, PROB_OUTPUT, cell_pixels


def balanced_class_weights(labels: np.ndarray) -> dict[int, float]:
    """Weights n / (2 n_c) so that both classes weigh the same in the loss."""
    counts = np.bincount(labels.astype(int), minlength=2)
    return {c: float(len(labels) / (2 * counts[c])) for c in (0, 1)}


def cell_weights(labels: np.ndarray, rows: np.ndarray, balance_classes: bool = True) -> np.ndarray:
    """Loss weight of every row of the arrays (0 outside ``rows``), mean 1 over ``rows``; with ``balance_classes``
    both classes weigh the same in total (``balanced_class_weights``)."""
    rows = np.asarray(rows, dtype="int64")
    weights = np.zeros(len(labels), "float64")
    weights[rows] = 1.0
    row_labels = np.asarray(labels).astype(int)[rows]
    if balance_classes:
        for label in (0, 1):
            chosen = rows[row_labels == label]
            if len(chosen):
                weights[chosen] *= len(rows) / (2 * weights[chosen].sum())
    weights[rows] *= len(rows) / weights[rows].sum()
    return weights.astype("float32")


#: Uniform numbers each training cell draws per epoch: three flips, then the colour jitter's hue angle, saturation,
#: contrast and gain.
AUGMENT_DRAWS = 7
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], "float32")
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype("float32")


def augment_batch(images: tf.Tensor, masks: tf.Tensor, draws: tf.Tensor,
                  colour: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
    """Randomly flip and rotate (by 90°) each (B, S, S, 3) 0-255 image with its mask; jitter the cell's colour.

    ``draws`` (B, ``AUGMENT_DRAWS``) uniform numbers in [0, 1), one row per cell, decide its flips and jitter: the
    same draws give the same augmentation. The colour jitter mimics stain and lighting differences between
    patients and touches only the cell (the black background stays): gain, contrast, saturation and a hue rotation in
    YIQ space (``colour=False``: none).
    """
    batch = tf.shape(images)[0]

    def uniform(column: int, low: float, high: float, shape: tuple[int, ...] = ()) -> tf.Tensor:
        return tf.reshape(low + (high - low) * draws[:, column], [batch, *shape])

    stacked = tf.concat([images, masks], axis=-1)
    # A transpose and two flips, each drawn per cell, give all 8 flips/90° rotations of a square.
    for column, flip in enumerate((lambda t: tf.transpose(t, [0, 2, 1, 3]), lambda t: tf.reverse(t, axis=[1]),
                                   lambda t: tf.reverse(t, axis=[2]))):
        stacked = tf.where(uniform(column, 0.0, 1.0, (1, 1, 1)) < 0.5, flip(stacked), stacked)
    images, masks = stacked[..., :3], stacked[..., 3:]
    if not colour:
        return images, masks
    # The cell's pixels from the image itself: the target mask may be the nucleus only.
    cell = cell_pixels(images)
    angle, saturation = uniform(3, -0.15, 0.15), uniform(4, 0.8, 1.2)
    cos, sin, zeros, ones = saturation * tf.cos(angle), saturation * tf.sin(angle), tf.zeros([batch]), tf.ones([batch])
    # (B, 3, 3): Y kept, the chroma plane (I, Q) rotated by the angle and scaled by the saturation.
    rotate = tf.reshape(tf.stack([ones, zeros, zeros, zeros, cos, -sin, zeros, sin, cos], -1), [-1, 3, 3])
    matrix = tf.einsum("ij,bjk,kl->bil", _YIQ_TO_RGB, rotate, _RGB_TO_YIQ)
    jittered = tf.einsum("bhwc,bdc->bhwd", images, matrix)
    area = tf.maximum(tf.reduce_sum(tf.cast(cell, tf.float32), axis=[1, 2, 3], keepdims=True), 1.0)
    mean = tf.reduce_sum(tf.where(cell, jittered, 0.0), axis=[1, 2], keepdims=True) / area
    contrast, gain = uniform(5, 0.8, 1.2, (1, 1, 1)), uniform(6, 0.8, 1.2, (1, 1, 1))
    jittered = ((jittered - mean) * contrast + mean) * gain
    return tf.where(cell, tf.clip_by_value(jittered, 0.0, 255.0), images), masks


def make_dataset(images: np.ndarray, masks: np.ndarray, labels: np.ndarray, indices: np.ndarray, batch_size: int,
                 training: bool, seed: int = config.DEFAULT_SEED, weights: np.ndarray | None = None,
                 segmentation: bool = True, augment: bool = True, epochs: range = range(1)) -> tf.data.Dataset:
    """Stream ``(image, targets, sample_weights)`` batches of the ``indices`` rows of the (memory-mapped) arrays.

    ``images`` (N, S, S, 3) uint8, ``masks`` (N, S, S) 0/1, ``labels`` (N,); ``batch_size`` is global (across
    replicas). Class weights (``cell_weights``; None: all ones) travel as per-cell sample weights on
    ``p_leukemia``: Keras' ``class_weight`` does not apply to models with dict outputs. ``segmentation`` adds the
    ``cell_mask`` target. A training dataset streams the batches of every epoch in ``epochs`` (from 0; a resumed
    run starts later) one after the other (fit it with ``steps_per_epoch=count_batches(len(indices), batch_size)``);
    epoch ``e`` shuffles and augments (``augment``) with stateless
    draws seeded by ``(seed, e)``, the same in every process.
    """
    size = int(images.shape[1])
    row_weights = np.ones(len(labels), "float32") if weights is None else np.asarray(weights, "float32")

    def load(rows: np.ndarray):
        rows = np.sort(rows)  # ascending rows read a memory map sequentially
        return images[rows], masks[rows], labels[rows].astype("int32"), row_weights[rows]

    def to_example(rows, draws):
        image, mask, label, weight = tf.numpy_function(load, [rows], [tf.uint8, tf.uint8, tf.int32, tf.float32])
        image = tf.cast(tf.ensure_shape(image, [None, size, size, 3]), tf.float32)
        mask = tf.cast(tf.ensure_shape(mask, [None, size, size]), tf.float32)[..., None]
        if training and augment:
            image, mask = augment_batch(image, mask, draws)
        weight = tf.ensure_shape(weight, [None])
        targets = {PROB_OUTPUT: tf.cast(tf.ensure_shape(label, [None]), tf.float32)[:, None]}
        sample_weights = {PROB_OUTPUT: weight}
        if segmentation:
            targets[MASK_OUTPUT] = mask
            sample_weights[MASK_OUTPUT] = tf.ones_like(weight)[:, None, None]  # broadcasts over the per-pixel loss
        return image, targets, sample_weights

    rows = np.asarray(indices, dtype="int64")

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        # The cells' order and their draws depend on (seed, epoch) only, never on how often the
        # dataset was iterated before (a resumed run's dataset starts at its next epoch).
        key = tf.stack([tf.constant(seed, tf.int64), epoch])
        order = tf.random.experimental.stateless_shuffle(rows, seed=key)
        draws = tf.random.stateless_uniform([len(rows), AUGMENT_DRAWS],
                                            seed=tf.random.experimental.stateless_fold_in(key, 1))
        return tf.data.Dataset.from_tensor_slices((order, draws)).batch(batch_size)

    if training:
        dataset = tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(epoch_batches)
    else:
        dataset = tf.data.Dataset.from_tensor_slices((rows, np.zeros((len(rows), AUGMENT_DRAWS), "float32")))
        dataset = dataset.batch(batch_size)
    options = tf.data.Options()
    options.deterministic = True  # parallel maps hand their batches on in order
    return dataset.with_options(options).map(to_example, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def count_batches(count: int, batch_size: int) -> int:
    """Batches of one epoch over ``count`` cells (the last one may be smaller)."""
    return -(-int(count) // int(batch_size))
