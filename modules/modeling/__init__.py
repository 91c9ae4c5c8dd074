"""Stage 3, modeling: the U-Net with its classification head, hardware choices, training, saving.

Importing this package starts TensorFlow with its C++ start-up log (absl, oneDNN, CUDA
stubs, cuInit) silenced: since TF 2.19 those lines are written to file descriptor 2 before
``TF_CPP_MIN_LOG_LEVEL`` is read, so the descriptor itself is pointed at /dev/null while
TensorFlow loads and looks for devices. Every module that uses TensorFlow imports it after this.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _silenced_stderr() -> Iterator[None]:
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (some embedded interpreters): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with _silenced_stderr():
    import tensorflow as tf

    tf.config.list_physical_devices()  # the cuInit probe logs here, once per process
