"""Damaged, crafted and malformed image files: each refused by name before decoding, skipped with --skip-bad.

Every file is built inside the test: ~1 KB PNG/JPEG/TIFF files whose headers claim more than 2^30
pixels, 2 GiB sparse files named .bmp (no disk used), and malformed BMP/PNG files OpenCV alone
would decode into garbage.
"""
from __future__ import annotations

import io
import json
import re
import resource
import struct
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from modules import cli
from modules.preprocessing import ImageError, load_rgb

GIB = 2**30
#: Expected words of the error per case (a regular expression).
CASES = {
    "png_claims_2^30_pixels": r"PNG header claims 40,000 x 40,000 pixels.*2\^26",
    "jpeg_claims_2^30_pixels": r"JPEG header claims 40,000 x 40,000 pixels.*2\^26",
    "tiff_claims_2^30_pixels": r"TIFF header claims 40,000 x 40,000 pixels.*2\^26",
    "sparse_2gib_non_image": r"not a BMP, PNG, JPEG or TIFF image",
    "sparse_2gib_bmp": r"far more than the 40 x 40 pixels",
    "bmp_offset_in_header": r"pixel offset \(30\) points into its 54-byte header",
    "bmp_4bit_without_palette": r"4-bit pixels need a palette of 16 colours",
    "png_grey_alpha": r"is grayscale",
    "bmp_os2": r"OS/2 BMP",
}
EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif"}


def cell_bgr(side: int = 40) -> np.ndarray:
    """A purple disc on black: a cell as preprocessing expects it."""
    image = np.zeros((side, side, 3), np.uint8)
    cv2.circle(image, (side // 2, side // 2), side // 3, (160, 60, 110), -1)
    return image


def claiming(kind: str, width: int, height: int) -> bytes:
    """A small valid PNG, JPEG or TIFF of ``cell_bgr`` whose header then claims ``width`` x ``height``."""
    data = bytearray(cv2.imencode(EXTENSIONS[kind], cell_bgr())[1].tobytes())
    if kind == "png":
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # a valid IHDR checksum
    elif kind == "jpeg":
        frame = data.find(b"\xff\xc0")
        data[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    else:
        order = "<" if data[:2] == b"II" else ">"
        ifd = struct.unpack_from(order + "I", data, 4)[0]
        for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack_from(order + "H", data, ifd)[0], 12):
            tag, kind_code = struct.unpack_from(order + "HH", data, entry)
            if tag in (256, 257):
                struct.pack_into(order + ("H" if kind_code == 3 else "I"), data, entry + 8,
                                 width if tag == 256 else height)
    return bytes(data)


def bmp(width: int, height: int, bits: int, pixels: bytes, offset: int | None = None, info: int = 40) -> bytes:
    """A BMP without palette: a BITMAPINFOHEADER (40) or an OS/2 BITMAPCOREHEADER (12)."""
    stride = (width * bits + 31) // 32 * 4
    dib = (struct.pack("<IHHHH", 12, width, height, 1, bits) if info == 12 else
           struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, 0, stride * height, 2835, 2835, 0, 0))
    offset = 14 + len(dib) if offset is None else offset
    return b"BM" + struct.pack("<IHHI", 14 + len(dib) + len(pixels), 0, 0, offset) + dib + pixels


def make_bad(case: str, folder: Path, stem: str) -> Path:
    """Write the file of ``case`` as ``folder/stem.<ext>`` and return its path."""
    kind = case.split("_")[0]
    path = folder / (stem + EXTENSIONS.get(kind, ".bmp"))
    if case.endswith("claims_2^30_pixels"):
        path.write_bytes(claiming(kind, 40_000, 40_000))
        assert path.stat().st_size < 2048  # about 1 KB claiming 1.6e9 pixels
    elif case.startswith("sparse"):
        with open(path, "wb") as handle:
            if case == "sparse_2gib_bmp":
                handle.write(cv2.imencode(".bmp", cell_bgr())[1].tobytes())  # a valid 40 x 40 header first
            handle.truncate(2 * GIB)  # sparse: no disk used
    elif case == "bmp_offset_in_header":
        path.write_bytes(bmp(40, 40, 24, cell_bgr().tobytes(), offset=30))
    elif case == "bmp_4bit_without_palette":
        path.write_bytes(bmp(40, 40, 4, bytes(range(256)) * 4))  # OpenCV would take pixels for the palette
    elif case == "png_grey_alpha":
        grey = cell_bgr()[..., 0]
        Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), "LA").save(path)  # opaque alpha
    else:
        path.write_bytes(bmp(40, 40, 24, cell_bgr().tobytes(), info=12))
    return path


