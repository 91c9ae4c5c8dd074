"""Stage 1, data: find C-NMC cells in the Kaggle layout, the synthetic stand-in, patient splits."""
