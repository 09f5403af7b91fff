"""Stage 1, data: find the labelled images of a run and split them."""
