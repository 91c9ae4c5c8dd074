"""Decoding, cropping, masks and the cached arrays, on real BMP/PNG cells and bad files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from modules import config
from modules.data.layout import scan_dataset
from modules.preprocessing import ImageError, cell_square, load_arrays, load_rgb, prepare_arrays, preprocess_image


def _bmp_cells(shared_cnmc_bmp: Path) -> list[Path]:
    return sorted(shared_cnmc_bmp.glob("training_data/fold_0/*/*.bmp"))


def _copy_fold(shared_cnmc_bmp: Path, dest: Path) -> Path:
    """A writable copy of the 40 real BMP cells (Kaggle layout) to damage in tests."""
    for path in _bmp_cells(shared_cnmc_bmp):
        target = dest / "C-NMC_Leukemia" / path.relative_to(shared_cnmc_bmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    return dest / "C-NMC_Leukemia"


def _no_leftovers(output_dir: Path) -> bool:
    return not [p for p in output_dir.rglob("*") if p.name.endswith(".partial") or ".partial" in p.name]


# ----------------------------------------------------------------------------- one image

@pytest.mark.shared_data
def test_load_rgb_is_rgb_and_bmp_equals_png(shared_cnmc, shared_cnmc_bmp):
    for bmp in _bmp_cells(shared_cnmc_bmp)[::10]:
        rgb = load_rgb(bmp)
        assert rgb.shape == (450, 450, 3) and rgb.dtype == np.uint8
        np.testing.assert_array_equal(rgb, np.asarray(Image.open(bmp).convert("RGB")))  # PIL reads RGB
        png = shared_cnmc / bmp.relative_to(shared_cnmc_bmp).with_suffix(".png")
        np.testing.assert_array_equal(rgb, load_rgb(png))
        cell = (rgb > config.BACKGROUND_THRESHOLD).any(axis=2)
        assert rgb[cell][:, 0].mean() > rgb[cell][:, 1].mean()  # purple stain: red above green


def test_preprocess_crops_pads_and_centres():
    image = np.zeros((100, 200, 3), np.uint8)
    image[20:40, 50:90] = (200, 100, 50)  # a 40 x 20 "cell"
    out, mask = preprocess_image(image, size=48, margin=4, canvas=0)  # tight crop
    assert out.shape == (48, 48, 3) and mask.shape == (48, 48)
    assert out.dtype == mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    # Square side 40 + 2*4 = 48: no resize, the cell sits centred with black rows above and below.
    rows, cols = np.nonzero(mask)
    assert (cols.min(), cols.max()) == (4, 43)
    assert (rows.min(), rows.max()) == (14, 33)
    np.testing.assert_array_equal(out[rows.min(), cols.min()], (200, 100, 50))  # channel order kept
    assert out[~mask.astype(bool)].max() == 0


def test_preprocess_cell_touching_the_border_is_padded():
    image = np.zeros((60, 60, 3), np.uint8)
    image[0:30, 40:60] = 90
    out, mask = preprocess_image(image, size=16, margin=3, canvas=0)
    assert mask.sum() > 0 and mask.shape == (16, 16)
    assert out[0, :].max() == 0 and out[:, 0].max() == 0  # padded black around the cell


def test_preprocess_mask_follows_background_threshold():
    image = np.zeros((50, 50, 3), np.uint8)
    image[10:40, 10:40] = (0, 0, config.BACKGROUND_THRESHOLD + 1)  # only one channel above
    image[0:5, 0:5] = config.BACKGROUND_THRESHOLD  # at the threshold: background
    _, mask = preprocess_image(image, size=30, margin=0, canvas=0)
    assert mask.all()


def test_canvas_keeps_cell_size_and_tight_crop_does_not():
    def disc(radius: int) -> np.ndarray:
        image = np.zeros((450, 450, 3), np.uint8)
        yy, xx = np.mgrid[:450, :450]
        image[(yy - 225) ** 2 + (xx - 225) ** 2 <= radius ** 2] = (90, 40, 100)
        return image

    small, large = (preprocess_image(disc(r), 64, canvas=320)[1].mean() for r in (50, 100))
    assert 3.5 < large / small < 4.5  # area ratio of the discs survives the resize
    small, large = (preprocess_image(disc(r), 64, margin=0, canvas=0)[1].mean() for r in (50, 100))
    assert abs(large - small) < 0.03  # a tight crop blows both up to fill the frame
    assert config.DEFAULT_CANVAS == 0 and np.array_equal(preprocess_image(disc(50), 64, margin=0)[1],
                                                         preprocess_image(disc(50), 64, margin=0, canvas=0)[1])
    big = preprocess_image(disc(200), 64, canvas=320)[1]  # larger than the canvas: its own tight square
    assert big.mean() > 0.7  # a disc filling its square covers pi/4 of it


def _all_cell(image: np.ndarray) -> np.ndarray:
    """An image whose every pixel is cell (above the threshold): its square is the whole image."""
    assert image.min() > config.BACKGROUND_THRESHOLD
    return image


def test_area_shrink_of_2x2_blocks_is_the_block_mean():
    rng = np.random.default_rng(0)
    image = _all_cell(rng.integers(5, 256, (64, 64, 3), dtype=np.uint8))
    out, mask = preprocess_image(image, 32, margin=0, canvas=0)
    block_mean = image.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(out - block_mean).max() <= 0.5 and mask.all()  # the mean, rounded


def test_checkerboard_shrinks_to_grey_without_aliasing():
    board = np.where((np.indices((90, 90)).sum(axis=0) % 2)[..., None], 250, 10).astype(np.uint8).repeat(3, axis=2)
    out, _ = preprocess_image(_all_cell(board), 32, margin=0, canvas=0)  # 2.8 pixels to one: not an integer
    assert np.abs(out.astype(int) - 130).max() < 40  # every pixel near the board's mean
    aliased = cv2.resize(board, (32, 32), interpolation=cv2.INTER_NEAREST)  # what sampling without averaging does
    assert np.abs(aliased.astype(int) - 130).max() == 120


def test_shrinking_uses_inter_area_and_enlarging_inter_linear():
    image = _all_cell(np.random.default_rng(1).integers(5, 256, (40, 40, 3), dtype=np.uint8))
    for size, interpolation in ((24, cv2.INTER_AREA), (40, cv2.INTER_LINEAR), (64, cv2.INTER_LINEAR)):
        expected = cv2.resize(image, (size, size), interpolation=interpolation)
        np.testing.assert_array_equal(preprocess_image(image, size, margin=0, canvas=0)[0], expected)


@pytest.mark.shared_data
def test_two_step_shrink_stays_within_a_grey_level_of_inter_area(shared_cnmc_bmp):
    from modules.preprocessing.cells import cell_square, resize_square

    for path in _bmp_cells(shared_cnmc_bmp)[:20]:
        rgb = load_rgb(path)
        _, (top, left, side) = cell_square(rgb)
        square = cv2.copyMakeBorder(rgb[max(top, 0):top + side, max(left, 0):left + side], max(-top, 0),
                                    max(top + side - rgb.shape[0], 0), max(-left, 0),
                                    max(left + side - rgb.shape[1], 0), cv2.BORDER_CONSTANT, value=0)
        reference = cv2.resize(square, (64, 64), interpolation=cv2.INTER_AREA)
        assert side >= 128  # a shrink by at least 2: the two-step path
        assert np.abs(resize_square(square, 64).astype(int) - reference).mean() < 0.5


def test_preprocess_all_black_and_wrong_input():
    with pytest.raises(ImageError, match="no cell pixels"):
        preprocess_image(np.zeros((30, 30, 3), np.uint8), 16)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((30, 30), np.uint8), 16)


@pytest.mark.shared_data
def test_preprocess_real_cell_mask_matches_image(shared_cnmc_bmp):
    rgb = load_rgb(_bmp_cells(shared_cnmc_bmp)[0])
    cell_fraction = (rgb > config.BACKGROUND_THRESHOLD).any(2).sum() / (rgb.shape[0] * rgb.shape[1])
    assert 0.1 < cell_fraction < 0.3
    # On a 320 px canvas the cell keeps its scale: the same share of the square as of 320 source px.
    image, mask = preprocess_image(rgb, 64, canvas=320)
    assert abs(mask.mean() - cell_fraction * 450 ** 2 / 320 ** 2) < 0.03
    np.testing.assert_array_equal(mask, (image > config.BACKGROUND_THRESHOLD).any(2))
    # The default tight crop fills the frame: a round cell covers about pi/4 of its square.
    image, mask = preprocess_image(rgb, 64)
    assert 0.6 < mask.mean() < 0.9
    np.testing.assert_array_equal(mask, (image > config.BACKGROUND_THRESHOLD).any(2))


@pytest.mark.parametrize("case", ["zero_byte", "truncated", "truncated_png", "corrupt", "grayscale", "rgba_transparent",
                                  "16bit"])
def test_bad_image_files_are_named(tmp_path, case):
    cell = np.zeros((40, 40, 3), np.uint8)
    cell[10:30, 10:30] = (90, 40, 100)
    path = tmp_path / f"UID_1_1_1_all_{case}.png"
    if case == "zero_byte":
        path = path.with_suffix(".bmp")
        path.write_bytes(b"")
        expected = "empty"
    elif case == "truncated":
        path = path.with_suffix(".bmp")
        cv2.imwrite(str(path), cell)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        expected = "is truncated"
    elif case == "truncated_png":
        cv2.imwrite(str(path), cell)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        expected = "cannot be decoded"
    elif case == "corrupt":
        path = path.with_suffix(".bmp")
        path.write_bytes(b"BM" + os.urandom(3000))
        expected = "cannot be decoded"
    elif case == "grayscale":
        cv2.imwrite(str(path), cell[..., 0])
        expected = "grayscale"
    elif case == "rgba_transparent":
        rgba = np.dstack([cell, np.where(cell[..., 0] > 0, 255, 0).astype(np.uint8)])
        cv2.imwrite(str(path), rgba)
        expected = "RGBA with transparent"
    else:
        cv2.imwrite(str(path), cell.astype(np.uint16) * 256)
        expected = "uint16"
    with pytest.raises(ImageError, match=expected) as error:
        load_rgb(path)
    assert str(path) in str(error.value)


def test_opaque_rgba_is_read_as_rgb(tmp_path):
    cell = np.zeros((40, 40, 3), np.uint8)
    cell[10:30, 10:30] = (90, 40, 100)  # BGR on disk
    path = tmp_path / "opaque.png"
    cv2.imwrite(str(path), np.dstack([cell, np.full((40, 40), 255, np.uint8)]))
    np.testing.assert_array_equal(load_rgb(path), cell[..., ::-1])


# ----------------------------------------------------------------------------- cached arrays

@pytest.mark.shared_data
def test_prepare_real_bmp_cells(shared_cnmc_bmp, tmp_path):
    folder = prepare_arrays(shared_cnmc_bmp, size=32, output_dir=tmp_path, progress=False)
    assert folder == tmp_path / "arrays" / "cnmc_bmp_32"
    for name in ("images", "masks", "labels"):
        np.load(folder / f"{name}.npy", allow_pickle=False)  # plain arrays, no pickles
    arrays = load_arrays(folder)
    assert arrays.images.shape == (40, 32, 32, 3) and arrays.images.dtype == np.uint8
    assert arrays.masks.shape == (40, 32, 32) and set(np.unique(arrays.masks)) == {0, 1}
    assert arrays.labels.dtype == np.int8
    # Row i of the arrays is row i of the manifest, and its label is the one its name says.
    suffix = arrays.manifest["name"].str.extract(r"_(all|hem)\.bmp$")[0].map(config.CLASS_FOLDERS)
    np.testing.assert_array_equal(arrays.labels, suffix.to_numpy())
    for i in (0, 17, 39):
        expected, _ = preprocess_image(load_rgb(arrays.manifest["path"][i]), 32)
        np.testing.assert_array_equal(arrays.images[i], expected)
    meta = arrays.meta
    assert meta["count"] == 40 and meta["counts"] == {"all": 20, "hem": 20, "unlabeled": 0}
    assert meta["size"] == 32 and meta["margin"] == config.DEFAULT_MARGIN and meta["synthetic"] is False
    assert meta["background_threshold"] == config.BACKGROUND_THRESHOLD and meta["skipped"] == []
    assert len(meta["digest"]) == 64 and meta["source"] == str(shared_cnmc_bmp.resolve())
    assert _no_leftovers(tmp_path)
    # Made through tempfile (private), published with the permissions of any folder and file.
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file").write_text("x")
    assert folder.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert (folder / "meta.json").stat().st_mode & 0o777 == (tmp_path / "plain" / "file").stat().st_mode & 0o777


@pytest.mark.shared_data
# 24 and 128 px shrink the cells (INTER_AREA); 256 px enlarges most of them (INTER_LINEAR).
@pytest.mark.parametrize("size", [24, 128, 256])
def test_png_and_bmp_give_the_same_arrays_and_pool_equals_serial(shared_cnmc, shared_cnmc_bmp, tmp_path, size):
    bmp = scan_dataset(shared_cnmc_bmp)
    png = scan_dataset(shared_cnmc)
    png = png[png["name"].str.replace(".png", ".bmp").isin(set(bmp["name"]))]
    assert len(png) == 40
    from_bmp = load_arrays(prepare_arrays(bmp, size=size, output_dir=tmp_path / "a", workers=2, progress=False))
    from_png = load_arrays(prepare_arrays(png, size=size, output_dir=tmp_path / "b", workers=1, progress=False))
    np.testing.assert_array_equal(from_bmp.images, from_png.images)
    np.testing.assert_array_equal(from_bmp.masks, from_png.masks)
    np.testing.assert_array_equal(from_bmp.labels, from_png.labels)
    assert from_png.meta["dataset"].startswith("cnmc_subset-")  # a subset never takes the full set's cache


@pytest.mark.shared_data
def test_cache_reused_and_rebuilt_on_change(shared_cnmc_bmp, tmp_path):
    root = _copy_fold(shared_cnmc_bmp, tmp_path / "data")
    out = tmp_path / "out"
    folder = prepare_arrays(root, size=16, output_dir=out, progress=False)
    first = json.loads((folder / "meta.json").read_text())
    stamp = (folder / "images.npy").stat().st_mtime_ns
    assert prepare_arrays(root, size=16, output_dir=out, progress=False) == folder
    assert (folder / "images.npy").stat().st_mtime_ns == stamp  # reused, not rewritten

    # A changed file (same name, new content and mtime) rebuilds the cache.
    changed = sorted(root.rglob("*.bmp"))[0]
    rgb = load_rgb(changed)
    cv2.imwrite(str(changed), cv2.cvtColor(rgb[:, ::-1].copy(), cv2.COLOR_RGB2BGR))
    os.utime(changed, ns=(stamp + 10**9, stamp + 10**9))
    prepare_arrays(root, size=16, output_dir=out, progress=False)
    second = json.loads((folder / "meta.json").read_text())
    assert second["digest"] != first["digest"]
    arrays = load_arrays(folder)
    row = arrays.manifest.index[arrays.manifest["path"] == str(changed)][0]
    np.testing.assert_array_equal(arrays.images[row], preprocess_image(load_rgb(changed), 16)[0])

    # Another margin is another preprocessing: its own cache, the default one left as it was.
    wide = prepare_arrays(root, size=16, output_dir=out, progress=False, margin=10)
    assert wide != folder and json.loads((wide / "meta.json").read_text())["margin"] == 10
    assert json.loads((folder / "meta.json").read_text()) == second
    assert _no_leftovers(out)


@pytest.mark.shared_data
def test_a_canvas_gets_its_own_cache_beside_the_default_tight_crop(shared_cnmc_bmp, tmp_path):
    tight = prepare_arrays(shared_cnmc_bmp, size=24, output_dir=tmp_path, progress=False)
    scaled = prepare_arrays(shared_cnmc_bmp, size=24, output_dir=tmp_path, progress=False, canvas=320)
    assert scaled == tmp_path / "arrays" / "cnmc_bmp_24_canvas320" and tight == tmp_path / "arrays" / "cnmc_bmp_24"
    tight_arrays, scaled_arrays = load_arrays(tight), load_arrays(scaled)
    assert tight_arrays.meta["canvas"] == 0 and scaled_arrays.meta["canvas"] == 320
    assert tight_arrays.meta["digest"] != scaled_arrays.meta["digest"]
    for i in (0, 21):
        rgb = load_rgb(tight_arrays.manifest["path"][i])
        np.testing.assert_array_equal(tight_arrays.images[i], preprocess_image(rgb, 24, canvas=0)[0])
        np.testing.assert_array_equal(scaled_arrays.images[i], preprocess_image(rgb, 24, canvas=320)[0])
    # Every cell fills the tight frame, so the masks cover more of it than on the common canvas.
    assert tight_arrays.masks.mean() > scaled_arrays.masks.mean()
    with pytest.raises(ValueError, match="canvas"):
        prepare_arrays(shared_cnmc_bmp, size=24, output_dir=tmp_path, progress=False, canvas=-1)
    # Another margin too: its own folder, so the default cache is neither replaced nor rebuilt.
    wide = prepare_arrays(shared_cnmc_bmp, size=24, output_dir=tmp_path, progress=False, margin=12)
    assert wide == tmp_path / "arrays" / "cnmc_bmp_24_margin12" and load_arrays(wide).meta["margin"] == 12
    assert load_arrays(tight).meta["digest"] == tight_arrays.meta["digest"]


@pytest.mark.shared_data
def test_bad_image_stops_the_run_and_leaves_no_cache(shared_cnmc_bmp, tmp_path):
    root = _copy_fold(shared_cnmc_bmp, tmp_path / "data")
    bad = sorted(root.rglob("*_hem.bmp"))[3]
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated
    out = tmp_path / "out"
    with pytest.raises(ImageError, match=rf"(?s){bad.name}.*--skip-bad"):
        prepare_arrays(root, size=16, output_dir=out, progress=False)
    assert not (out / "arrays" / "c-nmc_leukemia_16").exists()
    assert _no_leftovers(out)

    folder = prepare_arrays(root, size=16, output_dir=out, progress=False, skip_bad=True)
    arrays = load_arrays(folder)
    assert len(arrays) == 39 and str(bad) not in set(arrays.manifest["path"])
    assert [s["path"] for s in arrays.meta["skipped"]] == [str(bad)]
    assert "truncated" in arrays.meta["skipped"][0]["error"]
    assert arrays.meta["counts"] == {"all": 20, "hem": 19, "unlabeled": 0}
    suffix = arrays.manifest["name"].str.extract(r"_(all|hem)\.bmp$")[0].map(config.CLASS_FOLDERS)
    np.testing.assert_array_equal(arrays.labels, suffix.to_numpy())  # still aligned after the skip
    # The cache with a skipped file is not trusted by a call that did not ask to skip.
    with pytest.raises(ImageError, match=bad.name):
        prepare_arrays(root, size=16, output_dir=out, progress=False)


def test_prepare_synthetic_marks_it(synthetic_root, tmp_path):
    folder = prepare_arrays(synthetic_root, size=32, output_dir=tmp_path, progress=False)
    arrays = load_arrays(folder)
    assert folder.name == "synthetic_c-nmc_leukemia_32"
    assert arrays.meta["synthetic"] is True
    manifest = arrays.manifest
    np.testing.assert_array_equal(arrays.labels, manifest["label"].fillna(-1).astype(int).to_numpy())
    assert (arrays.labels[manifest["split"].to_numpy() == "test"] == -1).all()
    assert arrays.meta["counts"]["unlabeled"] == int((manifest["split"] == "test").sum())
    assert not arrays.images.flags.writeable  # memory-mapped read-only


def test_arrays_of_older_preprocessing_code_are_rebuilt(synthetic_root, tmp_path, monkeypatch):
    from modules.preprocessing import arrays

    folder = prepare_arrays(synthetic_root, size=16, output_dir=tmp_path, progress=False)
    first = load_arrays(folder).meta
    assert first["meta_version"] == arrays.META_VERSION and "kernel" not in first
    monkeypatch.setattr(arrays, "META_VERSION", arrays.META_VERSION + 1)  # as the next change to the pixels will
    assert prepare_arrays(synthetic_root, size=16, output_dir=tmp_path, progress=False) == folder
    second = load_arrays(folder).meta
    assert second["meta_version"] == first["meta_version"] + 1 and second["digest"] != first["digest"]
    assert _no_leftovers(tmp_path)


def test_load_arrays_incomplete_folder(tmp_path):
    (tmp_path / "x_32").mkdir()
    (tmp_path / "x_32" / "images.npy").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="masks.npy"):
        load_arrays(tmp_path / "x_32")


@pytest.mark.parametrize("width", [23, 24])
def test_bmp_rows_stored_either_way_are_read_right(tmp_path, width):
    rng = np.random.default_rng(width)
    bgr = rng.integers(0, 255, (17, width, 3), dtype=np.uint8)
    bottom_up = tmp_path / "bottom_up.bmp"
    assert cv2.imwrite(str(bottom_up), bgr)
    # The same pixels stored top-down (negative height), as some writers do.
    raw = bytearray(bottom_up.read_bytes())
    offset, stride = int.from_bytes(raw[10:14], "little"), (width * 3 + 3) // 4 * 4
    rows = [raw[offset + i * stride: offset + (i + 1) * stride] for i in range(17)]
    raw[offset:offset + 17 * stride] = b"".join(reversed(rows))
    raw[22:26] = (-17).to_bytes(4, "little", signed=True)
    top_down = tmp_path / "top_down.bmp"
    top_down.write_bytes(bytes(raw))
    for path in (bottom_up, top_down):
        np.testing.assert_array_equal(load_rgb(path), bgr[..., ::-1])
        np.testing.assert_array_equal(cv2.imread(str(path)), bgr)


def test_bounding_box_matches_a_full_mask():
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(400):
        height, width = (int(v) for v in rng.integers(1, 70, 2))
        image = rng.integers(0, 5, (height, width, 3), dtype=np.uint8)  # background noise <= threshold 4
        for _ in range(int(rng.integers(0, 4))):
            image[rng.integers(0, height), rng.integers(0, width), rng.integers(0, 3)] = rng.integers(5, 256)
        if rng.random() < 0.5:
            image = image[::-1]  # a bottom-up BMP view has negative row strides
        cell = (image > 4).any(axis=2)
        if not cell.any():
            with pytest.raises(ImageError, match="black"):
                cell_square(image, threshold=4)
            continue
        rows, cols = np.flatnonzero(cell.any(axis=1)), np.flatnonzero(cell.any(axis=0))
        expected = (rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
        assert cell_square(image, margin=0, threshold=4, canvas=0)[0] == expected
        checked += 1
    assert checked > 200
