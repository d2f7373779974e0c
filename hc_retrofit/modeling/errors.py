"""Exceptions raised for user mistakes.

Every error a user can cause derives from :class:`HCRetrofitError`; the CLI prints its message as
one line and exits non-zero instead of showing a traceback. Messages name the problem and the fix.
"""

from __future__ import annotations


class HCRetrofitError(Exception):
    """Base class of every error that is the user's to fix (bad input, unsupported model, ...)."""


class ConfigError(HCRetrofitError, ValueError):
    """An invalid :class:`~hc_retrofit.HCConfig` value (e.g. ``num_streams < 2``)."""


class UnsupportedArchitectureError(HCRetrofitError):
    """The model's family has no adapter."""


class AlreadyConvertedError(HCRetrofitError):
    """The model already carries hyper-connections."""


class NotConvertedError(HCRetrofitError):
    """A command that needs a converted model was given a plain one."""


class CheckpointError(HCRetrofitError):
    """A model id or directory that cannot be loaded: not a checkpoint, unknown id, Hub unreachable."""


class OutputExistsError(HCRetrofitError):
    """The output directory exists (pass ``overwrite``) or would be written inside the source model."""


class HubError(HCRetrofitError):
    """A Hugging Face Hub operation failed for a reason the user can fix (no token, no access, ...)."""