def tiny_dataset(root: Path, patients: int = 2, cells: int = 2) -> Path:
    """A C-NMC_Leukemia tree of good cells: ``patients`` per class, ``cells`` each, in fold_0."""
    for label, prefix in (("all", ""), ("hem", "H")):
        folder = root / "C-NMC_Leukemia" / "training_data" / "fold_0" / label
        folder.mkdir(parents=True)
        for patient in range(1, patients + 1):
            for cell in range(cells):
                image = np.roll(cell_bgr(), cell + 10 * patient, axis=1)  # no cell shared by two subjects
                cv2.imwrite(str(folder / f"UID_{prefix}{patient}_1_{cell}_{label}.bmp"), image)
    return root / "C-NMC_Leukemia"


# ----------------------------------------------------------------------------- one file


@pytest.mark.parametrize("case", CASES)
def test_bad_file_is_refused_naming_it(tmp_path, case):
    path = make_bad(case, tmp_path, f"UID_H1_1_1_hem_{case}")
    with pytest.raises(ImageError, match=CASES[case]) as error:
        load_rgb(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("case", ["sparse_2gib_non_image", "sparse_2gib_bmp"])
def test_a_2gib_file_is_refused_without_reading_it(tmp_path, case):
    path = make_bad(case, tmp_path, "big")
    assert path.stat().st_size == 2 * GIB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match=CASES[case]):
            load_rgb(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20  # the header, not the file
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < GIB / 2


def test_grey_with_and_without_alpha_are_refused_alike(tmp_path):
    grey = cell_bgr()[..., 0]
    plain, alpha = tmp_path / "grey.png", tmp_path / "grey_alpha.png"
    Image.fromarray(grey, "L").save(plain)
    Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), "LA").save(alpha)
    assert cv2.imread(str(alpha), cv2.IMREAD_UNCHANGED).shape[2] == 4  # OpenCV alone makes it BGRA
    messages = []
    for path in (plain, alpha):
        with pytest.raises(ImageError, match="is grayscale") as error:
            load_rgb(path)
        messages.append(str(error.value).replace(str(path), "PATH"))
    assert messages[0] == messages[1]


def test_os2_bmp_is_not_called_grayscale(tmp_path):
    path = make_bad("bmp_os2", tmp_path, "os2")
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).ndim == 2  # what OpenCV alone makes of it
    with pytest.raises(ImageError, match="OS/2 BMP") as error:
        load_rgb(path)
    assert "grayscale" not in str(error.value)


def test_four_bit_bmp_with_a_palette_is_still_read(tmp_path):
    palette = bytes([0, 0, 0, 0, 110, 60, 160, 0]) + bytes(4 * 14)  # index 1: the cell's colour (BGR0)
    pixels = bytes([0x11] * 20) * 40  # every pixel index 1
    stride_bytes = len(pixels)
    dib = struct.pack("<IiiHHIIiiII", 40, 40, 40, 1, 4, 0, stride_bytes, 2835, 2835, 16, 0)
    offset = 14 + len(dib) + len(palette)
    path = tmp_path / "four_bit.bmp"
    path.write_bytes(b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + dib + palette + pixels)
    assert (load_rgb(path) == (160, 60, 110)).all()


def test_headers_of_common_encoders_are_read(tmp_path):
    """The header checks accept what cv2 and Pillow write: EXIF and progressive JPEG, LZW TIFF, PNG, BMP."""
    rgb = cell_bgr()[..., ::-1]
    exif = Image.Exif()
    exif[0x010E] = "a cell"  # ImageDescription: an APP1 segment before the frame header
    Image.fromarray(rgb).save(tmp_path / "exif.jpg", quality=100, exif=exif, progressive=True)
    Image.fromarray(rgb).save(tmp_path / "pillow.tif", compression="tiff_lzw")
    Image.fromarray(rgb).save(tmp_path / "pillow.png", optimize=True)
    for ext in (".png", ".jpg", ".tif", ".bmp"):
        cv2.imwrite(str(tmp_path / f"opencv{ext}"), cell_bgr())
    for path in sorted(tmp_path.iterdir()):
        image = load_rgb(path)
        assert image.shape == (40, 40, 3), path
        assert np.abs(image.astype(int) - rgb).mean() < 3, path  # JPEG is lossy, the rest exact


def test_a_png_with_a_valid_header_but_corrupt_data_is_named(tmp_path):
    png = bytearray(cv2.imencode(".png", cell_bgr())[1].tobytes())
    idat = png.find(b"IDAT")
    png[idat + 8:idat + 40] = bytes(32)  # the compressed pixels destroyed, the header intact
    path = tmp_path / "UID_1_1_1_all.png"
    path.write_bytes(bytes(png))
    with pytest.raises(ImageError, match="cannot be decoded") as error:
        load_rgb(path)
    assert str(path) in str(error.value)


def test_a_jpeg_without_frame_header_is_named(tmp_path):
    path = tmp_path / "no_frame.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9")
    with pytest.raises(ImageError, match="no frame header") as error:
        load_rgb(path)
    assert str(path) in str(error.value)


