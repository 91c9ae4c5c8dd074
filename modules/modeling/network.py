"""The ANNa network: a U-Net that segments the cell with a head that classifies it. It takes uint8-valued RGB (rescaled
inside) and returns a dict of float32 ``p_leukemia`` (N, 1) and, with segmentation, ``cell_mask`` (N, S, S, 1).

Built-in layers plus registered ones (``CellStandardization``, ``CentredLogit``), so a ``.keras``
file loads in safe mode."""
from __future__ import annotations

import keras
import numpy as np
from keras import layers

from modules import config

PROB_OUTPUT = "p_leukemia"
MASK_OUTPUT = "cell_mask"
ARCHITECTURES = ("anna", "legacy")
_MODEL = config.ModelSettings()


def cell_pixels(images, background_threshold: int = config.BACKGROUND_THRESHOLD):
    """(B, S, S, 1) bool: the pixels of the cell, those with a channel above the black background's level."""
    return keras.ops.max(images, axis=-1, keepdims=True) > background_threshold


@keras.saving.register_keras_serializable(package="anna")
class CellStandardization(layers.Layer):
    """Each channel of each cell to zero mean and unit variance over the cell's own pixels, 0 on its background.

    A per-cell stain normalization (Reinhard's, in RGB): a subject's stronger or paler stain shifts and scales
    the colours of all its cells, which this removes, while the contrasts inside the cell (chromatin, nucleus
    against cytoplasm) stay. ``epsilon`` (grey levels) keeps a flat cell from being amplified.
    """

    def __init__(self, background_threshold: int = config.BACKGROUND_THRESHOLD, epsilon: float = 4.0, **kwargs):
        super().__init__(**kwargs)
        self.background_threshold, self.epsilon = int(background_threshold), float(epsilon)

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")  # sums over a cell stay exact under mixed precision
        cell = keras.ops.cast(cell_pixels(x, self.background_threshold), "float32")
        area = keras.ops.maximum(keras.ops.sum(cell, axis=(1, 2), keepdims=True), 1.0)
        mean = keras.ops.sum(x * cell, axis=(1, 2), keepdims=True) / area
        centred = (x - mean) * cell
        variance = keras.ops.sum(keras.ops.square(centred), axis=(1, 2), keepdims=True) / area
        return keras.ops.cast(centred / keras.ops.sqrt(variance + self.epsilon ** 2), self.compute_dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "background_threshold": self.background_threshold, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="anna")
class CentredLogit(layers.Layer):
    """``logit(p) - logit(threshold)``: a member's score, 0 at its own threshold."""

    def __init__(self, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.threshold = float(threshold)

    def call(self, p):
        p = keras.ops.clip(keras.ops.cast(p, "float32"), 1e-6, 1 - 1e-6)
        t = float(np.clip(self.threshold, 1e-6, 1 - 1e-6))
        return keras.ops.log(p / (1 - p)) - float(np.log(t / (1 - t)))

    def get_config(self) -> dict:
        return {**super().get_config(), "threshold": self.threshold}


def _conv(x, filters: int, batch_norm: bool | str, name: str, suffix: str = "", strides: int = 1):
    """A 3x3 convolution, normalized (True: batch, "instance": per image and channel, False: not), then ReLU."""
    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=not batch_norm,
                      kernel_initializer="he_normal", name=f"{name}_conv{suffix}")(x)
    if batch_norm == "instance":
        x = layers.GroupNormalization(groups=-1, name=f"{name}_in{suffix}")(x)
    elif batch_norm:
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{suffix}")(x)
    return layers.Activation("relu", name=f"{name}_relu{suffix}")(x)


def _conv_block(x, filters: int, batch_norm: bool | str, name: str):
    """Two ``_conv``."""
    return _conv(_conv(x, filters, batch_norm, name, "1"), filters, batch_norm, name, "2")


