"""The ANNa network: a U-Net that segments the cell, with a head that classifies it.

Built with the Keras 3 Functional API from built-in layers only, so a saved ``.keras``
file loads with ``keras.saving.load_model(path, safe_mode=True)`` and no custom objects.
The model takes uint8-valued RGB images (rescaling to [0, 1] is inside) and returns a dict:
``p_leukemia`` (N, 1) and, with segmentation on, ``cell_mask`` (N, S, S, 1), both float32.

Also here: the older project's network (``build_legacy``) for comparison, the choice of
precision policy and ``tf.distribute`` strategy from the hardware, loading and prediction.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from modules import config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

MODEL_FILENAME = "model.keras"
PROB_OUTPUT = "p_leukemia"
MASK_OUTPUT = "cell_mask"
POLICIES = config.POLICIES
STRATEGIES = config.STRATEGIES
#: CPU flags that make bfloat16 matmuls/convolutions fast (without them bf16 is emulated, slower).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


class ModelFileError(ValueError):
    """A model file that is missing the Keras archive format or does not fit the data."""


# --------------------------------------------------------------------------- hardware
def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where ``/proc/cpuinfo`` is absent).

    Args:
        cpuinfo: Path of the cpuinfo file.

    Returns:
        The set of flag names.
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def select_policy(policy: str = "auto", cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """Pick the Keras dtype policy for this hardware.

    ``auto``: ``mixed_float16`` on a CUDA GPU, ``mixed_bfloat16`` on a CPU with native bf16
    (AMX or AVX512-BF16; without them bf16 is emulated and about 2x slower than float32),
    ``float32`` otherwise.

    Args:
        policy: ``auto`` or one of ``float32``, ``mixed_bfloat16``, ``mixed_float16``.
        cpuinfo: Where to read the CPU flags.

    Returns:
        The policy name.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown precision policy {policy!r}; use one of {', '.join(POLICIES)}")
    if policy != "auto":
        return policy
    if tf.config.list_physical_devices("GPU") and tf.test.is_built_with_cuda():
        return "mixed_float16"
    if cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS):
        return "mixed_bfloat16"
    return "float32"


@contextlib.contextmanager
def dtype_policy(policy: str) -> Iterator[str]:
    """Set the global Keras dtype policy inside a ``with`` block, restoring it after."""
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield policy
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _detect_tpu():  # pragma: no cover - only on a TPU host
    """A connected TPU cluster resolver, or None where there is no TPU."""
    if not (os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME")
            or tf.config.list_physical_devices("TPU") or Path("/dev/accel0").exists()):
        return None
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return resolver
    except (ValueError, RuntimeError, tf.errors.OpError):
        return None


