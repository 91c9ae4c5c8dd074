"""Precision policy and ``tf.distribute`` strategy chosen for the hardware, and both in words.

Training on several machines uses TensorFlow's own ``MultiWorkerMirroredStrategy``, configured
by the ``TF_CONFIG`` environment variable (the cluster's addresses and this process's task).
"""
from __future__ import annotations

import contextlib
import functools
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

    ``auto``: ``mixed_float16`` on a CUDA GPU, ``mixed_bfloat16`` on a CPU with native bf16 (AMX or AVX512-BF16; without
    them bf16 is emulated and about 2x slower than float32), ``float32`` otherwise.
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


class StrategyError(ValueError):
    """A strategy that cannot be set up as asked; the message says what to change."""


def _trainers(spec: tf.train.ClusterSpec) -> int:
    """The training processes of a cluster: its chief and its workers."""
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)


def cluster_workers() -> int:
    """How many training processes ``TF_CONFIG`` names (0 without ``TF_CONFIG``)."""
    return _trainers(tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec())


class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """TensorFlow's ``MultiWorkerMirroredStrategy`` with a ``reduce`` that takes what Keras 3 passes it.

    Keras 3's ``fit`` (3.15) reduces a whole batch (a nest of values) before its first step and each step's scalar
    metrics along ``axis=0``; TensorFlow's ``reduce`` takes one value at a time and ``axis=0`` needs a batch axis, so
    ``fit`` fails on several workers (keras-team/keras#20585, tensorflow/tensorflow#72388). Here each value is reduced
    on its own, a scalar across the replicas only: the same figures, nothing else changed.
    """

    def reduce(self, reduce_op, value, axis):
        parent = super()

        def reduce_one(item):
            rank = self.experimental_local_results(item)[0].shape.rank
            return parent.reduce(reduce_op, item, axis=None if rank == 0 else axis)

        return tf.nest.map_structure(reduce_one, value)


@functools.cache
def multi_worker_strategy() -> tf.distribute.MultiWorkerMirroredStrategy:
    """``MultiWorkerMirroredStrategy`` over the cluster of ``TF_CONFIG``, made once per process.

    It configures TensorFlow's collective ops, which TensorFlow allows only before its first
    operation (hence once, and first): ``train_model`` chooses its strategy before anything else.
    """
    if cluster_workers() < 2:
        raise StrategyError("strategy 'multi-worker' needs TF_CONFIG naming at least two workers, e.g. "
                            'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                            '"task": {"type": "worker", "index": 0}}\' (README, "More than one machine")')
    try:
        return MultiWorkerStrategy()
    except RuntimeError as error:  # "Collective ops must be configured at program startup"
        raise StrategyError(f"the multi-worker strategy must be made before TensorFlow runs anything ({error}); "
                            "train in a fresh process (a notebook: restart its kernel)") from error


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files: the chief of a cluster (worker 0), or a lone process."""
    return bool(strategy.extended.should_checkpoint)


def count_workers(strategy: tf.distribute.Strategy) -> int:
    """The machines (processes) a strategy trains on: 1 unless it is multi-worker."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return 1
    return max(1, _trainers(resolver.cluster_spec()))


def gather_from_workers(strategy: tf.distribute.Strategy, values: list[int]) -> list[list[int]]:
    """``values`` as each replica of the cluster passed them, in replica order (every worker must call this).

    Exchanged as float32, so exact for integers below 2**24.
    """
    local = tf.constant([[float(value) for value in values]])
    per_replica = strategy.experimental_distribute_values_from_function(lambda _: local)
    return [[int(value) for value in row] for row in strategy.gather(per_replica, axis=0).numpy()]


def select_strategy(strategy: str | tf.distribute.Strategy = "auto") -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy for this hardware.

    ``auto``: MultiWorkerMirroredStrategy when ``TF_CONFIG`` names several workers, TPUStrategy on a (Colab) TPU,
    MirroredStrategy over several GPUs, the default strategy otherwise. ``mirrored`` mirrors over all GPUs, or over all
    logical CPU devices where there are no GPUs (used by the tests); ``multi-worker`` asks for the cluster of
    ``TF_CONFIG``. A strategy object is returned as it is.
    """
    if isinstance(strategy, tf.distribute.Strategy):
        return strategy
    if strategy not in config.STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(config.STRATEGIES)}")
    if strategy == "multi-worker" or (strategy == "auto" and cluster_workers() > 1):
        return multi_worker_strategy()
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
    """The devices a strategy trains on, in words: ``one device (CPU)``, ``mirrored over 2 devices (CPU:0, CPU:1)``,
    ``multi-worker over 2 workers (2 replicas in sync)``."""
    replicas = strategy.num_replicas_in_sync
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return f"TPU ({replicas} cores)"
    if count_workers(strategy) > 1:
        return f"multi-worker over {count_workers(strategy)} workers ({replicas} replicas in sync)"
    if replicas == 1 and not isinstance(strategy, tf.distribute.MirroredStrategy):
        return f"one device ({'GPU' if tf.config.list_logical_devices('GPU') else 'CPU'})"
    # The default strategy has no device list; every other one does.
    devices = ", ".join(name.rsplit("device:", 1)[-1] for name in strategy.extended.worker_devices)
    kind = "mirrored" if isinstance(strategy, tf.distribute.MirroredStrategy) else type(strategy).__name__
    return f"{kind} over {replicas} device{'s' * (replicas > 1)} ({devices})"


def describe_hardware(policy: str, strategy: tf.distribute.Strategy) -> str:
    """One line for a run summary: ``precision mixed_bfloat16 (this CPU has AVX512-BF16); one device (CPU)``."""
    return f"precision {describe_policy(policy)}; {describe_strategy(strategy)}"