def test_png_header_parse_matches_pillow(tmp_path):
    """The IHDR fields read are the ones Pillow reads (a cross-check of the offsets)."""
    from modules.preprocessing.cells import read_header

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((23, 57, 3), np.uint8)).save(buffer, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buffer.getvalue())
    with open(path, "rb") as handle:
        header = read_header(str(path), handle)
    assert (header.kind, header.width, header.height, header.grayscale) == ("PNG", 57, 23, False)


# ----------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("case", CASES)
def test_prepare_names_a_bad_file_and_skip_bad_lists_it(tmp_path, capsys, case):
    root = tiny_dataset(tmp_path / "data")
    bad = make_bad(case, root / "training_data" / "fold_0" / "hem", "UID_H1_9_9_hem")
    command = ["prepare", "--data", str(root), "--out", str(tmp_path / "out"), "--size", "16", "--no-progress"]
    assert cli.main(command) == 2
    error = capsys.readouterr().err
    assert str(bad) in error and re.search(CASES[case], error) and "--skip-bad" in error
    assert cli.main([*command, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert str(bad) in out  # the summary lists it
    meta = json.loads((Path(out.strip().splitlines()[-1]) / "meta.json").read_text())
    assert [item["path"] for item in meta["skipped"]] == [str(bad)]
    assert re.search(CASES[case], meta["skipped"][0]["error"]) and meta["count"] == 8


# ----------------------------------------------------------------------------- train, predict, evaluate


def bad_folder(folder: Path, prefix: str = "UID_H1_9") -> list[Path]:
    """Every case's file in ``folder``, named as hem cells."""
    folder.mkdir(parents=True, exist_ok=True)
    return [make_bad(case, folder, f"{prefix}_{n}_hem") for n, case in enumerate(CASES)]


@pytest.mark.slow
def test_predict_skip_bad_lists_every_bad_file(tiny_run_dir, tmp_path, capsys):
    folder = tmp_path / "cells"
    bad = bad_folder(folder)
    for n in range(2):
        cv2.imwrite(str(folder / f"good_{n}.bmp"), cell_bgr())
    csv = tmp_path / "predictions.csv"
    assert cli.main(["predict", "--model", str(tiny_run_dir), str(folder), "--csv", str(csv)]) == 2
    error = capsys.readouterr().err
    assert any(str(path) in error for path in bad) and "--skip-bad" in error
    assert cli.main(["predict", "--model", str(tiny_run_dir), str(folder), "--csv", str(csv), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    for path, (case, expected) in zip(bad, CASES.items()):
        line = next(line for line in out.splitlines() if line.startswith(f"skipped {path}:"))
        assert re.search(expected, line), case
    assert sorted(Path(p).name for p in pd.read_csv(csv)["path"]) == ["good_0.bmp", "good_1.bmp"]


@pytest.mark.slow
def test_evaluate_skip_bad_lists_every_bad_file(tiny_run_dir, tmp_path, capsys):
    root = tiny_dataset(tmp_path / "data", patients=3)
    bad = bad_folder(root / "training_data" / "fold_0" / "hem")
    command = ["evaluate", "--model", str(tiny_run_dir), "--data", str(root), "--split", "train",
               "--out", str(tmp_path / "out"), "--bootstrap", "10", "--no-viz"]
    assert cli.main(command) == 2
    error = capsys.readouterr().err
    assert any(str(path) in error for path in bad) and "--skip-bad" in error
    assert cli.main([*command, "--skip-bad"]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    skipped = {item["path"]: item["error"] for item in json.loads((folder / "metrics.json").read_text())["skipped"]}
    assert sorted(skipped) == sorted(map(str, bad))
    for path, expected in zip(bad, CASES.values()):
        assert re.search(expected, skipped[str(path)])


@pytest.mark.slow
def test_train_names_a_bad_file_and_skip_bad_trains_without_it(tmp_path, capsys):
    root = tiny_dataset(tmp_path / "data", patients=3)
    bad = bad_folder(root / "training_data" / "fold_0" / "hem")
    command = ["train", "--data", str(root), "--out", str(tmp_path / "out"), "--size", "16", "--epochs", "1",
               "--batch-size", "4", "--base-filters", "4", "--depth", "2"]
    assert cli.main(command) == 2
    error = capsys.readouterr().err
    assert all(str(path) in error for path in bad) and "--skip-bad" in error  # the prepare lists them all
    assert cli.main([*command, "--skip-bad"]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    arrays = Path(json.loads((run / "config.json").read_text())["data"]["arrays_dir"])
    meta = json.loads((arrays / "meta.json").read_text())
    assert sorted(item["path"] for item in meta["skipped"]) == sorted(map(str, bad)) and meta["count"] == 12
