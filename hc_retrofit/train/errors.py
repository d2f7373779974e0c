"""Training errors the user can act on (all derive from :class:`~hc_retrofit.modeling.errors.HCRetrofitError`).

The CLI prints them as one line; library callers can catch them by type.
"""

from __future__ import annotations

from hc_retrofit.modeling.errors import HCRetrofitError


class TrainingError(HCRetrofitError):
    """A training setting, data source or output directory that cannot work as given."""


class NonFiniteLossError(TrainingError):
    """The loss (or gradient norm) became NaN/inf; the run stopped before updating the weights.

    Attributes:
        step: the optimiser step at which it happened.
        last_checkpoint: the newest checkpoint, written before the bad step (``None`` if none yet).
    """

    def __init__(self, message: str, *, step: int, last_checkpoint: str | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint
