"""The C kernel (modules/_cellkernel.c) against its NumPy reference, and the resampling itself.

Both implementations must give the same bytes: the cache digest does not depend on which one made it,
and a model trained on arrays from one is evaluated on images prepared by the other.
"""
from __future__ import annotations

import os
import shutil
import warnings

import cv2
import numpy as np
import pytest

from modules import config, native
from modules.preprocessing import cells as preprocess
from modules.preprocessing.cells import ImageError, load_arrays, prepare_arrays, resample, taps


@pytest.fixture(scope="module")
def kernel():
    """The built kernel; without a C compiler the comparisons skip (and fail under CI=true)."""
    native.reset()
    library = native.kernel()
    if library is None:
        reason = f"the C kernel is not available here: {native.status()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return library


@pytest.fixture
def numpy_only(monkeypatch):
    """Run the code under test on the NumPy reference (as on a machine without a compiler)."""
    monkeypatch.setenv("ANNA_NATIVE", "0")
    native.reset()
    yield
    monkeypatch.delenv("ANNA_NATIVE")
    native.reset()


def _c_taps(kernel, n_in: int, n_out: int):
    stride = taps(n_in, n_out)[2].shape[1]
    first, count = np.zeros(n_out, np.int32), np.zeros(n_out, np.int32)
    weight = np.full((n_out, stride), -1, np.int32)
    assert kernel.anna_taps(n_in, n_out, first.ctypes.data, count.ctypes.data, weight.ctypes.data) == stride
    return first, count, weight


SIZES = [1, 2, 3, 5, 7, 16, 24, 31, 64, 96, 100, 127, 128, 129, 200, 217, 256, 300, 449, 450, 451, 1000]


