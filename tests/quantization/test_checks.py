"""The checks quantize() and the callback share: a bound's outcome said once, batches and forwards refused early."""

import math

import pytest
import torch
from torch import nn

from lightning_compress.core.accounting import FLOAT_BITS
from lightning_compress.quantization.checks import bound_outcome, check_finite_batches, check_runs, measure

BITS = {"a": 4, "b": FLOAT_BITS}


@pytest.mark.parametrize(
    ("drops", "bits", "met", "message"),
    [
        ([0.3, 0.01], BITS, True, ""),
        ([0.3, 0.2], BITS, False,
         "`max_metric_drop`=0.05 was not met: the best drop reached was 0.2, and 1 of 2 layers"),
        ([0.3, 0.0], {"a": FLOAT_BITS, "b": FLOAT_BITS}, True,
         "`max_metric_drop`=0.05 was met only with nothing quantized: the best drop reached was 0, and every layer"),
        ([0.3, None], BITS, False, "was not met: the best drop reached was 0.3"),
    ],
)
def test_bound_outcome_says_what_the_fallback_reached(drops, bits, met, message):
    got_met, got = bound_outcome("X", 0.05, drops, bits, FLOAT_BITS)
    assert got_met is met
    assert (message in got and got.startswith("X: ")) if message else got == ""


@pytest.mark.parametrize("value", [0.5, 1, torch.tensor(0.25), torch.tensor([0.75])])
def test_measure_accepts_finite_numbers(value):
    assert measure(lambda m: value, nn.Linear(1, 1)) == float(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, None, "0.9", True, torch.ones(2), [0.5]])
def test_measure_refuses_what_is_not_a_finite_number(value):
    with pytest.raises(ValueError, match=r"`metric_fn` must return a finite number"):
        measure(lambda m: value, nn.Linear(1, 1))


def test_non_finite_batches_are_named_by_index_inside_dicts():
    batches = [{"x": torch.zeros(2, 3)}, {"x": torch.tensor([[0.0, math.inf, 1.0]]), "ids": torch.ones(1, 3).long()}]
    with pytest.raises(ValueError, match=r"`calibration_data` batch 1 holds non-finite values \(0 NaN, 1 inf"):
        check_finite_batches(batches)


def test_a_forward_that_fails_names_the_layer_and_the_shape_it_expects():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"`calibration_data` batch 0 \(tensors shaped \[\(3, 5\)\]\) does not run .*"
                                         r"layer '0' \(Linear\), which got an input shaped \(3, 5\) and expects "
                                         r"\(\.\.\., 4\)"):
        check_runs(model, torch.zeros(3, 5), lambda m, b: m(b))
