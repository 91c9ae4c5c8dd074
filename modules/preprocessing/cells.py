"""One cell: decode its image file, find the cell, square it, resize it and derive its mask."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import cv2
import numpy as np

from modules import config

#: Largest output side, margin and canvas (input pixels) accepted: far beyond the 450 px C-NMC
#: cells, and small enough that one padded square stays within a few hundred MB.
MAX_SIZE, MAX_EXTENT = 4096, 4096


class ImageError(ValueError):
    """An image cannot be used (unreadable, empty, wrong channels, no cell); the message names it."""


@contextlib.contextmanager
def quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's own log lines for unreadable files: our ImageError says it better."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def read_bgr(path: str | os.PathLike) -> np.ndarray:
    """Read an image file (any format OpenCV reads) as (H, W, 3) uint8 BGR, or raise ImageError naming it."""
    path = os.fspath(path)
    try:  # Python's open() also takes paths cv2.imread cannot (non-ASCII on Windows)
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}; scan the dataset again") from None
    if not data:
        raise ImageError(f"{path} is empty (0 bytes), probably an interrupted copy; copy it again from the download")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        stated = int.from_bytes(data[2:6], "little")  # a BMP header states the file's size
        if data[:2] == b"BM" and data[6:10] == bytes(4) and stated > len(data):
            raise ImageError(f"{path} is truncated ({len(data)} of {stated} bytes): copy it again from the download")
        raise ImageError(f"{path} cannot be decoded: the file is corrupt, truncated or not really a "
                         f"{os.path.splitext(path)[1]} image; copy it again from the download")
    if image.dtype != np.uint8:
        raise ImageError(f"{path} has {image.dtype} pixels; C-NMC cells are 8-bit RGB: save it as 8-bit RGB")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 1:
        raise ImageError(f"{path} is grayscale; C-NMC cells are RGB and the stain colour matters, so it is not "
                         "converted: use the original RGB file")
    if channels == 4:
        # An opaque alpha channel (some converters add one) carries nothing; a transparent one would hide the cell.
        if image[..., 3].min() < 255:
            raise ImageError(f"{path} is RGBA with transparent pixels; C-NMC cells are RGB without transparency: "
                             "use the original file or save it as RGB")
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if channels != 3:
        raise ImageError(f"{path} has {channels} channels; C-NMC cells are RGB (3 channels): use the original file")
    return image


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read one cell image (.bmp, .png, .jpg, .tif …) as (H, W, 3) uint8 RGB.

    Raises:
        ImageError: The file is empty, corrupt, truncated, grayscale, RGBA with transparency
            or not 8-bit; the message names the file and the fix.
    """
    with quiet_opencv():
        return cv2.cvtColor(read_bgr(path), cv2.COLOR_BGR2RGB)


def check_settings(size: int, margin: int, threshold: int, canvas: int, min_size: int = 8) -> None:
    """Raise ValueError unless size (``min_size`` to ``MAX_SIZE``), margin and canvas (0 to
    ``MAX_EXTENT``) and threshold (0 to 254) are integers in range."""
    values = {"size": size, "margin": margin, "threshold": threshold, "canvas": canvas}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, not {value!r}")
    if not (min_size <= size <= MAX_SIZE and 0 <= margin <= MAX_EXTENT and 0 <= canvas <= MAX_EXTENT
            and 0 <= threshold <= 254):
        raise ValueError(f"need {min_size} <= size <= {MAX_SIZE}, 0 <= margin, canvas <= {MAX_EXTENT} and "
                         f"0 <= threshold <= 254 (got size={size}, margin={margin}, canvas={canvas}, "
                         f"threshold={threshold})")


def cell_mask(image: np.ndarray, threshold: int = config.BACKGROUND_THRESHOLD) -> np.ndarray:
    """(H, W) uint8 mask, 1 where any channel is above ``threshold`` (the background is black)."""
    return (cv2.inRange(image, (0, 0, 0), (threshold,) * 3) == 0).view(np.uint8)  # 15x NumPy's any(axis=2)


