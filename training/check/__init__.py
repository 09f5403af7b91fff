"""Stage 5, check: know the data (label issues, duplicates, leaks); score unlike images (OOD)."""