def select_strategy(strategy: str | tf.distribute.Strategy = "auto") -> tf.distribute.Strategy:
    """Pick the ``tf.distribute`` strategy for this hardware.

    ``auto``: TPUStrategy on a (Colab) TPU, MirroredStrategy over several GPUs, the default
    strategy otherwise. ``mirrored`` mirrors over all GPUs, or over all logical CPU devices
    where there are no GPUs (used by the tests).

    Args:
        strategy: ``auto``, ``default``, ``mirrored``, ``tpu`` or a strategy object.

    Returns:
        The strategy.
    """
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if strategy in ("auto", "tpu"):
        resolver = _detect_tpu()
        if resolver is not None:
            return tf.distribute.TPUStrategy(resolver)
        if strategy == "tpu":
            raise RuntimeError("strategy 'tpu' asked for but no TPU was found")
    gpus = tf.config.list_logical_devices("GPU")
    if strategy == "mirrored" or (strategy == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def strategy_name(strategy: tf.distribute.Strategy) -> str:
    """A short description such as ``MirroredStrategy(2 replicas)``."""
    return f"{type(strategy).__name__}({strategy.num_replicas_in_sync} replicas)"


# --------------------------------------------------------------------------- builders
def _conv_block(x, filters: int, batch_norm: bool | str, name: str):
    """Two 3x3 convolutions, each followed by normalization (optional) and ReLU.

    ``batch_norm``: True (batch normalization), ``"instance"`` (each image's feature maps
    standardized on their own: ``GroupNormalization`` with one group per channel) or False.
    """
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm,
                          kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        if batch_norm == "instance":
            x = layers.GroupNormalization(groups=-1, name=f"{name}_in{i}")(x)
        elif batch_norm:
            x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def build_anna(
    input_shape: tuple[int, int, int] = (96, 96, 3),
    depth: int = 4,
    base_filters: int = 8,
    batch_norm: bool | str = True,
    dropout: float = 0.1,
    segmentation: bool = True,
    head_units: int = 64,
    standardize_input: bool = False,
) -> keras.Model:
    """Build ANNa: a U-Net with a segmentation output and a classification head.

    The head reads globally pooled U-Net features: every encoder level and the last decoder
    level averaged, the bottleneck averaged and max-pooled. Global pooling keeps it free of
    pixel positions (a flattened full-resolution map would tie it to them).

    Args:
        input_shape: (S, S, 3); S must be divisible by ``2**depth``.
        depth: Number of down-sampling steps.
        base_filters: Filters of the first level; doubled at each level down.
        batch_norm: Batch normalization after each convolution (True), instance
            normalization (``"instance"``: statistics of each image alone, as at prediction
            time; less tied to the training patients' stain) or none (False).
        dropout: Dropout rate in the bottleneck and the head (0 disables it).
        segmentation: Add the ``cell_mask`` output.
        head_units: Width of the dense layer of the head.
        standardize_input: Standardize each image's channels on their own (zero mean, unit
            variance over the image, a ``LayerNormalization`` without learned scale) after the
            rescaling, so that stain strength and brightness that differ between patients
            reach the network less.

    Returns:
        An uncompiled ``keras.Model`` named ``anna`` with dict outputs.
    """
    size = input_shape[0]
    if depth < 1 or size % (2 ** depth):
        raise ValueError(f"image size {size} must be divisible by 2**depth = {2 ** depth}")
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    if standardize_input:
        x = layers.LayerNormalization(axis=(1, 2), center=False, scale=False, epsilon=1e-3,
                                      name="standardize")(x)
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
        outputs[MASK_OUTPUT] = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32",
                                             name=MASK_OUTPUT)(decoder)
    return keras.Model(inputs, outputs, name="anna")


