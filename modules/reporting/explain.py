"""Grad-CAM (Selvaraju et al., 2017) for the ``p_leukemia`` output of a Keras 3 Functional model: a convolution's
feature maps weighted by the gradient of the class score, positive part kept (where the network looked)."""
from __future__ import annotations

import numpy as np

#: Name of the classification output in ANNa models.
OUTPUT_NAME = "p_leukemia"
_CONV_TYPES = ("Conv2D", "Conv2DTranspose", "SeparableConv2D", "DepthwiseConv2D")


def _output_tensor(model, output: str):
    outputs = model.output
    if isinstance(outputs, dict):
        if output not in outputs:
            raise ValueError(f"the model has no output {output!r} (outputs: {sorted(outputs)})")
        return outputs[output]
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def default_layer_name(model, output: str = OUTPUT_NAME) -> str:
    """The last convolution feeding the output at its lowest resolution above 1x1 (ANNa's: the bottleneck's)."""
    # Not the decoder's full-resolution maps, which ANNa's head also reads: they mostly encode the outline (they lit
    # the background on real cells).
    import keras

    # A sub-model from the inputs to the output holds exactly the layers it depends on, in topological order.
    branch = keras.Model(model.inputs, _output_tensor(model, output))
    candidates = [layer for layer in branch.layers
                  if type(layer).__name__ in _CONV_TYPES and len(layer.output.shape) == 4
                  and (layer.output.shape[1] or 2) > 1]
    if not candidates:
        raise ValueError("the model has no 2-D convolution feeding its classification output; "
                         "pass layer_name= to grad_cam")
    # The last of the lowest resolution: min keeps the first it meets.
    return min(reversed(candidates), key=lambda layer: layer.output.shape[1] or 0).name


def grad_cam(model, image: np.ndarray, layer_name: str | None = None, target: str = "leukemia",
             output: str = OUTPUT_NAME) -> np.ndarray:
    """Grad-CAM heatmap, (H,W) float32 in [0, 1], of one (H,W,3) image (see ``grad_cam_batch``)."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"grad_cam takes one (H,W,3) image, got shape {image.shape}")
    return grad_cam_batch(model, image[None], layer_name=layer_name, target=target, output=output)[0]


def grad_cam_batch(model, images: np.ndarray, layer_name: str | None = None, target: str | np.ndarray = "leukemia",
                   output: str = OUTPUT_NAME) -> np.ndarray:
    """Grad-CAM heatmaps of (N,H,W,3) images in one gradient pass: (N,H,W) float32, each scaled to [0, 1];
    ``target``: evidence for ``leukemia``, ``normal``, the ``predicted`` class (p >= 0.5) or, per image, the class
    given (an array of 1 leukemia / 0 normal, e.g. a run's calls at its threshold); all zeros where there is none."""
    import keras
    import tensorflow as tf

    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"grad_cam_batch takes (N,H,W,3) images, got shape {images.shape}")
    given = None if isinstance(target, str) else np.asarray(target).reshape(-1)
    if given is None and target not in ("leukemia", "normal", "predicted"):
        raise ValueError(f"target must be 'leukemia', 'normal', 'predicted' or one class per image, not {target!r}")
    if given is not None and (len(given) != len(images) or not np.isin(given, (0, 1)).all()):
        raise ValueError(f"target as classes needs one 0 or 1 per image ({len(images)}), got {target!r}")
    layer = model.get_layer(layer_name or default_layer_name(model, output))
    out_tensor = _output_tensor(model, output)
    out_layer = out_tensor._keras_history[0]  # the layer that produced the output
    # The gradient is of the logit where a sigmoid output layer exposes it (a Dense's input, an Activation's), so
    # a saturated probability still gives a usable map.
    sigmoid = getattr(getattr(out_layer, "activation", None), "__name__", "") == "sigmoid"
    kind = type(out_layer).__name__ if sigmoid and type(out_layer).__name__ in ("Dense", "Activation") else ""
    grad_model = keras.Model(model.inputs, [layer.output, out_layer.input if kind else out_tensor, out_tensor])

    batch = tf.convert_to_tensor(images.astype("float32"))
    with tf.GradientTape() as tape:
        features, score, probability = grad_model(batch, training=False)
        tape.watch(features)
        if kind == "Dense":
            score = tf.matmul(score, tf.cast(out_layer.kernel, score.dtype)) + tf.cast(out_layer.bias, score.dtype)
        score = tf.cast(tf.reshape(score, [-1]), tf.float32)
        if not kind:  # a probability: its logit
            score = tf.math.log(score + 1e-7) - tf.math.log(1.0 - score + 1e-7)
        # +1: evidence for leukemia, -1: for normal, per image where the class is given or predicted.
        if given is not None:
            sign = 2.0 * tf.constant(given, tf.float32) - 1.0
        elif target == "predicted":
            sign = 2.0 * tf.cast(tf.reshape(probability, [-1]) >= 0.5, tf.float32) - 1.0
        else:
            sign = 1.0 if target == "leukemia" else -1.0
        # Images are independent, so the gradient of the sum is each image's own gradient.
        total = tf.reduce_sum(score * sign)
    gradients = tape.gradient(total, features)
    if gradients is None:
        raise ValueError(f"layer {layer.name!r} does not feed the {output!r} output; pick another layer_name")
    features = tf.cast(features, tf.float32)
    weights = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=(1, 2), keepdims=True)
    heatmaps = tf.nn.relu(tf.reduce_sum(features * weights, axis=-1, keepdims=True))
    heatmaps = tf.image.resize(heatmaps, images.shape[1:3], method="bilinear")[..., 0].numpy()
    peaks = heatmaps.reshape(len(heatmaps), -1).max(axis=1)
    peaks = np.where(np.isfinite(peaks) & (peaks > 0), peaks, np.inf)  # no positive evidence: zeros
    return (heatmaps / peaks[:, None, None]).astype("float32")


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """A [0,1] heatmap in jet colours over an RGB image stretched to its own range (C-NMC cells are dark): uint8."""
    import matplotlib

    rgb = np.asarray(image, dtype="float32")
    rgb = rgb / max(float(rgb.max()), 1.0)
    heat = np.clip(heatmap, 0, 1)
    weight = alpha * heat[..., None] ** 0.5  # grows with the heat, so cold regions show the cell itself
    blended = (1 - weight) * rgb + weight * matplotlib.colormaps["jet"](heat)[..., :3]
    return (np.clip(blended, 0, 1) * 255).astype("uint8")
