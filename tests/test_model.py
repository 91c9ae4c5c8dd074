"""The ANNa and legacy builders, safe loading, prediction, precision policy and strategy (and their words)."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from modules.modeling import hardware, saving  # noqa: E402
from modules.modeling import network as anna_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_anna():
    return anna_model.build_anna((32, 32, 3), depth=2, base_filters=4)


def test_build_anna_outputs_dict_of_float32_probabilities(tiny_anna):
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype("uint8")
    outputs = tiny_anna(images.astype("float32"), training=False)
    assert set(outputs) == {"p_leukemia", "cell_mask"}
    assert tuple(outputs["p_leukemia"].shape) == (3, 1)
    assert tuple(outputs["cell_mask"].shape) == (3, 32, 32, 1)
    for value in outputs.values():
        value = np.asarray(value)
        assert value.dtype == np.float32
        assert ((value >= 0) & (value <= 1)).all()


def test_build_anna_rescales_inside_and_uses_only_builtin_layers(tiny_anna):
    layer_types = {type(layer).__name__ for layer in tiny_anna.layers}
    assert "Rescaling" in layer_types
    assert "Lambda" not in layer_types
    assert all(type(layer).__module__.startswith("keras.") for layer in tiny_anna.layers)
    # The head reads globally pooled features, not a flattened map.
    assert "Flatten" not in layer_types
    assert {"GlobalAveragePooling2D", "GlobalMaxPooling2D"} <= layer_types


def test_build_anna_options_change_the_network():
    plain = anna_model.build_anna((32, 32, 3), depth=2, base_filters=4, segmentation=False,
                                  batch_norm=False, dropout=0.0)
    assert list(plain.output_names) == ["p_leukemia"]
    names = {type(layer).__name__ for layer in plain.layers}
    assert "BatchNormalization" not in names and "Dropout" not in names
    wider = anna_model.build_anna((32, 32, 3), depth=3, base_filters=8)
    assert wider.get_layer("bottleneck_conv1").filters == 64
    assert wider.count_params() > plain.count_params()
    with pytest.raises(ValueError, match="divisible"):
        anna_model.build_anna((36, 36, 3), depth=3)


def test_build_anna_defaults_are_the_model_settings():
    from modules import config

    defaults = config.ModelSettings()
    model = anna_model.build_anna()
    assert tuple(model.input_shape[1:]) == (defaults.image_size, defaults.image_size, 3)
    assert model.get_layer("down0_conv1").filters == defaults.base_filters
    assert model.get_layer("bottleneck_conv1").filters == defaults.base_filters * 2 ** defaults.depth
    assert model.get_layer("head_dense").units == defaults.head_units


def test_build_legacy_is_the_old_architecture():
    legacy = anna_model.build_legacy((128, 128, 3))
    assert list(legacy.output_names) == ["p_leukemia"]
    assert legacy.get_layer("down0_conv1").filters == 4
    assert tuple(legacy.get_layer("unet_map").output.shape) == (None, 128, 128, 1)
    assert legacy.get_layer("flatten").output.shape[-1] == 64 * 64
    assert [legacy.get_layer(f"dense{u}").units for u in (512, 256, 128)] == [512, 256, 128]
    assert "Rescaling" not in {type(layer).__name__ for layer in legacy.layers}  # unscaled 0-255
    # The frozen first layer turns RGB into the BGR order the old code fed.
    swap = legacy.get_layer("rgb_to_bgr")
    assert not swap.trainable
    rgb = np.array([[[[10.0, 20.0, 30.0]]]], "float32")
    assert np.asarray(swap(rgb))[0, 0, 0].tolist() == [30.0, 20.0, 10.0]


def test_saved_model_loads_in_safe_mode_and_predicts_the_same(tiny_anna, tmp_path):
    path = tmp_path / "model.keras"
    tiny_anna.save(path)
    loaded = saving.load_model(tmp_path)  # a run folder works as well as the file
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3)).astype("uint8")
    before = saving.predict_outputs(tiny_anna, images)
    after = saving.predict_outputs(loaded, images)
    np.testing.assert_allclose(before["p_leukemia"], after["p_leukemia"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(before["cell_mask"], after["cell_mask"], rtol=1e-5, atol=1e-6)


def test_load_model_rejects_files_that_are_not_keras_archives(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        saving.load_model(tmp_path / "missing.keras")
    text = tmp_path / "model.keras"
    text.write_text("not a model")
    with pytest.raises(saving.ModelFileError, match="model.keras"):
        saving.load_model(text)
    h5 = tmp_path / "weights.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(saving.ModelFileError, match="weights.h5"):
        saving.load_model(h5)
    other_zip = tmp_path / "other.keras"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(saving.ModelFileError, match="not a Keras archive"):
        saving.load_model(other_zip)
    assert issubclass(saving.ModelFileError, ValueError)


def test_run_files_are_found_from_the_folder_or_the_model_and_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder without model.keras"):
        saving.model_path(tmp_path)
    assert saving.load_run(tmp_path / "model.keras", required=False) == {}  # a model copied alone
    with pytest.raises(FileNotFoundError, match="config.json"):
        saving.load_run(tmp_path)
    (tmp_path / "config.json").write_text('{"run_id": "r1"}')
    assert saving.load_run(tmp_path / "model.keras") == saving.load_run(tmp_path) == {"run_id": "r1"}
    for broken in ("[1, 2]", "{not json"):
        (tmp_path / "config.json").write_text(broken)
        with pytest.raises(saving.ModelFileError, match="config.json"):
            saving.load_run(tmp_path)


def test_predict_outputs_reads_uint8_memmaps_in_batches(tiny_anna, tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "images.npy"
    np.save(path, rng.integers(0, 256, (11, 32, 32, 3)).astype("uint8"))
    images = np.load(path, mmap_mode="r", allow_pickle=False)
    batched = saving.predict_outputs(tiny_anna, images, batch_size=4)
    assert batched["p_leukemia"].shape == (11,) and batched["p_leukemia"].dtype == np.float32
    assert batched["cell_mask"].shape == (11, 32, 32)
    whole = tiny_anna(np.asarray(images, "float32"), training=False)
    np.testing.assert_allclose(batched["p_leukemia"], np.asarray(whole["p_leukemia"])[:, 0], rtol=1e-4, atol=1e-5)
    empty = saving.predict_outputs(tiny_anna, images[:0])
    assert empty["p_leukemia"].shape == (0,)


def test_predict_outputs_refuses_images_of_another_size(tiny_anna):
    with pytest.raises(saving.ModelFileError, match="--size 32"):
        saving.predict_outputs(tiny_anna, np.zeros((2, 48, 48, 3), "uint8"))


def test_mixed_precision_keeps_outputs_float32():
    with hardware.dtype_policy("mixed_bfloat16"):
        model = anna_model.build_anna((32, 32, 3), depth=2, base_filters=4)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the block
    assert model.get_layer("down0_conv1").compute_dtype == "bfloat16"
    assert model.get_layer("p_leukemia").compute_dtype == "float32"
    assert model.get_layer("cell_mask").compute_dtype == "float32"
    outputs = model(np.zeros((2, 32, 32, 3), "float32"))
    assert all(np.asarray(v).dtype == np.float32 for v in outputs.values())


def test_select_policy_follows_the_hardware(tmp_path):
    plain_cpu = tmp_path / "cpuinfo_plain"
    plain_cpu.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    bf16_cpu = tmp_path / "cpuinfo_amx"
    bf16_cpu.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n")
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        assert hardware.select_policy("auto") == "mixed_float16"
    else:
        assert hardware.select_policy("auto", cpuinfo=plain_cpu) == "float32"
        assert hardware.select_policy("auto", cpuinfo=bf16_cpu) == "mixed_bfloat16"
        # This machine: bf16 only where the CPU has native bf16 units.
        native = hardware.cpu_flags() & set(hardware.BF16_CPU_FLAGS)
        assert hardware.select_policy("auto") == ("mixed_bfloat16" if native else "float32")
    assert hardware.select_policy("mixed_bfloat16") == "mixed_bfloat16"
    assert hardware.select_policy("float32", cpuinfo=bf16_cpu) == "float32"
    with pytest.raises(ValueError, match="precision policy"):
        hardware.select_policy("float64")


def test_select_strategy_defaults_to_one_device():
    import tensorflow as tf

    strategy = hardware.select_strategy("default")
    assert strategy.num_replicas_in_sync == 1
    if len(tf.config.list_logical_devices("GPU")) < 2:
        assert hardware.select_strategy("auto").num_replicas_in_sync == 1
    given = tf.distribute.get_strategy()
    assert hardware.select_strategy(given) is given
    with pytest.raises(ValueError, match="strategy"):
        hardware.select_strategy("horovod")


def test_hardware_is_described_in_words_a_user_reads(tmp_path):
    import tensorflow as tf

    bf16_cpu = tmp_path / "cpuinfo_bf16"
    bf16_cpu.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert hardware.describe_policy("mixed_bfloat16", cpuinfo=bf16_cpu) == "mixed_bfloat16 (this CPU has AVX512-BF16)"
    assert hardware.describe_policy("float32") == "float32"
    if not tf.config.list_logical_devices("GPU"):
        assert hardware.describe_strategy(hardware.select_strategy("default")) == "one device (CPU)"
    words = hardware.describe_hardware("float32", hardware.select_strategy("default"))
    assert words.startswith("precision float32; one device (") and "Strategy" not in words
    mirrored = tf.distribute.MirroredStrategy([tf.config.list_logical_devices("CPU")[0].name])
    assert hardware.describe_strategy(mirrored) == "mirrored over 1 device (CPU:0)"


# --------------------------------------------------------------------------- test-time augmentation
def test_dihedral_views_are_the_8_symmetries_and_each_is_undone():
    image = np.arange(4 * 5 * 5 * 2, dtype="float32").reshape(4, 5, 5, 2)
    views = [saving.dihedral(image, turns, mirrored) for turns, mirrored in saving.DIHEDRAL]
    assert len({view.tobytes() for view in views}) == 8  # all different
    for (turns, mirrored), view in zip(saving.DIHEDRAL, views):
        np.testing.assert_array_equal(saving.undo_dihedral(view, turns, mirrored), image)


def test_tta_averages_the_model_over_the_8_views(tiny_anna):
    images = np.random.default_rng(4).integers(0, 256, (5, 32, 32, 3)).astype("uint8")
    tta = saving.predict_outputs(tiny_anna, images, batch_size=2, tta=True)
    p_views, mask_views = [], []
    for turns, mirrored in saving.DIHEDRAL:
        view = np.ascontiguousarray(saving.dihedral(images, turns, mirrored))
        outputs = saving.predict_outputs(tiny_anna, view)
        p_views.append(outputs["p_leukemia"])
        mask_views.append(saving.undo_dihedral(outputs["cell_mask"], turns, mirrored))
    np.testing.assert_allclose(tta["p_leukemia"], np.mean(p_views, axis=0), atol=1e-6)
    np.testing.assert_allclose(tta["cell_mask"], np.mean(mask_views, axis=0), atol=1e-6)
    plain = saving.predict_outputs(tiny_anna, images)["p_leukemia"]
    assert not np.allclose(plain, tta["p_leukemia"], atol=1e-6)  # the views do differ for this net


def test_instance_normalization_uses_builtin_layers_and_reloads_safely(tmp_path):
    model = anna_model.build_anna((32, 32, 3), depth=2, base_filters=4, batch_norm="instance")
    names = {type(layer).__name__ for layer in model.layers}
    assert "GroupNormalization" in names and "BatchNormalization" not in names
    model.save(tmp_path / "model.keras")
    loaded = saving.load_model(tmp_path)
    images = np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3)).astype("uint8")
    np.testing.assert_allclose(saving.predict_outputs(loaded, images)["p_leukemia"],
                               saving.predict_outputs(model, images)["p_leukemia"], atol=1e-6)
