"""Tabular quality benchmark: towerrec against scikit-learn baselines on the same splits and features.

    python -m benchmarks.tabular                                    # ml100k, synthetic (and census if found)
    python -m benchmarks.tabular --sets census --census DIR         # DIR holds census-income.{data,test}
    python -m benchmarks.tabular --seeds 0 1 2 --output benchmarks/results/TABULAR.md

For each data set, ``towerrec fit`` trains the config a user gets (3 seeds) and the baselines are
fitted on the very rows and features of the prepared data set (``data.path``): its training split
(train + val, the val slice used by the baselines' own early stopping), scored on its test split.

- **logistic regression** (``LogisticRegression``; ``Ridge`` for a regression task): every id
  feature one-hot, every bag a multi-hot indicator, every number standardised (missing: its fill);
- **gradient boosting** (``HistGradientBoostingClassifier``/``Regressor``, early stopping on 10%
  of the training rows): numbers as they are, ids with at most 255 values as categories, larger id
  sets target-encoded (``TargetEncoder``, cross-fitted), bags of at most 64 ids as indicators
  (larger bags left out).

Masked tasks are fitted and scored on their unmasked rows only, as towerrec's metrics are. Data
sets: MovieLens 100K u1 (``configs/movielens100k_graph.yaml``, the quality config: rating RMSE, like AUC), the synthetic set
(``configs/default.yaml``), and the UCI Census-Income (KDD) files, which one obtains oneself (never
committed): their config is what ``towerrec init`` writes for them, income > 50k and never-married
as the two tasks (``marital_stat``, the income column and the sampling weight left out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "bench" / "tabular"
ML100K = Path(os.environ.get("TOWERREC_ML100K", ROOT.parent / "shared" / "data" / "ml-100k"))
CENSUS_NAMES = (
    "age,class_worker,det_ind_code,det_occ_code,education,wage_per_hour,hs_college,marital_stat,"
    "major_ind_code,major_occ_code,race,hisp_origin,sex,union_member,unemp_reason,full_or_part_emp,"
    "capital_gains,capital_losses,stock_dividends,tax_filer_stat,region_prev_res,state_prev_res,"
    "det_hh_fam_stat,det_hh_summ,instance_weight,mig_chg_msa,mig_chg_reg,mig_move_reg,mig_same,"
    "mig_prev_sunbelt,num_emp,fam_under_18,country_father,country_mother,country_self,citizenship,"
    "own_or_self,vet_question,vet_benefits,weeks_worked,year,income_50k"
)


def towerrec(*args: str) -> list[str]:
    return [sys.executable, "-m", "towerrec.trainer.cli", *args]


def run(command: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


# ------------------------------------------------------------------------------------------ data sets
def data_sets(names: list[str], census: Path | None) -> dict[str, tuple[str, list[str]]]:
    """Name → (config, overrides) of each data set that is available."""
    found = {}
    if "ml100k" in names:
        if (ML100K / "u.data").exists():
            found["ml100k"] = ("configs/movielens100k_graph.yaml", ["--data.prepare.source", str(ML100K)])
        else:
            print(f"[bench] ml100k: {ML100K} not found, skipped", flush=True)
    if "synthetic" in names:
        found["synthetic"] = ("configs/default.yaml", [])
    if "census" in names:
        if census is not None and (census / "census-income.data").exists():
            found["census"] = (str(census_config(census)), [])
        else:
            print("[bench] census: pass --census DIR (census-income.data and .test), skipped", flush=True)
    return found


def census_config(folder: Path) -> Path:
    """The config ``towerrec init`` writes for the census files, with their own train/test split."""
    config = WORK / "census.yaml"
    if not config.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        run(towerrec(
            "init", "--source", str(folder / "census-income.data"), "--no-header", "--column-names", CENSUS_NAMES,
            "--label", "income=income_50k == '50000+.'", "--label", "never_married=marital_stat == 'Never married'",
            "--exclude", "marital_stat", "--exclude", "income_50k", "--exclude", "instance_weight",
            "--output", str(config),
        ))  # fmt: skip
        text = config.read_text().replace(
            "    split: random                 # 80/10/10 by row\n",
            "    split_files:                  # the files' own split (val: 10% of train)\n"
            f"      train: {folder / 'census-income.data'}\n"
            f"      test: {folder / 'census-income.test'}\n",
        )
        config.write_text(text)
    return config


# ------------------------------------------------------------------------------------------ towerrec
def fit_towerrec(name: str, config: str, overrides: list[str], seed: int, fresh: bool) -> dict:
    run_dir = WORK / f"{name}-seed{seed}"
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists() or fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
        started = time.perf_counter()
        run(towerrec("fit", "--config", config, *overrides, "--data.path", str(WORK / f"{name}-data"),
                     "--run_dir", str(run_dir), "--seed", str(seed), "--trainer.progress_bar", "off"))  # fmt: skip
        print(f"[bench] {name} seed {seed}: towerrec fit {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(metrics_path.read_text())["metrics"]["test"]


# ------------------------------------------------------------------------------------------ baselines
def load_split(cfg, path: Path, split: str) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(path / split)
    return {name: table.column(name) for name in table.column_names}


def _bags(column, vocabulary: int):
    import scipy.sparse as sp

    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    values = np.clip(array.values.to_numpy(), 0, vocabulary - 1)
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    matrix = sp.csr_matrix((np.ones(len(values)), (rows, values)), shape=(len(offsets) - 1, vocabulary))
    matrix.data[:] = 1.0
    return matrix


def _dense(cfg, columns: dict) -> np.ndarray:
    parts = []
    for feature in cfg.data.dense:
        values = columns[feature.source_column].to_numpy(zero_copy_only=False).astype(np.float64)
        parts.append(np.nan_to_num(values, nan=feature.fill_nan if feature.fill_nan is not None else 0.0))
    return np.stack(parts, axis=1) if parts else np.zeros((len(next(iter(columns.values()))), 0))


def _vocabulary(columns_by_split: list[dict], feature) -> int:
    import pyarrow.compute as pc

    high = 0
    for columns in columns_by_split:
        column = columns[feature.source_column]
        if feature.multi_hot:
            column = pc.list_flatten(column)
        high = max(high, int(pc.max(column).as_py() or 0))
    return high + 1


def features_for_linear(cfg, train: dict, test: dict):
    import scipy.sparse as sp
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    blocks_train, blocks_test = [], []
    single = [f for f in cfg.data.sparse if not f.multi_hot]
    if single:
        encoder = OneHotEncoder(handle_unknown="ignore")
        ids = lambda c: np.stack([c[f.source_column].to_numpy() for f in single], axis=1)  # noqa: E731
        blocks_train.append(encoder.fit_transform(ids(train)))
        blocks_test.append(encoder.transform(ids(test)))
    for feature in cfg.data.sparse:
        if feature.multi_hot:
            size = _vocabulary([train, test], feature)
            blocks_train.append(_bags(train[feature.source_column], size))
            blocks_test.append(_bags(test[feature.source_column], size))
    if cfg.data.dense:
        scaler = StandardScaler()
        blocks_train.append(sp.csr_matrix(scaler.fit_transform(_dense(cfg, train))))
        blocks_test.append(sp.csr_matrix(scaler.transform(_dense(cfg, test))))
    return sp.hstack(blocks_train).tocsr(), sp.hstack(blocks_test).tocsr()


def features_for_boosting(
    cfg, train: dict, test: dict, target: np.ndarray, keep: np.ndarray, task_type: str, seed: int
):
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import TargetEncoder

    parts_train, parts_test, categorical = (
        [_dense(cfg, train)],
        [_dense(cfg, test)],
        [False] * len(cfg.data.dense),
    )
    for feature in cfg.data.sparse:
        size = _vocabulary([train, test], feature)
        if feature.multi_hot:
            if size <= 64:
                parts_train.append(_bags(train[feature.source_column], size).toarray())
                parts_test.append(_bags(test[feature.source_column], size).toarray())
                categorical += [False] * size
            continue
        a = train[feature.source_column].to_numpy().astype(np.float64)[:, None]
        b = test[feature.source_column].to_numpy().astype(np.float64)[:, None]
        if size <= 255:
            parts_train.append(a)
            parts_test.append(b)
            categorical.append(True)
        else:
            encoder = TargetEncoder(
                target_type="binary" if task_type == "binary" else "continuous",
                cv=KFold(5, shuffle=True, random_state=seed),
            )
            encoded = np.zeros((len(a), 1))
            encoded[keep] = encoder.fit_transform(
                a[keep], target[keep]
            )  # cross-fitted on the rows that count
            if (~keep).any():
                encoded[~keep] = encoder.transform(a[~keep])
            parts_train.append(encoded)
            parts_test.append(encoder.transform(b))
            categorical.append(False)
    return np.hstack(parts_train), np.hstack(parts_test), np.asarray(categorical)


def task_rows(task, columns: dict) -> tuple[np.ndarray, np.ndarray]:
    """The task's labels and the rows that count for it (label present, mask on)."""
    label = columns[task.label].to_numpy(zero_copy_only=False).astype(np.float64)
    keep = ~np.isnan(label)
    if task.mask:
        keep &= columns[task.mask].to_numpy(zero_copy_only=False).astype(np.float64) > 0
    return label, keep


