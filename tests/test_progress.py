"""Progress bars only on a terminal; elsewhere periodic one-line progress in the log."""
import logging

from sde_diffusion import progress


def test_no_bar_off_a_terminal_but_periodic_log_lines(monkeypatch, capsys, caplog):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    monkeypatch.setattr(progress, "PROGRESS_LOG_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="sde_diffusion.progress"):
        assert list(progress.Progress(range(4), desc="train", initial=6, total=10)) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""  # tqdm drew nothing
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and lines[0].startswith("train: 7/10 (70%)") and lines[-1].startswith("train: 10/10 (100%)")
    assert "it/s, about" in lines[0] and "s left" in lines[0]


def test_a_bar_on_a_terminal_and_nothing_when_disabled(monkeypatch, capsys, caplog):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    with caplog.at_level(logging.INFO, logger="sde_diffusion.progress"):
        bar = progress.Progress(total=3, desc="pc")
        bar.update(3)
        bar.close()
        list(progress.Progress(range(3), desc="quiet", enabled=False))
    err = capsys.readouterr().err
    assert "pc: 100%" in err and "3/3" in err and "quiet" not in err and not caplog.records
