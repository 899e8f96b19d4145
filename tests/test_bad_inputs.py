"""Bad inputs, table-driven (issue 13), part 1: the callbacks' constructors, ``quantize`` and the pattern helpers.

Every case asserts the error type and that the message names the argument and the value received. Constructors
run before any Trainer exists, so no step can have run; ``quantize`` cases also assert that no weight changed.
Setup-time, loader and CLI cases: ``tests/test_bad_inputs_fit.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_compress import GradientStabilityPruning, PostTrainingQuantization, quantize
from lightning_compress.core.selection import Selection, check_patterns_match, explain_matches
from lightning_compress.quantization import GPTQConfig

Case = tuple[str, dict[str, Any], type[Exception], tuple[str, ...]]  # id, kwargs, error, texts the message holds

PRUNING: list[Case] = [
    ("sparsity_one", {"sparsity": 1.0}, ValueError, ("sparsity", "1.0")),
    ("sparsity_negative", {"sparsity": -0.1}, ValueError, ("sparsity", "-0.1")),
    ("sparsity_string", {"sparsity": "0.5"}, TypeError, ("sparsity", "'0.5'")),
    ("sparsity_nan", {"sparsity": math.nan}, ValueError, ("sparsity", "nan")),
    ("sparsity_inf", {"sparsity": math.inf}, ValueError, ("sparsity", "inf")),
    ("sparsity_bool", {"sparsity": True}, TypeError, ("sparsity", "True")),
    ("criterion_unknown", {"criterion": "l1"}, ValueError, ("criterion", "'l1'")),
    ("criterion_none", {"criterion": None}, ValueError, ("criterion", "None")),
    ("structured_string", {"structured": "yes"}, TypeError, ("structured", "'yes'")),
    ("structured_int", {"structured": 1}, TypeError, ("structured", "1")),
    ("scope_unknown", {"scope": "local"}, ValueError, ("scope", "'local'")),
    ("schedule_unknown", {"schedule": "cubic"}, ValueError, ("schedule", "'cubic'")),
    ("schedule_unit_unknown", {"schedule_unit": "batch"}, ValueError, ("schedule_unit", "'batch'")),
    ("start_step_zero", {"schedule": "constant", "start_step": 0}, ValueError, ("start_step", "0")),
    ("one_shot_start_zero_epoch", {"schedule": "one_shot", "start_step": 0, "schedule_unit": "epoch"}, ValueError,
     ("start_step", "0")),
    ("one_shot_start_zero_magnitude", {"schedule": "one_shot", "start_step": 0, "criterion": "magnitude"},
     ValueError, ("start_step", "0")),
    ("start_step_float", {"start_step": 2.5}, TypeError, ("start_step", "2.5")),
    ("end_before_start", {"start_step": 10, "end_step": 5}, ValueError, ("end_step", "5", "10")),
    ("polynomial_end_equals_start", {"start_step": 5, "end_step": 5}, ValueError, ("end_step", "5")),
    ("frequency_zero", {"frequency": 0}, ValueError, ("frequency", "0")),
    ("frequency_string", {"frequency": "2"}, TypeError, ("frequency", "'2'")),
    ("amount_above_one", {"amount": 1.5}, ValueError, ("amount", "1.5")),
    ("amount_zero", {"amount": 0.0}, ValueError, ("amount", "0.0")),
    ("initial_above_final", {"initial_sparsity": 0.9, "sparsity": 0.5}, ValueError, ("initial_sparsity", "0.9")),
    ("initial_negative", {"initial_sparsity": -0.2}, ValueError, ("initial_sparsity", "-0.2")),
    ("thresholds_and_sparsity", {"mean_threshold": 0.1, "std_threshold": 0.1}, ValueError, ("sparsity", "0.1")),
    ("no_sparsity_no_thresholds", {"sparsity": None}, ValueError, ("mean_threshold", "None")),
    ("threshold_negative", {"sparsity": None, "mean_threshold": -1.0, "std_threshold": 0.1}, ValueError,
     ("mean_threshold", "-1.0")),
    ("thresholds_without_gradients", {"sparsity": None, "mean_threshold": 0.1, "std_threshold": 0.1,
                                      "criterion": "magnitude"}, ValueError, ("criterion", "'magnitude'")),
    ("min_keep_one", {"min_keep": 1.0}, ValueError, ("min_keep", "1.0")),
    ("min_keep_above_kept", {"min_keep": 0.5, "sparsity": 0.8}, ValueError, ("min_keep", "0.5")),
    ("restart_statistics_string", {"restart_statistics": "no"}, TypeError, ("restart_statistics", "'no'")),
    ("statistics_unknown", {"statistics": "per_layer"}, ValueError, ("statistics", "'per_layer'")),
    ("structured_per_weight", {"structured": True, "statistics": "per_weight"}, ValueError,
     ("statistics", "'per_weight'")),
    ("per_weight_every_zero", {"per_weight_every": 0}, ValueError, ("per_weight_every", "0")),
    ("per_weight_every_float", {"per_weight_every": 2.5}, TypeError, ("per_weight_every", "2.5")),
    ("per_weight_every_string", {"per_weight_every": "2"}, TypeError, ("per_weight_every", "'2'")),
    ("per_weight_every_structured", {"structured": True, "per_weight_every": 4}, ValueError,
     ("per_weight_every", "4", "structured=False")),
    ("per_weight_every_magnitude", {"criterion": "magnitude", "per_weight_every": 1}, ValueError,
     ("per_weight_every", "1")),
    ("module_types_string", {"module_types": "Linear"}, TypeError, ("module_types", "'Linear'")),
    ("module_types_unknown", {"module_types": ["Lineer"]}, ValueError, ("module_types", "'Lineer'")),
    ("module_types_empty", {"module_types": []}, ValueError, ("module_types", "[]")),
    ("module_types_not_module", {"module_types": ["torch.Tensor"]}, ValueError, ("module_types", "'torch.Tensor'")),
    ("include_string", {"include": "net.5"}, TypeError, ("include", "'net.5'")),
    ("exclude_string", {"exclude": "net.5"}, TypeError, ("exclude", "'net.5'")),
    ("include_bad_regex", {"include": ["net.("]}, ValueError, ("include", "'net.('")),
    ("exclude_not_strings", {"exclude": [5]}, TypeError, ("exclude", "[5]")),
    ("metric_unknown", {"metric": "accuracy"}, ValueError, ("metric", "'accuracy'")),
    ("metric_not_a_metric", {"metric": "torch.nn.Linear"}, ValueError, ("metric", "'torch.nn.Linear'")),
    ("metric_kwargs_unknown", {"metric_kwargs": {"bogus": 1}}, ValueError, ("metric_kwargs", "'bogus'")),
    ("metric_kwargs_bad_value", {"metric_kwargs": {"average": "weird"}}, ValueError, ("metric_kwargs", "'weird'")),
    ("max_metric_drop_negative", {"max_metric_drop": -0.1}, ValueError, ("max_metric_drop", "-0.1")),
    ("max_metric_drop_string", {"max_metric_drop": "0.01"}, TypeError, ("max_metric_drop", "'0.01'")),
    ("metric_reference_unknown", {"metric_reference": "best"}, ValueError, ("metric_reference", "'best'")),
    ("on_violation_unknown", {"on_violation": "ignore"}, ValueError, ("on_violation", "'ignore'")),
    ("evaluate_string", {"evaluate": "no"}, TypeError, ("evaluate", "'no'")),
    ("compact_string", {"compact": "no"}, TypeError, ("compact", "'no'")),
    ("compact_unstructured", {"compact": True}, ValueError, ("compact", "True")),
    ("verbose_three", {"verbose": 3}, ValueError, ("verbose", "3")),
    ("verbose_float", {"verbose": 1.5}, TypeError, ("verbose", "1.5")),
    ("structured_target_unknown", {"structured": True, "structured_target": "flops"}, ValueError,
     ("structured_target", "'flops'")),
    ("structured_target_macs_unstructured", {"structured_target": "macs"}, ValueError, ("structured_target", "'macs'")),
]

QUANTIZATION: list[Case] = [
    ("bits_nine", {"bits": 9}, ValueError, ("bits", "9")),
    ("bits_one", {"bits": 1}, ValueError, ("bits", "1")),
    ("bits_float", {"bits": 8.0}, TypeError, ("bits", "8.0")),
    ("bits_string", {"bits": "8"}, TypeError, ("bits", "'8'")),
    ("bits_bool", {"bits": True}, TypeError, ("bits", "True")),
    ("granularity_unknown", {"granularity": "per_row"}, ValueError, ("granularity", "'per_row'")),
    ("group_size_zero", {"group_size": 0}, ValueError, ("group_size", "0")),
    ("group_size_negative", {"group_size": -4}, ValueError, ("group_size", "-4")),
    ("group_size_float", {"group_size": 2.5}, TypeError, ("group_size", "2.5")),
    ("symmetric_string", {"symmetric": "yes"}, TypeError, ("symmetric", "'yes'")),
    ("calibration_unknown", {"calibration": "max"}, ValueError, ("calibration", "'max'")),
    ("percentile_fifty", {"percentile": 50}, ValueError, ("percentile", "50")),
    ("percentile_above_100", {"percentile": 101.0}, ValueError, ("percentile", "101.0")),
    ("percentile_nan", {"percentile": math.nan}, ValueError, ("percentile", "nan")),
    ("mse_grid_one", {"mse_grid": 1}, ValueError, ("mse_grid", "1")),
    ("mse_grid_huge", {"mse_grid": 10**6}, ValueError, ("mse_grid", "1000000")),
    ("scale_dtype_unknown", {"scale_dtype": "bfloat16"}, ValueError, ("scale_dtype", "'bfloat16'")),
    ("module_types_string", {"module_types": "Linear"}, TypeError, ("module_types", "'Linear'")),
    ("module_types_unknown", {"module_types": ["Foo"]}, ValueError, ("module_types", "'Foo'")),
    ("include_string", {"include": "fc"}, TypeError, ("include", "'fc'")),
    ("exclude_string", {"exclude": "fc"}, TypeError, ("exclude", "'fc'")),
    ("include_bad_regex", {"include": ["("]}, ValueError, ("include", "'('")),
    ("bits_overrides_bits", {"bits_overrides": {"fc": 9}}, ValueError, ("bits_overrides", "9")),
    ("bits_overrides_regex", {"bits_overrides": {"(": 4}}, ValueError, ("bits_overrides", "'('")),
    ("bits_overrides_list", {"bits_overrides": ["fc"]}, TypeError, ("bits_overrides", "['fc']")),
    ("bits_overrides_string_bits", {"bits_overrides": {"fc": "4"}}, TypeError, ("bits_overrides", "'4'")),
    ("metric_unknown", {"metric": "nope"}, ValueError, ("metric", "'nope'")),
    ("metric_kwargs_unknown", {"metric_kwargs": {"bogus": 1}}, ValueError, ("metric_kwargs", "'bogus'")),
    ("max_metric_drop_negative", {"max_metric_drop": -1.0}, ValueError, ("max_metric_drop", "-1.0")),
    ("max_metric_drop_inf", {"max_metric_drop": math.inf}, ValueError, ("max_metric_drop", "inf")),
    ("fallback_unknown", {"fallback": "int8"}, ValueError, ("fallback", "'int8'")),
    ("export_path_suffix", {"export_path": "model.pt"}, ValueError, ("export_path", "'model.pt'")),
    ("export_path_int", {"export_path": 5}, ValueError, ("export_path", "5")),
    ("save_float_copy_string", {"save_float_copy": "yes"}, TypeError, ("save_float_copy", "'yes'")),
    ("save_float_copy_int", {"save_float_copy": 1}, TypeError, ("save_float_copy", "1")),
    ("method_unknown", {"method": "awq"}, ValueError, ("method", "'awq'")),
    ("calibration_batches_zero", {"calibration_batches": 0}, ValueError, ("calibration_batches", "0")),
    ("calibration_batches_float", {"calibration_batches": 2.5}, TypeError, ("calibration_batches", "2.5")),
    ("calibration_batches_with_rtn", {"calibration_batches": 8}, ValueError, ("calibration_batches", "8", "'rtn'")),
    ("fallback_without_bound", {"fallback": "more_bits"}, ValueError, ("fallback", "'more_bits'", "max_metric_drop")),
    ("embedding_bits_nine", {"embedding_bits": 9}, ValueError, ("embedding_bits", "9")),
    ("embedding_bits_string", {"embedding_bits": "8"}, TypeError, ("embedding_bits", "'8'")),
]


def _check(build: Callable[[], Any], error: type[Exception], texts: tuple[str, ...]) -> None:
    with pytest.raises(error) as info:
        build()
    message = str(info.value)
    for text in texts:
        assert text in message, f"{text!r} missing from the message: {message}"


@pytest.mark.parametrize(("kwargs", "error", "texts"), [c[1:] for c in PRUNING], ids=[c[0] for c in PRUNING])
def test_pruning_constructor_refuses(kwargs: dict[str, Any], error: type[Exception], texts: tuple[str, ...]) -> None:
    _check(lambda: GradientStabilityPruning(**kwargs), error, texts)


@pytest.mark.parametrize(("kwargs", "error", "texts"), [c[1:] for c in QUANTIZATION],
                         ids=[c[0] for c in QUANTIZATION])
def test_quantization_constructor_refuses(kwargs: dict[str, Any], error: type[Exception],
                                          texts: tuple[str, ...]) -> None:
    _check(lambda: PostTrainingQuantization(**kwargs), error, texts)


# ---------------------------------------------------------------------------- quantize()
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))


def _poisoned(value: float) -> nn.Module:
    net = _net()
    with torch.no_grad():
        net[0].weight[3, 5] = value
    return net


def _nan_after_first() -> Callable[[nn.Module], float]:
    calls: list[int] = []

    def metric(model: nn.Module) -> float:
        calls.append(1)
        return 1.0 if len(calls) == 1 else math.nan  # the float model measures, the quantized one does not

    return metric


def _nan_batch() -> torch.Tensor:
    batch = torch.zeros(2, 8)
    batch[1, 3] = math.nan
    return batch


FUNCTIONAL: list[Case] = [
    ("bits_nine", {"bits": 9}, ValueError, ("bits", "9")),
    ("bits_one", {"bits": 1}, ValueError, ("bits", "1")),
    ("granularity_unknown", {"granularity": "rows"}, ValueError, ("granularity", "'rows'")),
    ("group_size_zero", {"granularity": "per_group", "group_size": 0}, ValueError, ("group_size", "0")),
    ("group_size_not_dividing", {"granularity": "per_group", "group_size": 5}, ValueError,
     ("group_size", "5", "'0'")),
    ("symmetric_string", {"symmetric": "no"}, TypeError, ("symmetric", "'no'")),
    ("calibration_unknown", {"calibration": "kl"}, ValueError, ("calibration", "'kl'")),
    ("percentile_zero", {"calibration": "percentile", "percentile": 0}, ValueError, ("percentile", "0")),
    ("mse_grid_zero", {"calibration": "mse", "mse_grid": 0}, ValueError, ("mse_grid", "0")),
    ("scale_dtype_int8", {"scale_dtype": "int8"}, ValueError, ("scale_dtype", "'int8'")),
    ("module_types_string", {"module_types": "Linear"}, TypeError, ("module_types", "'Linear'")),
    ("module_types_unknown", {"module_types": ["Nope"]}, ValueError, ("module_types", "'Nope'")),
    ("include_string", {"include": "0"}, TypeError, ("include", "'0'")),
    ("exclude_string", {"exclude": "0"}, TypeError, ("exclude", "'0'")),
    ("include_matches_nothing", {"include": ["nomatch"]}, ValueError, ("include", "nomatch")),
    ("bits_overrides_one", {"bits_overrides": {"0": 1}}, ValueError, ("bits_overrides", "1")),
    ("bits_overrides_bad_regex", {"bits_overrides": {"[": 4}}, ValueError, ("bits_overrides", "'['")),
    # arguments that would do nothing (issue 19, cluster 7)
    ("rtn_calibration_data", {"calibration_data": [torch.zeros(2, 8)]}, ValueError,
     ("calibration_data", "list", "'rtn'")),
    ("rtn_forward", {"forward": lambda m, b: m(b)}, ValueError, ("forward", "function", "'rtn'")),
    ("rtn_gptq", {"gptq": GPTQConfig()}, ValueError, ("gptq", "GPTQConfig", "'rtn'")),
    ("rtn_progress", {"progress": print}, ValueError, ("progress", "builtin_function_or_method", "'rtn'")),
    ("rtn_calibration_batches", {"calibration_batches": 4}, ValueError, ("calibration_batches", "4", "'rtn'")),
    ("fallback_without_bound", {"fallback": "float"}, ValueError, ("fallback", "'float'", "max_metric_drop")),
    # metric_fn (issue 19, cluster 5)
    ("metric_fn_not_callable", {"metric_fn": 0.5}, TypeError, ("metric_fn", "0.5")),
    ("metric_fn_nan", {"metric_fn": lambda m: math.nan}, ValueError, ("metric_fn", "nan")),
    ("metric_fn_inf", {"metric_fn": lambda m: -math.inf}, ValueError, ("metric_fn", "-inf")),
    ("metric_fn_none", {"metric_fn": lambda m: None}, ValueError, ("metric_fn", "None")),
    ("metric_fn_string", {"metric_fn": lambda m: "0.9"}, ValueError, ("metric_fn", "'0.9'")),
    ("metric_fn_vector", {"metric_fn": lambda m: torch.ones(2)}, ValueError, ("metric_fn", "tensor([1., 1.])")),
    ("metric_fn_nan_after", {"metric_fn": _nan_after_first(), "max_metric_drop": 0.1}, ValueError,
     ("metric_fn", "nan")),
    # GPTQ calibration (issue 19, clusters 5, 7, 11)
    ("gptq_nan_batch", {"method": "gptq", "calibration_data": [torch.zeros(2, 8), _nan_batch()]}, ValueError,
     ("calibration_data", "batch 1", "1 NaN")),
    ("gptq_inf_in_tuple", {"method": "gptq", "calibration_data": [(torch.full((2, 8), math.inf), torch.zeros(2))]},
     ValueError, ("calibration_data", "batch 0", "16 inf")),
    ("gptq_wrong_width", {"method": "gptq", "calibration_data": [torch.zeros(2, 5)]}, ValueError,
     ("calibration_data", "(2, 5)", "'0'", "(..., 8)")),
    ("gptq_forward_reaches_nothing", {"method": "gptq", "calibration_data": [torch.zeros(2, 8)],
                                      "forward": lambda m, b: None}, ValueError, ("`forward`", "'0', '2'", "no input")),
]
@pytest.mark.parametrize(("kwargs", "error", "texts"), [c[1:] for c in FUNCTIONAL], ids=[c[0] for c in FUNCTIONAL])
def test_quantize_refuses_and_changes_no_weight(kwargs: dict[str, Any], error: type[Exception],
                                                texts: tuple[str, ...]) -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _check(lambda: quantize(net, **kwargs), error, texts)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# cases on a particular model; a reason marks a defect of a file this module's author does not own (temporary xfail)
FUNCTIONAL_MODELS: list[tuple[str, Callable[[], nn.Module], dict[str, Any], type[Exception], tuple[str, ...], str]] = [
    ("bits_overrides_matching_nothing", _net, {"bits_overrides": {"fc9": 4}}, ValueError, ("bits_overrides", "'fc9'"),
     ""),
    ("nan_weight", lambda: _poisoned(math.nan), {}, ValueError, ("'0'", "1 NaN"), ""),
    ("inf_weight", lambda: _poisoned(math.inf), {}, ValueError, ("'0'", "1 inf"), ""),
    ("nan_weight_per_tensor", lambda: _poisoned(math.nan), {"granularity": "per_tensor"}, ValueError,
     ("'0'", "1 NaN"), ""),
]


@pytest.mark.parametrize(
    ("make", "kwargs", "error", "texts"),
    [pytest.param(*c[1:5], id=c[0], marks=[pytest.mark.xfail(reason=f"TEMPORARY: {c[5]}", strict=True)] if c[5] else [])
     for c in FUNCTIONAL_MODELS],
)
def test_quantize_refuses_what_it_cannot_represent(make: Callable[[], nn.Module], kwargs: dict[str, Any],
                                                   error: type[Exception], texts: tuple[str, ...]) -> None:
    net = make()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _check(lambda: quantize(net, **kwargs), error, texts)
    assert all(torch.equal(before[k].nan_to_num(), v.nan_to_num()) for k, v in net.state_dict().items())


def test_quantize_refuses_a_non_module() -> None:
    _check(lambda: quantize(torch.zeros(3, 3)), (TypeError, AttributeError), ("Tensor",))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- pattern helpers (core.selection)
def _deep() -> nn.Module:
    model = nn.Module()
    model.net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    return model


def test_a_pattern_that_matches_nothing_is_refused_with_the_rule_and_an_anchored_example() -> None:
    names = [f"net.{i}" for i in range(12)]
    _check(lambda: check_patterns_match("bits_overrides", ["fc9"], names), ValueError,
           ("`bits_overrides` entry 'fc9' matches no module", "re.search", "'net.1' also matches 'net.11'",
            r"'^net\.0$'"))


def test_selection_check_refuses_unmatched_include_and_exclude() -> None:
    _check(lambda: Selection.from_args(None, ["decoder"], None, ["Linear"]).check(_deep()), ValueError,
           ("`include` entry 'decoder' matches no module of the types ['Linear']",))
    _check(lambda: Selection.from_args(None, None, ["net.12"], ["Linear"]).check(_deep()), ValueError,
           ("`exclude` entry 'net.12'",))


def test_the_log_lines_say_what_each_pattern_matched_and_how_to_anchor_it() -> None:
    lines = Selection.from_args(None, None, ["net.1"], ["Linear"]).check(_deep())
    assert lines[0] == r"`exclude` 'net.1' (re.search) matched 3: net.1, net.10, net.11 -- to match only 'net.1', " \
                       r"write '^net\.1$'"
    assert lines[-1].startswith("selected 9 module(s): net.0, net.2, net.3")
    expected = r"`include` '^net\.1$' (re.search) matched 1: net.1"
    assert explain_matches("include", {"^net\\.1$": ["net.1"]}) == [expected]