def build_anna(input_shape: tuple[int, int, int] = (_MODEL.image_size, _MODEL.image_size, 3),
               depth: int = _MODEL.depth, base_filters: int = _MODEL.base_filters,
               batch_norm: bool | str = _MODEL.batch_norm, dropout: float = _MODEL.dropout,
               segmentation: bool = _MODEL.segmentation, head_units: int = _MODEL.head_units,
               input_transform: str = _MODEL.input_transform, stem_stride: int = _MODEL.stem_stride) -> keras.Model:
    """An uncompiled U-Net named ``anna`` whose head reads globally pooled features of every level.

    Global pooling keeps the head free of pixel positions. ``batch_norm="instance"`` normalizes each image
    alone, as at prediction time. ``input_transform="cell_standardized"`` feeds the convolutions each cell's
    colours standardized over its pixels (``CellStandardization``) instead of RGB scaled to [0, 1], so that a
    subject's stain strength counts less.
    ``stem_stride=2`` puts one strided convolution before the U-Net, which then works at half the input's side: a larger
    image for about the cost of a smaller one (the mask is upsampled back to the input's side).
    Raises ValueError unless the image size is divisible by ``stem_stride * 2**depth`` and the transform is known.
    """
    size, step = input_shape[0], stem_stride * 2 ** depth
    if depth < 1 or stem_stride < 1 or size % step:
        raise ValueError(f"image size {size} must be divisible by stem_stride * 2**depth = {step}")
    if input_transform not in config.INPUT_TRANSFORMS:
        raise ValueError(f"unknown input transform {input_transform!r}; use one of {config.INPUT_TRANSFORMS}")
    inputs = keras.Input(shape=input_shape, name="image")
    if input_transform == "cell_standardized":
        x = CellStandardization(name="cell_standardization")(inputs)
    else:
        x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    if stem_stride > 1:
        x = _conv(x, base_filters, batch_norm, "stem", strides=stem_stride)
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2 ** level, batch_norm, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = _conv_block(x, base_filters * 2 ** depth, batch_norm, "bottleneck")
    if dropout:
        x = layers.SpatialDropout2D(dropout, name="bottleneck_dropout")(x)
    bottleneck = x
    for level in reversed(range(depth)):
        filters = base_filters * 2 ** level
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"up{level}_deconv")(x)
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = _conv_block(x, filters, batch_norm, f"up{level}")
    decoder = x

    # Each encoder level pooled too: texture from the fine levels reaches the head directly.
    pooled = layers.Concatenate(name="head_features")([
        *[layers.GlobalAveragePooling2D(name=f"down{level}_avg")(skip) for level, skip in enumerate(skips)],
        layers.GlobalAveragePooling2D(name="bottleneck_avg")(bottleneck),
        layers.GlobalMaxPooling2D(name="bottleneck_max")(bottleneck),
        layers.GlobalAveragePooling2D(name="decoder_avg")(decoder),
    ])
    h = layers.Dropout(dropout, name="head_dropout1")(pooled) if dropout else pooled
    h = layers.Dense(head_units, activation="relu", name="head_dense")(h)
    h = layers.Dropout(dropout, name="head_dropout2")(h) if dropout else h
    # Outputs stay float32 under mixed precision: stable sigmoid/log-loss and float32 results.
    outputs = {PROB_OUTPUT: layers.Dense(1, activation="sigmoid", dtype="float32", name=PROB_OUTPUT)(h)}
    if segmentation:
        mask = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32",
                             name="mask_half" if stem_stride > 1 else MASK_OUTPUT)(decoder)
        outputs[MASK_OUTPUT] = mask if stem_stride == 1 else layers.UpSampling2D(
            stem_stride, interpolation="bilinear", dtype="float32", name=MASK_OUTPUT)(mask)
    return keras.Model(inputs, outputs, name="anna")


def build_legacy(input_shape: tuple[int, int, int] = (128, 128, 3)) -> keras.Model:
    """The older project's network (``legacy``), for comparison: a depth-4 U-Net of 4 base filters on unscaled
    BGR input, its map max-pooled, flattened and fed to dense layers 512-256-128 (dropout 0.5).

    A frozen 1x1 convolution swaps RGB to the BGR the old code fed, so callers still pass RGB.
    """
    size = input_shape[0]
    if size % 16:
        raise ValueError(f"image size {size} must be divisible by 16")
    inputs = keras.Input(shape=input_shape, name="image")
    swap = layers.Conv2D(3, 1, use_bias=False, trainable=False, name="rgb_to_bgr")
    x = swap(inputs)
    swap.set_weights([np.eye(3, dtype="float32")[::-1].reshape(1, 1, 3, 3)])
    skips = []
    for level in range(4):
        x = _conv_block(x, 4 * 2 ** level, False, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = _conv_block(x, 64, False, "bottleneck")
    for level in reversed(range(4)):
        x = layers.UpSampling2D(2, name=f"up{level}_upsample")(x)
        x = layers.Conv2D(4 * 2 ** level, 2, padding="same", activation="relu",
                          kernel_initializer="he_normal", name=f"up{level}_upconv")(x)
        x = layers.Concatenate(name=f"up{level}_concat")([skips[level], x])
        x = _conv_block(x, 4 * 2 ** level, False, f"up{level}")
    x = layers.Conv2D(1, 1, activation="sigmoid", name="unet_map")(x)
    x = layers.MaxPooling2D(2, name="map_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    for units in (512, 256, 128):
        x = layers.Dense(units, activation="relu", name=f"dense{units}")(x)
        x = layers.Dropout(0.5, name=f"dropout{units}")(x)
    output = layers.Dense(1, activation="sigmoid", dtype="float32", name=PROB_OUTPUT)(x)
    return keras.Model(inputs, {PROB_OUTPUT: output}, name="legacy")