def cell_square(rgb: np.ndarray, margin: int = config.DEFAULT_MARGIN,
                threshold: int = config.BACKGROUND_THRESHOLD,
                canvas: int = config.DEFAULT_CANVAS) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
    """The box of the pixels with a channel above ``threshold``, and the square ``preprocess_image`` keeps.

    Returns:
        ``((y, x, height, width), (top, left, side))`` in input pixels: the square, centred on the
        box, has the box's longer side plus ``2 * margin`` (at least ``canvas``) and may reach past
        the image's edges. Raises ImageError when no pixel is above the threshold.
    """
    flat = rgb.reshape(rgb.shape[0], -1)  # one row of bytes per pixel row: two cheap passes, no full mask
    rows = np.flatnonzero(flat.max(axis=1) > threshold)
    if rows.size == 0:
        raise ImageError(f"no cell pixels (every channel <= {threshold}): the image is black")
    columns = np.flatnonzero(flat[rows[0]:rows[-1] + 1].max(axis=0) > threshold) // 3  # byte -> pixel column
    y, x, height, width = int(rows[0]), int(columns[0]), int(rows[-1] - rows[0]) + 1, int(columns[-1] - columns[0]) + 1
    side = max(max(width, height) + 2 * margin, int(canvas))
    return (y, x, height, width), (y + height // 2 - side // 2, x + width // 2 - side // 2, side)


def preprocess_image(rgb: np.ndarray, size: int, margin: int = config.DEFAULT_MARGIN,
                     threshold: int = config.BACKGROUND_THRESHOLD,
                     canvas: int = config.DEFAULT_CANVAS) -> tuple[np.ndarray, np.ndarray]:
    """Crop a cell to its square (``cell_square``), black where the square leaves the image, and resize it.

    Shrinking averages the input each output pixel covers (no aliasing), enlarging is bilinear
    (``resize_square``). The mask marks the output pixels with a channel above
    ``threshold``: exactly the cell the model sees. Either channel order works and is kept.

    Args:
        rgb: (H, W, 3) uint8 image.
        size: Side of the output square in pixels.
        margin: Background pixels kept around the cell's bounding box, at the input scale.
        threshold: Background threshold (``config.BACKGROUND_THRESHOLD``).
        canvas: Smallest side of the square in input pixels, so that cells keep a common scale; 0 crops tightly.

    Returns:
        ``(image, mask)``: (size, size, 3) uint8 and (size, size) uint8 with 1 on the cell.

    Raises:
        ImageError: No pixel is above the threshold (an all-black image).
        ValueError: ``rgb`` is not a non-empty (H, W, 3) uint8 array, or a setting is out of range.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"preprocess_image needs a non-empty (H, W, 3) uint8 image, not {rgb.dtype} {rgb.shape}")
    check_settings(size, margin, threshold, canvas, min_size=1)
    _, (top, left, side) = cell_square(rgb, margin, threshold, canvas)
    height, width = rgb.shape[:2]
    square = cv2.copyMakeBorder(rgb[max(top, 0):top + side, max(left, 0):left + side],
                                max(-top, 0), max(top + side - height, 0), max(-left, 0), max(left + side - width, 0),
                                cv2.BORDER_CONSTANT, value=0)
    image = resize_square(square, size)
    return image, cell_mask(image, threshold)


def resize_square(square: np.ndarray, size: int) -> np.ndarray:
    """Resize a square image to ``size``: area-averaged when shrinking (no aliasing), bilinear when enlarging.

    A shrink by ``k = side // size >= 2`` first goes bilinear to ``k * size`` (a step of less than
    ``1 + 1/k``, too small to alias) and then averages ``k x k`` blocks: OpenCV's integer-factor
    INTER_AREA path, about twice as fast as its general one, within 0.2 grey levels of it on C-NMC cells.
    """
    side = square.shape[0]
    if side <= size:
        return cv2.resize(square, (size, size), interpolation=cv2.INTER_LINEAR)
    factor = side // size
    if factor >= 2 and side != factor * size:
        square = cv2.resize(square, (factor * size, factor * size), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
