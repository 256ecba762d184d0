"""Progress display: a redrawn bar on a terminal, a plain line every so often anywhere else."""

from __future__ import annotations

import io
import sys

import pytest

from byztrain.runtime import progress as pg


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_prints_a_line_at_the_start_every_interval_and_at_the_end():
    out, clock = io.StringIO(), Clock()
    bar = pg.PlainProgress(100, desc="demo", unit="step", every_s=30, stream=out, clock=clock)
    for step in range(1, 101):
        clock.now = step + 4.0  # 5 s to the first step (setup), then one per second: lines at 1, 31, 61, 91, 100
        bar.set_postfix({"loss": "0.512", "acc": "0.812", "banned": 3})
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(",")[0] for line in lines] == [f"demo: step {n}/100" for n in (1, 31, 61, 91, 100)]
    assert lines[0] == "demo: step 1/100, loss 0.512, acc 0.812, banned 3, 5s elapsed"  # no rate known yet
    assert lines[1] == "demo: step 31/100, loss 0.512, acc 0.812, banned 3, 35s elapsed, ETA 1m09s"
    assert lines[-1].endswith("1m44s elapsed")  # no ETA once done


def test_plain_progress_says_where_a_stopped_run_ended_and_counts_from_a_resumed_step():
    out, clock = io.StringIO(), Clock()
    bar = pg.PlainProgress(10, desc="r", unit="step", initial=4, every_s=60, stream=out, clock=clock)
    clock.now = 2.0
    bar.update(1)  # 5/10: the first step here, no rate yet
    clock.now = 3.0
    bar.update(1)  # 6/10: one step a second since, 4 to go
    bar.close()
    assert out.getvalue().splitlines() == ["r: step 5/10, 2s elapsed", "r: step 6/10, 3s elapsed, ETA 4s"]


@pytest.mark.parametrize("stdout_tty, stderr_tty, plain", [(True, True, False), (False, True, True), (True, False, True)])
def test_the_bar_redraws_only_when_both_streams_are_terminals(monkeypatch, stdout_tty, stderr_tty, plain):
    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr(sys, "stdout", Stream(stdout_tty))
    monkeypatch.setattr(sys, "stderr", Stream(stderr_tty))
    bar = pg.progress_bar(5, desc="x", unit="step")
    assert isinstance(bar, pg.PlainProgress) is plain
    bar.close()


def test_durations_read_as_people_write_them():
    assert [pg.format_duration(s) for s in (0.4, 59, 61, 3599, 3661)] == ["0s", "59s", "1m01s", "59m59s", "1h01m"]
