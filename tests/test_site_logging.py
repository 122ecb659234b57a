"""What a site prints while it trains: NVFlare's missing-keys warning as one line with counts, and one progress line
per epoch in the format `jobs/job.py simulate` shows."""

from __future__ import annotations

import inspect
import logging
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_opt.lightning.api import FLCallback

from app.client import NVFLARE_LIGHTNING_LOGGER, ReportEpochs, summarise_missing_keys
from app.site_config import SiteConfig
from jobs.simulate import parse_progress
from models.protocol import PROGRESS_MARK


@pytest.fixture(scope="module")
def module():
    return SiteConfig.for_method("med_duallora").build_module()


def test_nvflare_names_its_lightning_logger_after_the_callback_class():
    """The fence around NVFlare's private detail the summary relies on: the logger's name."""
    assert FLCallback.__name__ == NVFLARE_LIGHTNING_LOGGER
    assert "logging.getLogger(self.__class__.__name__)" in inspect.getsource(FLCallback.__init__)


def test_loading_the_global_model_logs_one_line_with_counts(module, caplog):
    """NVFlare's own loading code (FLCallback._update_model) on the global model a site receives: without the
    summary it warns with every frozen key; with it, one INFO line counts them."""
    flare_logger = logging.getLogger(NVFLARE_LIGHTNING_LOGGER)
    callback = SimpleNamespace(logger=flare_logger, _load_state_dict_strict=False)
    received = FLModel(params=module.shared_state_dict())
    with caplog.at_level(logging.INFO, logger=NVFLARE_LIGHTNING_LOGGER):
        FLCallback._update_model(callback, module, received)
    (unfiltered,) = [r for r in caplog.records if r.name == NVFLARE_LIGHTNING_LOGGER]
    assert unfiltered.levelno == logging.WARNING and len(unfiltered.getMessage()) > 5_000
    caplog.clear()
    summarise_missing_keys(module.policy)
    summarise_missing_keys(module.policy)  # installed once, however often a process calls it
    try:
        with caplog.at_level(logging.INFO, logger=NVFLARE_LIGHTNING_LOGGER):
            FLCallback._update_model(callback, module, received)
    finally:
        flare_logger.filters.clear()
    (record,) = [r for r in caplog.records if r.name == NVFLARE_LIGHTNING_LOGGER]
    kept = len(module.state_dict()) - len(received.params)
    private = sum(1 for key in module.state_dict() if module.policy.is_trainable(key) and key not in received.params)
    assert record.levelno == logging.INFO and "\n" not in record.getMessage()
    assert f"{kept} keys kept" in record.getMessage() and f"{private} private" in record.getMessage()
    assert len(record.getMessage()) < 200


class _Tracker:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))


@pytest.mark.parametrize(("n_train", "tracked"), [(12, True), (4, False)])
def test_each_epoch_prints_a_progress_line_and_tracks_the_loss(capsys, n_train, tracked):
    """The line parses back (jobs.simulate.parse_progress) and the loss reaches the tracker only when it describes
    at least MIN_SUBJECTS_PER_FIGURE training subjects."""
    tracker = _Tracker()
    report = ReportEpochs(tracker, "ge", current_round=2, n_train=n_train)
    trainer = SimpleNamespace(callback_metrics={"train_loss": 0.53125}, current_epoch=3, max_epochs=20)
    report.on_train_epoch_end(trainer, pl.LightningModule())
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(PROGRESS_MARK)
    parsed = parse_progress(f"2026-11-30 18:00:00,000 - INFO - {line}")
    assert parsed is not None
    assert (parsed.site, parsed.round, parsed.epoch, parsed.epochs, parsed.train_loss) == ("ge", 2, 4, 20, 0.5312)
    assert tracker.scalars == ([("train_loss", 0.53125, 2 * 20 + 3)] if tracked else [])
