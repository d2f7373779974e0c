"""Imports every command module so that each registers its command on :data:`hc_retrofit.cli.core.app`."""

from hc_retrofit.cli import architectures, compare, convert, demo, inspect_cmd, push, serve, train, verify  # noqa: F401
