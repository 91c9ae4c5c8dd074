"""Stage 4, evaluation: metrics, evaluating a run, predicting new cells, Grad-CAM, cross-validation."""
