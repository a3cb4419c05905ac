"""Evaluation: reward-model accuracy and calibration and `score_texts` (`preference`), metrics
trackers (`metrics`), the paper's tables and plots (`reporting`), per-round diagnostics
(`diagnostics`), and the LLM judge and golden-answer collection (`judge`, `collect_gold`, over
`llm_client`).

`apo_jax.evaluation.score_texts` is the stable API for scoring texts with an exported RM."""

from apo_jax.evaluation.preference import (calibration_bins, expected_calibration_error, preference_accuracy,
                                           score_texts)

__all__ = ["calibration_bins", "expected_calibration_error", "preference_accuracy", "score_texts"]
