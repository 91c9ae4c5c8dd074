"""Precision policy and ``tf.distribute`` strategy chosen for the hardware, and both in words."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import keras
import tensorflow as tf

from modules import config

#: CPU flags that make bfloat16 matmuls/convolutions fast (without them bf16 is emulated, slower).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (empty where ``cpuinfo`` is absent)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def has_cuda_gpu() -> bool:
    """Whether TensorFlow sees a GPU and was built with CUDA."""
    return bool(tf.config.list_physical_devices("GPU")) and tf.test.is_built_with_cuda()


def select_policy(policy: str = "auto", cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The Keras dtype policy for this hardware.

    ``auto``: ``mixed_float16`` on a CUDA GPU, ``mixed_bfloat16`` on a CPU with native bf16
    (AMX or AVX512-BF16; without them bf16 is emulated and about 2x slower than float32),
    ``float32`` otherwise.
    """
    if policy not in config.POLICIES:
        raise ValueError(f"unknown precision policy {policy!r}; use one of {', '.join(config.POLICIES)}")
    if policy != "auto":
        return policy
    if has_cuda_gpu():
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS) else "float32"


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
    """The ``tf.distribute`` strategy for this hardware.

    ``auto``: TPUStrategy on a (Colab) TPU, MirroredStrategy over several GPUs, the default
    strategy otherwise. ``mirrored`` mirrors over all GPUs, or over all logical CPU devices
    where there are no GPUs (used by the tests). A strategy object is returned as it is.
    """
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    if strategy not in config.STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(config.STRATEGIES)}")
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


def describe_policy(policy: str, cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The precision policy and the hardware reason for it, e.g. ``mixed_bfloat16 (this CPU has AVX512-BF16)``."""
    if policy == "mixed_bfloat16":
        flags = sorted(cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS))
        if flags:
            return f"mixed_bfloat16 (this CPU has {', '.join(f.upper().replace('_', '-') for f in flags)})"
        return "mixed_bfloat16 (emulated: this CPU has no native bfloat16 units, so it runs slower than float32)"
    if policy == "mixed_float16":
        return "mixed_float16 (CUDA GPU)" if has_cuda_gpu() else "mixed_float16 (no CUDA GPU: emulated, slow)"
    return policy


def describe_strategy(strategy: tf.distribute.Strategy) -> str:
    """The devices a strategy trains on, in words: ``one device (CPU)``, ``mirrored over 2 devices (CPU:0, CPU:1)``."""
    replicas = strategy.num_replicas_in_sync
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return f"TPU ({replicas} cores)"
    if replicas == 1 and not isinstance(strategy, tf.distribute.MirroredStrategy):
        return f"one device ({'GPU' if tf.config.list_logical_devices('GPU') else 'CPU'})"
    # The default strategy has no device list; every other one does.
    devices = ", ".join(name.rsplit("device:", 1)[-1] for name in strategy.extended.worker_devices)
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return f"mirrored over {replicas} device{'s' * (replicas > 1)} ({devices})"
    return f"{type(strategy).__name__} over {replicas} replicas ({devices})"


def describe_hardware(policy: str, strategy: tf.distribute.Strategy | str) -> str:
    """One line for a run summary: ``precision mixed_bfloat16 (this CPU has AVX512-BF16); one device (CPU)``.

    Args:
        policy: The policy chosen (``select_policy``'s result).
        strategy: The strategy object, or its description as recorded in a run's ``config.json``.
    """
    where = strategy if isinstance(strategy, str) else describe_strategy(strategy)
    return f"precision {describe_policy(policy)}; {where}"
