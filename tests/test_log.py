"""The package logger: silent configuration in the library, one-line ``warning:`` output in the CLI."""

from __future__ import annotations

import logging

from hc_retrofit.log import enable_cli_logging, get_logger


def test_module_loggers_are_children_of_the_package_logger() -> None:
    assert get_logger("hc_retrofit.train.loop").name == "hc_retrofit.train.loop"
    assert get_logger("elsewhere").name == "hc_retrofit.elsewhere"
    assert get_logger().name == "hc_retrofit"


def test_cli_logging_prints_one_warning_line(capsys) -> None:
    first, second = enable_cli_logging(), enable_cli_logging()
    assert first is second  # idempotent: one handler however often the CLI runs in a process
    get_logger("hc_retrofit.x").warning("two\nlines   here")
    get_logger("hc_retrofit.x").debug("not shown")
    assert capsys.readouterr().err == "warning: two lines here\n"
    logging.getLogger("hc_retrofit").removeHandler(first)
