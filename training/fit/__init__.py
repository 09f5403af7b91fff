"""Stage 4, fit: the strategies, how a candidate is chosen, calibrated and evaluated."""