def test_taps_are_normalized_overlaps():
    for n_in in SIZES:
        for n_out in SIZES:
            first, count, weight = taps(n_in, n_out)
            assert (weight.sum(axis=1) == 256).all() and (weight >= 0).all(), (n_in, n_out)
            assert (first >= 0).all() and (first + count <= n_in).all()
            assert (weight[np.arange(weight.shape[1]) >= count[:, None]] == 0).all()
            if n_in >= n_out:  # area: each input weighs its overlap with the output pixel (to rounding)
                for d in range(0, n_out, max(1, n_out // 7)):
                    for t in range(count[d]):
                        s = first[d] + t
                        overlap = min((d + 1) * n_in, (s + 1) * n_out) - max(d * n_in, s * n_out)
                        assert abs(weight[d, t] - 256 * overlap / n_in) <= 1, (n_in, n_out, d, t)
            else:  # bilinear: the two inputs around the output's centre
                centre = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
                inside = (centre > 0) & (centre < n_in - 1)
                position = first + weight[:, 1] / 256
                assert (np.abs(position - centre)[inside] <= 1 / 256 + 1e-9).all(), (n_in, n_out)


def test_taps_of_equal_sizes_copy():
    first, count, weight = taps(217, 217)
    np.testing.assert_array_equal(first, np.arange(217))
    assert (count == 1).all() and (weight[:, 0] == 256).all()


def test_c_taps_equal_the_reference(kernel):
    for n_in in SIZES + list(range(1, 120)):
        for n_out in SIZES:
            for mine, reference in zip(_c_taps(kernel, n_in, n_out), taps(n_in, n_out)):
                np.testing.assert_array_equal(mine, reference, err_msg=f"{n_in} -> {n_out}")


def test_resample_keeps_flat_images_and_averages_blocks():
    flat = np.full((217, 143, 3), (7, 130, 255), np.uint8)
    for width, height in [(128, 128), (50, 200), (300, 1), (143, 217)]:
        out = resample(flat, width, height)
        assert out.shape == (height, width, 3)
        assert (out == flat[0, 0]).all()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    # An exact 2x shrink is the 2 x 2 block mean, rounded half up (within the 8-bit weights).
    blocks = image.reshape(32, 2, 48, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(resample(image, 48, 32) - blocks).max() <= 0.5 + 1e-9
    # A 1-pixel checkerboard shrunk by 1.7 is grey everywhere: area resampling does not alias.
    board = (np.indices((170, 170)).sum(axis=0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    grey = resample(board, 100, 100)
    assert 100 <= grey.min() and grey.max() <= 155
    # Close to OpenCV's own area resampling (which works in floating point).
    assert np.abs(resample(image, 37, 29).astype(int) - cv2.resize(image, (37, 29),
                                                                     interpolation=cv2.INTER_AREA)).mean() < 1


def _random_cell(rng) -> np.ndarray:
    height, width = (int(v) for v in rng.integers(5, 500, 2))
    image = np.zeros((height, width, 3), np.uint8)
    y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
    image[y0:rng.integers(y0 + 1, height + 1), x0:rng.integers(x0 + 1, width + 1)] = rng.integers(16, 256, 3)
    speckle = rng.random(image.shape) < 0.2
    image[speckle] = rng.integers(0, 256, int(speckle.sum()))
    return image[::-1] if rng.random() < 0.3 else image  # bottom-up views have negative row strides


def test_c_crop_resize_equals_the_reference(kernel):
    rng = np.random.default_rng(1)
    compared = 0
    for _ in range(150):
        image = _random_cell(rng)
        size, margin = int(rng.integers(1, 200)), int(rng.integers(0, 10))
        canvas, threshold = int(rng.choice([0, 0, 100, 320])), int(rng.integers(0, 30))
        for swap in (False, True):
            outputs = []
            for function in (preprocess._crop_resize_numpy, None):
                out, mask = np.zeros((size, size, 3), np.uint8), np.zeros((size, size), np.uint8)
                try:
                    if function is None:
                        preprocess._crop_resize_into(image, out, mask, margin, threshold, canvas, swap)
                    else:
                        function(image, out, mask, margin, threshold, canvas, swap)
                    outputs.append((out, mask))
                except ImageError:
                    outputs.append(None)
            if outputs[0] is None:
                assert outputs[1] is None
                continue
            np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
            np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
            compared += 1
    assert compared > 250


@pytest.mark.shared_data
def test_c_and_numpy_prepare_the_same_real_cells(kernel, shared_cnmc, shared_cnmc_bmp, tmp_path, monkeypatch):
    """The C reader (24-bit BMP) and the decoded path (PNG), each against the NumPy reference."""
    sources = sorted((shared_cnmc / "training_data" / "fold_0").glob("*/*.png"))[::12]  # ~300 cells, both classes
    bmp_root = tmp_path / "bmp" / config.DATASET_FOLDER_NAME
    for source in sources:  # the same cells as bottom-up 24-bit BMPs, as in the Kaggle download
        target = bmp_root / source.relative_to(shared_cnmc).with_suffix(".bmp")
        target.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(target), cv2.imread(str(source)))
    png_root = tmp_path / "png" / config.DATASET_FOLDER_NAME
    for source in sources:
        target = png_root / source.relative_to(shared_cnmc)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    for size in (24, 96, 128):
        made = {}
        for name, root in (("bmp", bmp_root), ("png", png_root), ("original_bmp", shared_cnmc_bmp)):
            for implementation in ("C", "NumPy"):
                monkeypatch.setenv("ANNA_NATIVE", "1" if implementation == "C" else "0")
                native.reset()
                arrays = load_arrays(prepare_arrays(root, size=size, output_dir=tmp_path / implementation / name,
                                                    progress=False))
                assert arrays.meta["kernel"] == implementation
                made[name, implementation] = (np.asarray(arrays.images), np.asarray(arrays.masks))
        native.reset()
        for name in ("bmp", "png", "original_bmp"):
            for c_array, numpy_array in zip(made[name, "C"], made[name, "NumPy"]):
                np.testing.assert_array_equal(c_array, numpy_array, err_msg=f"{name} at {size} px")
        np.testing.assert_array_equal(made["bmp", "C"][0], made["png", "C"][0])  # same cells, other format
        assert len(made["bmp", "C"][0]) == len(sources)


def test_prepare_names_bad_bmp_files_read_by_the_kernel(kernel, tmp_path):
    """Files the C reader turns down are decoded in Python, which names the file and the problem."""
    folder = tmp_path / config.DATASET_FOLDER_NAME / "training_data" / "fold_0"
    cell = np.zeros((60, 60, 3), np.uint8)
    cell[20:40, 15:45] = (90, 40, 120)
    for label in ("all", "hem"):
        (folder / label).mkdir(parents=True)
        for index in range(3):
            assert cv2.imwrite(str(folder / label / f"UID_{label == 'all' and 5 or 'H5'}_{index}_1_{label}.bmp"), cell)
    bad = {
        "black": (folder / "all" / "UID_5_9_1_all.bmp", "black"),
        "truncated": (folder / "hem" / "UID_H5_9_1_hem.bmp", "is truncated"),
        "empty": (folder / "hem" / "UID_H5_8_1_hem.bmp", "empty"),
    }
    assert cv2.imwrite(str(bad["black"][0]), np.zeros((60, 60, 3), np.uint8))
    assert cv2.imwrite(str(bad["truncated"][0]), cell)
    bad["truncated"][0].write_bytes(bad["truncated"][0].read_bytes()[:5000])
    bad["empty"][0].write_bytes(b"")
    with pytest.raises(ImageError, match="cannot be used"):  # stops at the first chunk with a bad file
        prepare_arrays(tmp_path / config.DATASET_FOLDER_NAME, size=16, output_dir=tmp_path / "out", progress=False)
    made = load_arrays(prepare_arrays(tmp_path / config.DATASET_FOLDER_NAME, size=16, output_dir=tmp_path / "out",
                                      progress=False, skip_bad=True))
    assert len(made) == 6 and made.masks.reshape(6, -1).any(axis=1).all()
    skipped = {entry["path"]: entry["error"] for entry in made.meta["skipped"]}
    assert len(skipped) == 3
    for path, problem in bad.values():
        assert str(path) in skipped[str(path)] and problem in skipped[str(path)]


def test_without_a_compiler_the_reference_runs_and_says_so(kernel, tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    image = _random_cell(rng)
    image[100:140, 100:160] = 200  # at least one cell pixel whatever the draw
    expected = preprocess.preprocess_image(image, 64, canvas=0)
    monkeypatch.setenv("ANNA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(native.tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    native.reset()
    try:
        with pytest.warns(RuntimeWarning, match="NumPy reference, slower: the C kernel could not be built"):
            assert native.kernel() is None
        got = preprocess.preprocess_image(image, 64, canvas=0)
    finally:
        monkeypatch.undo()
        native.reset()
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert not list((tmp_path / "cache").glob("*.so")) and not list((tmp_path / "cache").glob("*.partial*"))


def test_a_cut_short_library_is_rebuilt_not_loaded(kernel, tmp_path, monkeypatch):
    """A library that does not match the digest recorded at its build (an interrupted copy) is rebuilt."""
    name = native.library_name(native._compiler())
    monkeypatch.setenv("ANNA_CACHE_DIR", str(tmp_path / "first"))
    native.reset()
    try:
        assert native.kernel() is not None
        built = (tmp_path / "first" / name).read_bytes()
        assert (tmp_path / "first" / f"{name}.sha256").read_text() == native._sha256(tmp_path / "first" / name)
        # The same folder copied elsewhere, the library cut in half (loading it could crash the process).
        (tmp_path / "copy").mkdir()
        (tmp_path / "copy" / name).write_bytes(built[: len(built) // 2])
        shutil.copyfile(tmp_path / "first" / f"{name}.sha256", tmp_path / "copy" / f"{name}.sha256")
        monkeypatch.setenv("ANNA_CACHE_DIR", str(tmp_path / "copy"))
        native.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # rebuilt quietly: no fallback warning
            assert native.kernel() is not None
        assert native.status() == f"C kernel {tmp_path / 'copy' / name}"
        assert native._is_intact(tmp_path / "copy" / name) and len((tmp_path / "copy" / name).read_bytes()) > 1000
    finally:
        monkeypatch.undo()
        native.reset()


def test_the_shared_temporary_fallback_must_be_private(kernel, tmp_path, monkeypatch):
    """Where the cache folder is unusable, a temporary folder that others can write is not trusted."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("ANNA_CACHE_DIR", str(tmp_path / "a_file" / "anna"))  # cannot be made
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(native.tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    fallback = native._candidate_dirs()[1]
    assert fallback.parent == tmp_path / "tmp"
    fallback.mkdir()
    fallback.chmod(0o777)  # as another user could have left it
    native.reset()
    try:
        with pytest.warns(RuntimeWarning, match="not a private folder"):
            assert native.kernel() is None
        assert not list(fallback.iterdir())
        fallback.chmod(0o700)  # ours and closed: used
        native.reset()
        assert native.kernel() is not None and native.status().startswith(f"C kernel {fallback}")
    finally:
        monkeypatch.undo()
        native.reset()


def test_settings_out_of_range_are_refused_before_the_kernel(kernel):
    image = np.zeros((20, 20, 3), np.uint8)
    image[5:15, 5:15] = 99
    for settings in ({"size": 16385}, {"size": 16, "margin": 2**60}, {"size": 16, "canvas": 2**63},
                     {"size": 16, "threshold": 2**32 + 20}, {"size": 16, "threshold": 255}, {"size": 0},
                     {"size": 16.0}):
        size = settings.pop("size")
        with pytest.raises(ValueError, match="size|integer"):
            preprocess.preprocess_image(image, size, **settings)
    with pytest.raises(ValueError, match="non-empty"):
        preprocess.preprocess_image(np.zeros((0, 20, 3), np.uint8), 16)
    with pytest.raises(ValueError, match="sizes >= 1"):
        taps(5, 0)
    assert kernel.anna_taps(5, 0, None, None, None) < 0  # refused, not a division by zero


def test_images_beyond_the_kernel_limit_use_the_reference(kernel):
    image = np.zeros((3, (1 << 20) + 5, 3), np.uint8)  # wider than the kernel's 2**20 pixels
    image[1, 1000:1010] = 200
    out, mask = preprocess.preprocess_image(image, 8, margin=0)
    assert mask.sum() > 0 and (out[mask == 1] == 200).all()


def test_numpy_reference_is_used_when_asked(numpy_only):
    assert native.kernel() is None and "ANNA_NATIVE=0" in native.status()
    image = np.zeros((50, 50, 3), np.uint8)
    image[10:20, 5:45] = 180
    out, mask = preprocess.preprocess_image(image, 16, margin=0, canvas=0)
    # A 40 x 10 box in a 40 x 40 square: rows 6-9 of 16 hold the cell (centred), full width.
    np.testing.assert_array_equal(np.flatnonzero(mask.any(axis=1)), [6, 7, 8, 9])
    assert mask[6:10].all() and (out[mask == 1] == 180).all()
