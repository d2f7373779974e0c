"""The command line's list syntax: comma-separated values (``--seeds 0,1,2``) and ``KEY=VALUE`` settings.

Standard library only, so a command parses (and refuses) its options before it imports torch.
"""

from __future__ import annotations

from hc_retrofit.modeling.errors import HCRetrofitError


def parse_list(text: str, kind: type, flag: str) -> tuple:
    """``"1e-4, 3e-4"`` -> ``(1e-4, 3e-4)`` of ``kind``; empty items are skipped.

    Raises:
        HCRetrofitError: an item is not a ``kind`` (the message names ``flag``).
    """
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise HCRetrofitError(f"{flag} takes comma-separated {kind.__name__}s, got {text!r}") from err


def parse_settings(pairs: list[str]) -> dict[str, str]:
    """``["weight-decay=0.05"]`` -> ``{"weight_decay": "0.05"}`` (the values stay text, for the config to coerce).

    Raises:
        HCRetrofitError: an item is not ``KEY=VALUE``.
    """
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise HCRetrofitError(f"--set takes KEY=VALUE (a train setting, e.g. weight_decay=0.05), got {pair!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out
