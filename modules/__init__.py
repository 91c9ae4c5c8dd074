"""ANNa (Artificial Neural Network anti-Leukemia): the package behind ``notebooks/`` and ``python -m modules``.

One subpackage per stage: ``data``, ``preprocessing``, ``modeling``, ``evaluation``, ``reporting``; beside them
``config``, ``files``, ``notebooks`` and ``cli``. Each is imported on its own, so ``import modules`` never loads
TensorFlow.
"""
__version__ = "0.1.0"
