"""The command line's list syntax: comma-separated values and KEY=VALUE settings, refused in one line."""

from __future__ import annotations

import pytest

from hc_retrofit.modeling.errors import HCRetrofitError
from hc_retrofit.option_lists import parse_list, parse_settings


def test_lists_are_typed_and_skip_empty_items() -> None:
    assert parse_list("1e-4, 3e-4,", float, "--lr-grid") == (1e-4, 3e-4)
    assert parse_list("mhc,static", str, "--variants") == ("mhc", "static")
    with pytest.raises(HCRetrofitError, match=r"^--seeds takes comma-separated ints, got '0,x'$"):
        parse_list("0,x", int, "--seeds")


def test_settings_are_key_value_with_dashes_as_underscores() -> None:
    assert parse_settings(["weight-decay=0.05", " beta2 = 0.95"]) == {"weight_decay": "0.05", "beta2": "0.95"}
    for bad in ("weight_decay", "=0.1"):
        with pytest.raises(HCRetrofitError, match="--set takes KEY=VALUE"):
            parse_settings([bad])