def task_score(task, labels: np.ndarray, predicted: np.ndarray) -> float:
    """AUC of a binary task, RMSE (predictions clipped to the label range) of a regression."""
    from sklearn.metrics import mean_squared_error, roc_auc_score

    if task.type == "binary":
        return float(roc_auc_score(labels, predicted))
    return float(mean_squared_error(labels, np.clip(predicted, task.min_value, task.max_value)) ** 0.5)


def baselines(cfg, path: Path, seeds: list[int]) -> dict[str, dict[str, list[float]]]:
    """Task → {"logistic regression": [...], "gradient boosting": [...]} test metric per seed."""
    import pyarrow as pa
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, Ridge

    parts = [load_split(cfg, path, split) for split in ("train", "val") if (path / split).exists()]
    train = {name: pa.chunked_array([c for p in parts for c in p[name].chunks]) for name in parts[0]}
    test = load_split(cfg, path, "test")
    linear_train, linear_test = features_for_linear(cfg, train, test)
    out: dict[str, dict[str, list[float]]] = {}
    for task in cfg.tasks:
        y_train, keep_train = task_rows(task, train)
        y_test, keep_test = task_rows(task, test)
        binary = task.type == "binary"
        results = out.setdefault(task.name, {"logistic regression": [], "gradient boosting": []})
        started = time.perf_counter()
        if binary:
            linear = LogisticRegression(C=1.0, max_iter=3000).fit(
                linear_train[keep_train], y_train[keep_train]
            )
            predicted = linear.predict_proba(linear_test[keep_test])[:, 1]
        else:
            linear = Ridge(alpha=1.0).fit(linear_train[keep_train], y_train[keep_train])
            predicted = linear.predict(linear_test[keep_test])
        results["logistic regression"] = [task_score(task, y_test[keep_test], predicted)] * len(seeds)
        print(f"[bench] {task.name}: linear {time.perf_counter() - started:.0f} s", flush=True)
        for seed in seeds:
            started = time.perf_counter()
            x_train, x_test, categorical = features_for_boosting(
                cfg, train, test, y_train, keep_train, task.type, seed
            )
            model_type = HistGradientBoostingClassifier if binary else HistGradientBoostingRegressor
            model = model_type(max_iter=1000, learning_rate=0.1, early_stopping=True, validation_fraction=0.1,
                               n_iter_no_change=20, categorical_features=categorical, random_state=seed)  # fmt: skip
            model.fit(x_train[keep_train], y_train[keep_train])
            predicted = (
                model.predict_proba(x_test[keep_test])[:, 1] if binary else model.predict(x_test[keep_test])
            )
            results["gradient boosting"].append(task_score(task, y_test[keep_test], predicted))
            print(
                f"[bench] {task.name}: boosting seed {seed} {time.perf_counter() - started:.0f} s", flush=True
            )
    return out