def build_legacy(input_shape: tuple[int, int, int] = (128, 128, 3)) -> keras.Model:
    """Build the older project's network, for comparison.

    A U-Net with 4 base filters and depth 4 on unscaled 0-255 **BGR** input (the old code
    fed OpenCV's BGR arrays; a frozen 1x1 convolution swaps RGB to BGR so callers still
    pass RGB), whose 128x128x1 output map is max-pooled, flattened and fed to dense layers
    of 512-256-128 with dropout 0.5 and one sigmoid unit. No batch normalization.

    Args:
        input_shape: (S, S, 3), S divisible by 16 (the old project used 128).

    Returns:
        An uncompiled ``keras.Model`` named ``legacy`` with the dict output ``p_leukemia``.
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


# --------------------------------------------------------------------------- files
def model_path(path: str | Path) -> Path:
    """The ``.keras`` file for a run folder or a model file path."""
    path = Path(path)
    return path / MODEL_FILENAME if path.is_dir() else path


def load_model(path: str | Path) -> keras.Model:
    """Load a saved ANNa (or legacy) model safely.

    Args:
        path: A run folder (``output/models/<run_id>``) or a ``.keras`` file.

    Returns:
        The model, loaded with ``safe_mode=True`` and without compiling.

    Raises:
        FileNotFoundError: No such file.
        ModelFileError: The file is not a Keras 3 archive.
    """
    file = model_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model file {file} not found; pass a run folder from "
                                "`python -m modules train` or its model.keras")
    if file.suffix != ".keras" or not zipfile.is_zipfile(file):
        raise ModelFileError(f"{file} is not a Keras 3 archive (.keras zip); pass the model.keras "
                             "written by `python -m modules train` (HDF5/.h5 files are not supported)")
    try:
        with zipfile.ZipFile(file) as archive:
            names = set(archive.namelist())
    except zipfile.BadZipFile as error:
        raise ModelFileError(f"{file} is a damaged Keras archive ({error}); train again") from error
    if "config.json" not in names:
        raise ModelFileError(f"{file} is a zip file but not a Keras archive (no config.json inside)")
    try:
        return keras.saving.load_model(file, compile=False, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise ModelFileError(f"{file} could not be loaded as a Keras model: {error}") from error


def model_image_size(model: keras.Model) -> int:
    """The side of the square images the model takes."""
    return int(model.inputs[0].shape[1])


def archive_image_size(path: str | Path) -> int:
    """The input image side stored in a ``.keras`` archive, read without building the model.

    Args:
        path: A run folder or a ``.keras`` file.

    Returns:
        The side S of the (S, S, 3) input.
    """
    import json

    file = model_path(path)
    try:
        with zipfile.ZipFile(file) as archive:
            saved = json.loads(archive.read("config.json"))
        layer = saved["config"]["layers"][0]["config"]
        return int(layer["batch_shape"][1])
    except (OSError, KeyError, IndexError, TypeError, ValueError, zipfile.BadZipFile):
        return model_image_size(load_model(file))


def check_input_size(model: keras.Model, image_size: int, source: str | Path = "model") -> None:
    """Raise ``ModelFileError`` when the model's input size differs from the arrays' size.

    Args:
        model: The loaded model.
        image_size: Side of the image arrays to be fed.
        source: What to name in the message (the model file).
    """
    expected = model_image_size(model)
    if expected != image_size:
        raise ModelFileError(f"{source} takes {expected}x{expected} images but the arrays are "
                             f"{image_size}x{image_size}; prepare the data with --size {expected}")


#: The 8 symmetries of a square (4 rotations by 90°, each with and without a mirror), as
#: ``(quarter_turns, mirrored)``: a single cell has no preferred orientation.
DIHEDRAL = tuple((turns, mirrored) for mirrored in (False, True) for turns in range(4))


def _dihedral(batch: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    """Mirror (left-right) then rotate a (B, S, S, ...) batch."""
    batch = batch[:, :, ::-1] if mirrored else batch
    return np.rot90(batch, turns, axes=(1, 2))


def _undo_dihedral(maps: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    """Inverse of ``_dihedral``: maps predicted on a transformed batch, back in place."""
    maps = np.rot90(maps, -turns, axes=(1, 2))
    return maps[:, :, ::-1] if mirrored else maps


def predict_outputs(model: keras.Model, images, batch_size: int = 64, tta: bool = False) -> dict[str, np.ndarray]:
    """Run the model over images in batches (works on uint8 memory maps without loading them).

    Args:
        model: An ANNa or legacy model.
        images: Array-like (N, S, S, 3), uint8 RGB values.
        batch_size: Images per forward pass.
        tta: Test-time augmentation: average the outputs over the 8 flips/90° rotations of each
            image (``DIHEDRAL``; segmentation maps are turned back first). 8x the work.

    Returns:
        ``{"p_leukemia": (N,) float32}`` plus ``"cell_mask": (N, S, S) float32`` when the model
        has that output.
    """
    check_input_size(model, int(images.shape[1]))
    count = len(images)
    views = DIHEDRAL if tta else DIHEDRAL[:1]
    results: dict[str, list[np.ndarray]] = {}
    for start in range(0, count, batch_size):
        batch = np.asarray(images[start:start + batch_size], dtype="float32")
        summed: dict[str, np.ndarray] = {}
        for turns, mirrored in views:
            # The identity view is the batch itself: ascontiguousarray copies only turned views.
            outputs = model.predict_on_batch(np.ascontiguousarray(_dihedral(batch, turns, mirrored)))
            if not isinstance(outputs, dict):  # a single-output model
                outputs = {PROB_OUTPUT: outputs}
            for name, value in outputs.items():
                value = np.asarray(value, dtype="float32")
                if value.ndim == 4:  # a map: back to the image's orientation
                    value = _undo_dihedral(value, turns, mirrored)
                summed[name] = summed[name] + value if name in summed else value
        for name, value in summed.items():
            results.setdefault(name, []).append(value / len(views))
    merged = {}
    for name, parts in results.items():
        value = np.concatenate(parts) if parts else np.zeros((0, 1), "float32")
        merged[name] = value.reshape(value.shape[:-1]) if value.shape[-1] == 1 else value
    if not results:
        merged[PROB_OUTPUT] = np.zeros((0,), "float32")
    return merged
