"""tests/conftest.py's ``root_logging``: what a test that runs the command line in this process
leaves on the root logger goes with it (an inner pytest run, in this process)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def test_the_log_handler_a_test_installs_goes_with_that_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("from tests.conftest import root_logging  # noqa: F401\n")
    pytester.makepyfile(
        """
        import logging

        from regproxy.log import LineHandler, setup_logging


        LEVEL = []


        def test_runs_the_command_line():
            LEVEL.append(logging.getLogger().level)
            setup_logging("DEBUG", "text")  # as cli.main does: on this test's captured stderr
            assert any(isinstance(h, LineHandler) for h in logging.getLogger().handlers)


        def test_then_logs():
            root = logging.getLogger()
            assert not [h for h in root.handlers if isinstance(h, LineHandler)]
            assert root.level == LEVEL[0] != logging.DEBUG
        """
    )
    # the plugins our pyproject turns off (pytest-benchmark asks git at start-up: a process),
    # and pytest-asyncio (unconfigured here, it warns: an error under our filterwarnings)
    off = ("cacheprovider", "benchmark", "hypothesispytest", "asyncio")
    result = pytester.runpytest_inprocess(*(a for p in off for a in ("-p", f"no:{p}")))
    result.assert_outcomes(passed=2)
