"""Stage 3, modeling: the U-Net with its classification head, hardware choices, training, saving."""
