"""The one ranking the server's Classify and the client's preprocess="client" share."""

from __future__ import annotations

import numpy as np

from tlserve.contract.predictions import DEFAULT_TOP_K, classifications


def test_rows_are_ranked_best_first_with_their_labels_and_flags() -> None:
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    scores = np.array([0.5, 3.0], np.float32)
    first, second = classifications(probabilities, ["a", "b"], 2, scores, threshold=1.0)
    assert [(p.label, p.index) for p in first] == [("b", 1), ("2", 2)]  # unlabelled: its number
    assert [p.label for p in second] == ["a", "b"]  # a tie keeps the lower index first
    assert (first.ood_score, first.out_of_distribution) == (0.5, False)
    assert (second.ood_score, second.out_of_distribution) == (3.0, True)


def test_top_k_0_is_the_default_and_no_scores_flag_nothing() -> None:
    [result] = classifications(np.linspace(0, 1, 10)[None], [], 0)
    assert len(result) == DEFAULT_TOP_K
    assert result.ood_score is None and not result.out_of_distribution
