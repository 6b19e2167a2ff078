"""The quality summary: seeds every fold has, like-with-like multi- vs single-task comparisons."""

from __future__ import annotations

from benchmarks.quality_ml100k import FOLDS, Job, summarize


def _run(rmse: float | None = None, auc: float | None = None) -> dict:
    test = {}
    if rmse is not None:
        test["rating"] = {"rmse": rmse, "mae": rmse - 0.2}
    if auc is not None:
        test["click"] = {"auc": auc, "logloss": 0.5}
    return {"metrics": {"test": test}}


def test_single_task_runs_with_fewer_seeds_are_compared_on_those_seeds_only():
    results = {}
    for fold in FOLDS:
        for seed in (0, 1, 2):  # multi-task: seed 0 good, seeds 1 and 2 much worse
            rmse = 0.90 if seed == 0 else 0.99
            results[Job(fold, "Shared-Bottom", "multi-task", seed)] = _run(rmse, 0.80 if seed == 0 else 0.70)
        results[Job(fold, "Shared-Bottom", "rating only", 0)] = _run(rmse=0.92)
        results[Job(fold, "Shared-Bottom", "like only", 0)] = _run(auc=0.78)
    results[Job("u1", "Shared-Bottom", "rating only", 1)] = _run(rmse=0.92)  # u1 only: not a common seed
    text = summarize(results, list(FOLDS), [0, 1, 2])
    assert "| Shared-Bottom | multi-task | 5 × 3 | 0.9600 ± 0.0439 |" in text
    assert "| Shared-Bottom | rating only | 5 × 1 | 0.9200 ± 0.0000 |" in text
    # over all three seeds multi-task would look worse (0.96 vs 0.92); on seed 0 alone it is better
    assert (
        "- 5-fold (u1, u2, u3, u4, u5), seeds [0], Shared-Bottom, RMSE: multi-task 0.9000 vs rating only "
        "0.9200 (better by 0.0200; tolerance 0.0000): ok" in text
    )
    assert "seeds [0], Shared-Bottom, AUC: multi-task 0.8000 vs like only 0.7800" in text
    # u1 has seeds 0 and 1 of rating only: compared with multi-task seeds 0 and 1 (0.90, 0.99)
    assert (
        "- u1, seeds [0, 1], Shared-Bottom, RMSE: multi-task 0.9450 vs rating only 0.9200 "
        "(worse by 0.0250; tolerance 0.0636): ok" in text
    )
    assert "- 5-fold RMSE target 0.905: best multi-task 0.9600 (Shared-Bottom): NOT met" in text
