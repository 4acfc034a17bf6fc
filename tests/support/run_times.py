"""Where a test run's time went, printed at its end: the wall time of each test module and of
the phases a module's tests share (the cluster start), so a CI run that got slower says where."""

from __future__ import annotations

from collections import defaultdict

import pytest


class RunTimes:
    NAME = "pollinate-run-times"

    def __init__(self) -> None:
        self.modules: dict[str, float] = defaultdict(float)
        self.tests: dict[str, int] = defaultdict(int)
        self.phases: dict[str, float] = {}

    @classmethod
    def of(cls, config: pytest.Config) -> RunTimes:
        return config.pluginmanager.get_plugin(cls.NAME)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Set-up, call and tear-down; module and session fixtures are charged to the module
        # whose test started them.
        module = report.nodeid.split("::")[0]
        self.modules[module] += report.duration
        if report.when == "call":
            self.tests[module] += 1

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.modules:
            return
        out = terminalreporter
        out.write_sep("=", "wall time per test module, slowest first")
        for module, seconds in sorted(self.modules.items(), key=lambda kv: -kv[1]):
            out.write_line(f"{seconds:8.1f} s {self.tests[module]:4d} tests  {module}")
        out.write_line(f"{sum(self.modules.values()):8.1f} s in all")
        for phase, seconds in self.phases.items():
            out.write_line(f"{seconds:8.1f} s  {phase}")
