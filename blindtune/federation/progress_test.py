import logging

from blindtune.federation import progress
from blindtune.federation.progress import PROGRESS_LOGGER, RoundProgress, duration


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (4.4, 75.2, 4000)] == ["4s", "1m15s", "1h06m"]


def test_the_eta_assumes_the_remaining_rounds_take_the_average_so_far(monkeypatch, caplog):
    clock = iter([100.0, 160.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(logging.getLogger(PROGRESS_LOGGER), "propagate", True)  # the CLI's own handler may be set
    tracker = RoundProgress(first_round=3, last_round=6)  # resumed after round 2
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        tracker.round_done(4, 2, 3, 1.23456)  # two rounds in 60 s: two more take another 60 s
    assert caplog.messages == ["round 4/6: 2/3 clients, loss 1.2346, elapsed 1m00s, ETA 1m00s"]
