"""How often the fine-tune shows each correction: enough to count, never so often that a run
with one or two corrections turns into training on them alone."""

from __future__ import annotations

from bikewatch.offline.finetune import MAX_REPEATS, correction_repeats


def test_corrections_together_weigh_about_as_much_as_the_rest() -> None:
    assert correction_repeats(212, 36) == 6  # the simulated round: 36 corrections among 248 photos
    assert correction_repeats(212, 36, share=0.5) == 3


def test_a_run_full_of_corrections_still_shows_each_at_least_once() -> None:
    assert correction_repeats(10, 100) == 1
    assert correction_repeats(0, 5) == 1


def test_a_single_correction_is_capped() -> None:
    assert correction_repeats(250, 1) == MAX_REPEATS


def test_no_corrections_means_no_repeats() -> None:
    assert correction_repeats(250, 0) == 1
