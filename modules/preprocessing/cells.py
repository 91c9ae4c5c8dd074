"""One cell: decode its image file, find the cell, square it, resize it and derive its mask."""
from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import cv2
import numpy as np

from modules import config

#: Largest output side, margin and canvas (input pixels): far beyond the 450 px C-NMC cells.
MAX_SIZE, MAX_EXTENT = 4096, 4096


class ImageError(ValueError):
    """An image cannot be used (unreadable, malformed, too large, wrong channels, no cell); the message names it."""


@contextlib.contextmanager
def quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's own log lines for unreadable files: our ImageError says it better."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def undecodable(path: str, reason: str, fix: str = "copy it again from the download") -> ImageError:
    """The ImageError for a file that cannot be decoded: names it, says why and what to do."""
    return ImageError(f"{path} cannot be decoded: {reason}; {fix}")


def grayscale(path: str) -> ImageError:
    """The ImageError for a grey image, with or without alpha (the same cells to the model: both refused)."""
    return ImageError(f"{path} is grayscale; C-NMC cells are RGB and the stain colour matters, so it is not "
                      "converted: use the original RGB file")

#: Largest image read, checked in its header before the file is read, so a crafted or foreign file is refused
#: by name, not by OpenCV (whose OPENCV_IO_MAX_IMAGE_PIXELS is read when cv2 loads, before this module could set it).
MAX_SIDE, MAX_PIXELS = 16_384, 2**26
#: Bytes a file may hold beyond 8 per pixel (16-bit RGBA): metadata, colour profiles, thumbnails.
SLACK_BYTES = 16 * 2**20
BMP_INFO_SIZES = (40, 52, 56, 108, 124)  # BITMAPINFOHEADER and its V2 to V5 extensions
OS2_BMP_SIZES = (12, 16, 64)  # BITMAPCOREHEADER and OS/2 2.x: OpenCV reads them as grayscale garbage
#: JPEG start-of-frame markers (C4, C8 and CC are other segments).
JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: Segments a JPEG may have before its frame header: EXIF, ICC and comment blocks are a handful.
JPEG_MAX_SEGMENTS = 1000


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read before the file is."""

    kind: str  # BMP, PNG, JPEG or TIFF
    width: int
    height: int
    grayscale: bool = False
    needs: int | None = None  # exact bytes its pixels need (uncompressed BMP); None when compressed


def bmp_header(path: str, head: bytes) -> ImageHeader:
    """Width and height of a Windows BMP; refuses OS/2 BMPs, pixel offsets into the header, missing palettes."""
    if len(head) < 18:
        raise undecodable(path, "its BMP header is cut short")
    offset, info = struct.unpack_from("<II", head, 10)
    if info in OS2_BMP_SIZES:
        raise undecodable(path, f"it is an OS/2 BMP ({info}-byte header), which OpenCV misreads",
                          "save it as a Windows BMP or PNG")
    if info not in BMP_INFO_SIZES or len(head) < 54:
        raise undecodable(path, f"its BMP header is corrupt (header size {info})")
    width, height, planes, bits, compression = struct.unpack_from("<iiHHI", head, 18)
    colours = struct.unpack_from("<I", head, 46)[0]
    if planes != 1 or bits not in (1, 4, 8, 16, 24, 32) or compression not in (0, 1, 2, 3):
        raise undecodable(path, f"its BMP header is corrupt or unsupported ({planes} planes, {bits} bits per "
                                f"pixel, compression {compression})")
    header_end = 14 + info + (12 if compression == 3 and info == 40 else 0)  # bit masks follow a short header
    if offset < header_end:
        raise undecodable(path, f"its pixel offset ({offset}) points into its {header_end}-byte header")
    palette = (colours or 1 << bits) if bits <= 8 else 0
    if offset < header_end + 4 * palette:
        raise undecodable(path, f"its {bits}-bit pixels need a palette of {palette} colours and it has none "
                                f"(the pixels start at byte {offset})")
    needs = offset + (width * bits + 31) // 32 * 4 * abs(height) if compression in (0, 3) else None
    return ImageHeader("BMP", width, abs(height), needs=needs)  # a negative height: rows stored top-down


def png_header(path: str, head: bytes) -> ImageHeader:
    """Width, height and colour type of a PNG from its IHDR chunk (types 0 and 4 are grey)."""
    if len(head) < 26 or head[8:16] != b"\0\0\0\x0dIHDR":
        raise undecodable(path, "its PNG header (IHDR) is missing or corrupt")
    width, height, _, colour = struct.unpack_from(">IIBB", head, 16)
    return ImageHeader("PNG", width, height, grayscale=colour in (0, 4))


def jpeg_header(path: str, handle: BinaryIO) -> ImageHeader:
    """Width, height and components of a JPEG from its frame header, skipping the segments before it."""
    handle.seek(2)
    for _ in range(JPEG_MAX_SEGMENTS):
        marker = handle.read(2)
        while marker[1:] == b"\xff":  # fill bytes may pad a marker
            marker = marker[1:] + handle.read(1)
        if len(marker) < 2 or marker[0] != 0xFF or marker[1] in (0xD9, 0xDA):
            break  # not a marker, or the end or the image data before any frame header
        if 0xD0 <= marker[1] <= 0xD7 or marker[1] == 0x01:
            continue  # standalone markers carry no length
        segment = handle.read(8 if marker[1] in JPEG_FRAMES else 2)
        if len(segment) < 2 or int.from_bytes(segment[:2], "big") < 2:
            break
        if marker[1] in JPEG_FRAMES and len(segment) == 8:
            height, width, components = struct.unpack_from(">HHB", segment, 3)
            return ImageHeader("JPEG", width, height, grayscale=components == 1)
        handle.seek(int.from_bytes(segment[:2], "big") - 2, os.SEEK_CUR)
    raise undecodable(path, "its JPEG markers are corrupt: no frame header (SOF) gives its size")


def tiff_header(path: str, handle: BinaryIO, head: bytes) -> ImageHeader:
    """Width, height and photometric type of a TIFF from its first image directory (IFD)."""
    if len(head) < 8:
        raise undecodable(path, "its TIFF header is cut short")
    order = "<" if head[:2] == b"II" else ">"
    handle.seek(struct.unpack_from(order + "I", head, 4)[0])
    count = int.from_bytes(handle.read(2).ljust(2, b"\0"), "little" if order == "<" else "big")
    entries = handle.read(12 * count)
    tags = {}
    for tag, kind, _, value in struct.iter_unpack(order + "HHI4s", entries[:len(entries) // 12 * 12]):
        if kind in (3, 4):  # SHORT or LONG: a single value is stored in the entry itself
            tags[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), value)[0]
    if 256 not in tags or 257 not in tags:  # ImageWidth, ImageLength
        raise undecodable(path, "its TIFF image directory is corrupt: it gives no width and height")
    return ImageHeader("TIFF", tags[256], tags[257], grayscale=tags.get(262) in (0, 1))  # grey photometrics


def read_header(path: str, handle: BinaryIO) -> ImageHeader:
    """The header of a BMP, PNG, JPEG or TIFF file, found by its signature (not by its name)."""
    head = handle.read(64)
    if head[:2] == b"BM":
        return bmp_header(path, head)
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return png_header(path, head)
    if head[:3] == b"\xff\xd8\xff":
        return jpeg_header(path, handle)
    if head[:4] in (b"II*\0", b"MM\0*"):
        return tiff_header(path, handle, head)
    if head[:4] in (b"II+\0", b"MM\0+"):
        raise undecodable(path, "it is a BigTIFF, which cell images never need", "save it as PNG or TIFF")
    raise undecodable(path, f"it is not a BMP, PNG, JPEG or TIFF image (its first bytes are no image signature, "
                            f"whatever its {os.path.splitext(path)[1] or 'missing'} extension says)")


def check_header(path: str, header: ImageHeader, file_size: int) -> None:
    """Refuse a header whose size is beyond the cap, a file cut short of it or far beyond it, and grey images."""
    width, height, kind = header.width, header.height, header.kind
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE and width * height <= MAX_PIXELS):
        raise undecodable(path, f"its {kind} header claims {width:,} x {height:,} pixels; cell images are at most "
                                f"{MAX_SIDE:,} pixels a side and 2^26 ({MAX_PIXELS:,}) pixels in all (C-NMC cells "
                                "are 450 x 450)", "the file is corrupt or not a cell image: replace or remove it")
    if header.needs is not None and file_size < header.needs:
        raise ImageError(f"{path} is truncated ({file_size} of {header.needs} bytes): copy it again from the download")
    limit = (header.needs or 8 * width * height) + SLACK_BYTES
    if file_size > limit:
        raise undecodable(path, f"it holds {file_size:,} bytes, far more than the {width} x {height} pixels of its "
                                f"{kind} header need (at most {limit:,})",
                          "it is not a single cell image or it is corrupt: replace or remove it")
    if header.grayscale:
        raise grayscale(path)


def decode(path: str, data: bytes, header: ImageHeader) -> np.ndarray:
    """OpenCV's decoding of a checked file; its errors and a size other than the header's become ImageErrors."""
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as error:
        raise undecodable(path, f"OpenCV refused it ({str(error).strip().splitlines()[-1]})") from None
    except MemoryError:
        raise undecodable(path, f"its {header.width} x {header.height} pixels do not fit in memory",
                          "free memory or remove the file") from None
    if image is None:
        raise undecodable(path, f"the file is corrupt, truncated or not really a {os.path.splitext(path)[1]} image")
    if image.shape[:2] != (header.height, header.width):
        raise undecodable(path, f"it decodes to {image.shape[1]} x {image.shape[0]} pixels but its {header.kind} "
                                f"header says {header.width} x {header.height}: the file is inconsistent")
    return image


def read_bgr(path: str | os.PathLike) -> np.ndarray:
    """An image file (BMP, PNG, JPEG or TIFF) as (H, W, 3) uint8 BGR, or ImageError naming it; its header is checked
    before the file is read, so memory stays bounded whatever the file holds."""
    path = os.fspath(path)
    try:  # Python's open() also takes paths cv2.imread cannot (non-ASCII on Windows); unbuffered: read once
        with open(path, "rb", buffering=0) as handle:
            file_size = os.fstat(handle.fileno()).st_size
            if not file_size:
                raise ImageError(f"{path} is empty (0 bytes), probably an interrupted copy; copy it again from the "
                                 "download")
            header = read_header(path, handle)
            check_header(path, header, file_size)
            handle.seek(0)
            data = handle.read(file_size)  # no more than checked, even if the file grows meanwhile
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}; scan the dataset again") from None
    image = decode(path, data, header)
    if image.dtype != np.uint8:
        raise ImageError(f"{path} has {image.dtype} pixels; C-NMC cells are 8-bit RGB: save it as 8-bit RGB")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 1:
        raise grayscale(path)
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
    """One cell image as (H, W, 3) uint8 RGB (``read_bgr``, OpenCV's own log silenced)."""
    with quiet_opencv():
        return cv2.cvtColor(read_bgr(path), cv2.COLOR_BGR2RGB)


def check_settings(size: int, margin: int, threshold: int, canvas: int, min_size: int = 8) -> None:
    """Raise ValueError unless size, margin, threshold and canvas are integers in range."""
    for name, value in {"size": size, "margin": margin, "threshold": threshold, "canvas": canvas}.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, not {value!r}")
    if not (min_size <= size <= MAX_SIZE and 0 <= margin <= MAX_EXTENT and 0 <= canvas <= MAX_EXTENT
            and 0 <= threshold <= 254):
        raise ValueError(f"need {min_size} <= size <= {MAX_SIZE}, 0 <= margin, canvas <= {MAX_EXTENT} and 0 <= "
                         f"threshold <= 254 (got size={size}, margin={margin}, canvas={canvas}, threshold={threshold})")


def cell_mask(image: np.ndarray, threshold: int = config.BACKGROUND_THRESHOLD) -> np.ndarray:
    """(H, W) uint8 mask, 1 where any channel is above ``threshold`` (the background is black)."""
    return (cv2.inRange(image, (0, 0, 0), (threshold,) * 3) == 0).view(np.uint8)  # 15x NumPy's any(axis=2)


def cell_square(rgb: np.ndarray, margin: int = config.DEFAULT_MARGIN,
                threshold: int = config.BACKGROUND_THRESHOLD,
                canvas: int = config.DEFAULT_CANVAS) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
    """``((y, x, height, width), (top, left, side))``: the box of the pixels with a channel above ``threshold`` and
    the square centred on it that ``preprocess_image`` keeps (the box's longer side plus ``2 * margin``, at least
    ``canvas``; it may reach past the image). ImageError when no pixel is above the threshold."""
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
    """``(image, mask)`` of (size, size, 3) and (size, size) uint8: the cell's square (``cell_square``; black where
    it leaves the image) resized by ``resize_square``, and 1 where a channel is above ``threshold``. Either channel
    order works and is kept; ``canvas`` (the square's smallest side) keeps cells at a common scale (0 crops tightly)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"preprocess_image needs a non-empty (H, W, 3) uint8 image, not {rgb.dtype} {rgb.shape}")
    check_settings(size, margin, threshold, canvas, min_size=1)
    _, (top, left, side) = cell_square(rgb, margin, threshold, canvas)
    height, width = rgb.shape[:2]
    square = rgb[max(top, 0):top + side, max(left, 0):left + side]
    if square.shape[:2] != (side, side):  # the square reaches past the image: black beyond its edges
        square = cv2.copyMakeBorder(square, max(-top, 0), max(top + side - height, 0), max(-left, 0),
                                    max(left + side - width, 0), cv2.BORDER_CONSTANT, value=0)
    image = resize_square(square, size)
    return image, cell_mask(image, threshold)


def resize_square(square: np.ndarray, size: int) -> np.ndarray:
    """A square image resized to ``size``: area-averaged when shrinking (no aliasing), bilinear when enlarging.

    A shrink by ``k = side // size >= 2`` goes bilinear to ``k * size`` (too small a step to alias), then through
    OpenCV's integer-factor INTER_AREA: twice as fast as its general path, within 0.2 grey levels of it."""
    side = square.shape[0]
    if side <= size:
        return cv2.resize(square, (size, size), interpolation=cv2.INTER_LINEAR)
    factor = side // size
    if factor >= 2 and side != factor * size:
        square = cv2.resize(square, (factor * size, factor * size), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)