# ------------------------------------------------------------------------------------------ report
def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: dict) -> list[str]:
    lines = [
        "| data set | task | metric | towerrec | logistic regression | gradient boosting | towerrec ≥ both |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, tasks in results.items():
        for task, row in tasks.items():
            metric = row["metric"]
            better = (lambda a, b: a >= b) if metric == "auc" else (lambda a, b: a <= b)
            ours = statistics.mean(row["towerrec"])
            verdict = all(
                better(ours, statistics.mean(row[b])) for b in ("logistic regression", "gradient boosting")
            )
            lines.append(
                f"| {name} | {task} | {metric} | {mean_std(row['towerrec'])} | {mean_std(row['logistic regression'])} "
                f"| {mean_std(row['gradient boosting'])} | {'yes' if verdict else '**no**'} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["ml100k", "synthetic", "census"])
    parser.add_argument("--census", type=Path, help="folder with census-income.data and census-income.test")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    parser.add_argument("--output", type=Path, default=WORK / "TABULAR.md")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine_info
    from towerrec.trainer.config import load_config

    results: dict = {}
    for name, (config, overrides) in data_sets(args.sets, args.census).items():
        towers = [fit_towerrec(name, config, overrides, seed, args.fresh) for seed in args.seeds]
        dotted = [f"{k[2:]}={v}" for k, v in zip(overrides[::2], overrides[1::2])]
        cfg = load_config(config, [*dotted, f"data.path={WORK / f'{name}-data'}"])
        found = baselines(cfg, WORK / f"{name}-data", args.seeds)
        for task in cfg.tasks:
            metric = "auc" if task.type == "binary" else "rmse"
            results.setdefault(name, {})[task.name] = {
                "metric": metric,
                "towerrec": [t[task.name][metric] for t in towers],
                **found[task.name],
            }
    info = machine_info()
    text = "\n".join([
        "# Tabular quality: towerrec against scikit-learn baselines",
        "",
        f"`python -m benchmarks.tabular --seeds {' '.join(map(str, args.seeds))}` · commit {info['git_commit']} · "
        f"{info['date']} · {info['cpus']} CPUs ({info['cpu_model']}) · torch {info['torch']}",
        "",
        "Test split of each prepared data set; mean ± std over seeds (logistic regression is deterministic).",
        "AUC: higher is better; RMSE: lower is better.",
        "",
        *table(results),
        "",
    ])  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    (args.output.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
