"""What a run prints when its output goes to a file (SLURM, nohup, CI): progress lines rather than
redraws, one copy of each line, library noise filtered, and ranks other than 0 named.

``assert_readable_log`` is called on the output of the 2-rank runs of ``test_distributed`` (a
resumed one included), so these checks cost no run of their own.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from towerrec.trainer.logs import progress_style


def assert_readable_log(output: str, world_size: int) -> None:
    assert "\r" not in output  # no progress-bar redraws in a file
    steps = re.findall(
        r"\[towerrec\] epoch \d+/\d+ step \d+/\d+ · loss [0-9.]+ · ([0-9,]+) samples/s · ETA", output
    )
    assert steps and all(int(rate.replace(",", "")) > 0 for rate in steps), output[-3000:]
    done = re.findall(
        r"\[towerrec\] epoch \d+/\d+ done: \d+ steps in ([0-9:]+) \(([0-9,]+) samples/s\)", output
    )
    assert done and all(int(rate.replace(",", "")) > 0 for _, rate in done)
    assert all(elapsed.startswith("0:0") for elapsed, _ in done), done  # resumed epochs time themselves too
    assert re.search(r"\[towerrec\] validation: val/ctr/auc=0\.\d{4}", output)

    lines = [line for line in output.splitlines() if line.strip() and not set(line) <= {"-", "*"}]
    repeated = [line for line, count in Counter(lines).items() if count > 1]
    assert repeated == [], repeated  # e.g. Lightning's INFO lines once, not through two handlers
    for rank in range(1, world_size):
        assert f"[rank {rank}] Initializing distributed: GLOBAL_RANK: {rank}" in output
    assert "FutureWarning" not in output and "UserWarning" not in output


def test_progress_style_follows_the_config_and_the_terminal(monkeypatch):
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert progress_style("auto") == "lines" and progress_style(False) == "lines"
    assert progress_style("off") == "off" and progress_style(True) == "bar"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert progress_style("auto") == "bar"


def test_loggers_are_chosen_in_the_config_and_a_missing_package_is_named(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from towerrec.trainer.config import ConfigError, load_config
    from towerrec.trainer.run_folder import AppendingCSVLogger, make_loggers

    default = make_loggers(load_config("configs/default.yaml").trainer.loggers, tmp_path)
    assert [type(logger) for logger in default] == [AppendingCSVLogger, TensorBoardLogger]
    chosen = load_config(
        "configs/default.yaml", ["trainer.loggers=[{type: CSVLogger, options: {name: other}}]"]
    )
    (logger,) = make_loggers(chosen.trainer.loggers, tmp_path / "x")
    assert isinstance(logger, CSVLogger) and logger.name == "other"
    assert (
        make_loggers(load_config("configs/default.yaml", ["trainer.loggers=[]"]).trainer.loggers, tmp_path)
        == []
    )
    unknown = load_config("configs/default.yaml", ["trainer.loggers=[{type: NoSuchLogger}]"])
    with pytest.raises(
        ConfigError, match=r"trainer.loggers\[0\].type: 'NoSuchLogger' is not csv, tensorboard"
    ):
        make_loggers(unknown.trainer.loggers, tmp_path)
    missing = load_config("configs/default.yaml", ["trainer.loggers=[{type: MLFlowLogger}]"])
    try:
        import mlflow  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"trainer.loggers\[0\].type: MLFlowLogger needs a package"):
            make_loggers(missing.trainer.loggers, tmp_path)
