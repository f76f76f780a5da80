"""Tests of the learning-rate schedule."""

import pytest

from leukemia_tf.training.schedules import TwoStageWarmupCosine


def _lr(schedule, step):
    return float(schedule(step))


def test_single_stage_warmup_then_cosine_to_min():
    s = TwoStageWarmupCosine(
        1e-3, total_steps=100, warmup_steps=10, min_ratio=0.01, stage2_factor=0.1
    )
    assert _lr(s, 0) == pytest.approx(1e-4)
    assert _lr(s, 9) == pytest.approx(1e-3)
    assert _lr(s, 10) == pytest.approx(1e-3)
    assert _lr(s, 55) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5), rel=1e-4)
    assert _lr(s, 100) == pytest.approx(1e-5)
    # stage2_factor only applies after a frozen stage.
    assert max(_lr(s, i) for i in range(100)) == pytest.approx(1e-3)


def test_two_stages_restart_at_lower_peak():
    s = TwoStageWarmupCosine(
        1e-3, total_steps=100, warmup_steps=4, min_ratio=0.0, stage1_steps=20, stage2_factor=0.1
    )
    assert _lr(s, 3) == pytest.approx(1e-3)
    assert _lr(s, 19) < 1e-4  # stage 1 has decayed
    assert _lr(s, 20) == pytest.approx(1e-4 / 4)  # stage 2 warms up again
    assert _lr(s, 23) == pytest.approx(1e-4)
    assert max(_lr(s, i) for i in range(20, 100)) == pytest.approx(1e-4)


def test_config_round_trip():
    s = TwoStageWarmupCosine(1e-3, 50, 5, 0.1, 10, 0.5)
    again = TwoStageWarmupCosine.from_config(s.get_config())
    assert [_lr(again, i) for i in range(50)] == [_lr(s, i) for i in range(50)]
