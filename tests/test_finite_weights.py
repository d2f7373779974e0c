"""The non-finite check that refuses a damaged base: every NaN and inf is found, in every float dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hc_retrofit.finite_weights import all_finite, first_nonfinite_tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_element_anywhere_is_found(dtype: torch.dtype, bad: float) -> None:
    for where in (0, 517, 999):
        tensor = torch.randn(10, 100).to(dtype)
        assert all_finite(tensor)
        tensor.view(-1)[where] = bad
        assert not all_finite(tensor)
        assert not all_finite(tensor.t())  # a non-contiguous view too


def test_all_nan_empty_and_huge_finite_tensors() -> None:
    assert not all_finite(torch.full((4,), float("nan")))
    assert all_finite(torch.empty(0))
    assert all_finite(torch.full((3,), torch.finfo(torch.float32).max))  # a large finite value is finite


def test_the_first_non_finite_parameter_or_buffer_is_named() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert first_nonfinite_tensor(model) is None
    with torch.no_grad():
        model[0].bias[2] = float("inf")
    assert first_nonfinite_tensor(model) == "0.bias"
    with torch.no_grad():
        model[0].bias[2] = 0.0
    model[1].running_var[0] = float("nan")
    assert first_nonfinite_tensor(model) == "1.running_var"
