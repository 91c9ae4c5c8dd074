"""Stage 2, preprocessing: decode each cell, crop it to its box, resize, derive its mask, cache arrays."""
from modules.preprocessing.arrays import PreparedArrays, default_workers, load_arrays, prepare_arrays
from modules.preprocessing.cells import ImageError, cell_square, check_settings, load_rgb, preprocess_image

__all__ = ["ImageError", "PreparedArrays", "cell_square", "check_settings", "default_workers", "load_arrays",
           "load_rgb", "prepare_arrays", "preprocess_image"]
