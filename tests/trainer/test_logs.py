"""What a run prints when its output goes to a file (SLURM, nohup, CI): progress lines rather than
redraws, one copy of each line, library noise filtered, and ranks other than 0 named."""

from __future__ import annotations

import re
from collections import Counter

from tests.conftest import fit_args, run_cli


def test_a_two_rank_run_into_a_file_prints_readable_progress_lines(synthetic_data, tmp_path):
    args = fit_args(synthetic_data, tmp_path / "run", "--trainer.max_steps", "40", "--trainer.log_every_n_steps", "10",
                    "--trainer.progress_bar", "auto")  # fmt: skip
    result = run_cli(args, nproc=2)
    output = result.stdout + result.stderr
    assert "\r" not in output  # no progress-bar redraws in a file
    steps = re.findall(
        r"\[towerrec\] epoch 1/2 step (\d+)/\d+ · loss [0-9.]+ · [0-9,]+ samples/s · ETA", output
    )
    assert steps == ["1", "11", "21"]
    assert re.search(r"\[towerrec\] epoch 1/2 done: \d+ steps in [0-9:]+ \([0-9,]+ samples/s\)", output)
    assert re.search(r"\[towerrec\] validation: val/ctr/auc=0\.\d{4}", output)

    lines = [line for line in output.splitlines() if line.strip() and not set(line) <= {"-", "*"}]
    repeated = [line for line, count in Counter(lines).items() if count > 1]
    assert repeated == [], repeated  # e.g. Lightning's INFO lines once, not through two handlers
    assert "[rank 1] Initializing distributed: GLOBAL_RANK: 1" in output
    assert not [
        line
        for line in lines
        if "Initializing distributed: GLOBAL_RANK: 1" in line and "[rank 1]" not in line
    ]
    assert "FutureWarning" not in output and "UserWarning" not in output
