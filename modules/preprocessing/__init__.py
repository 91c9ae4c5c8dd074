"""Stage 2, preprocessing: decode each cell, crop it to its box, resize, derive its mask, cache arrays."""
