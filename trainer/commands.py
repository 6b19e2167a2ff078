"""Every ``towerrec`` command: its help, its flags and the function that runs it.

Flags are declared here, with no heavy import, so that ``towerrec --help`` and
``towerrec COMMAND --help`` answer at once; a command's module (torch, TorchRec, Lightning) is
imported only when the command runs. Flags shared by several commands come from one parent parser
each (``--config``/``--print_config``, ``--checkpoint``). Config keys are not flags here: any key
is overridden after the flags (``--trainer.max_epochs 3`` or ``trainer.max_epochs=3``) and
``towerrec config`` lists them all.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def _config_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--config", help="YAML config (see configs/; keys: `towerrec config`)")
    parent.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    return parent


def _checkpoint_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--checkpoint", help="checkpoint folder or run folder (default: the run's latest)")
    return parent


def _k_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, help="list length (overrides recommend.k)")


def _predict_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", help="split to score (default: data.test_split)")
    parser.add_argument(
        "--output", help="output folder, new or empty (default: <run_dir>/predictions/<split>-<checkpoint>)"
    )


def _prepare_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", help="input format (overrides data.prepare.format)")
    parser.add_argument("--source", help="input file/folder (overrides data.prepare.source)")
    parser.add_argument("--out", help="output data set folder (overrides data.path)")
    parser.add_argument(
        "--append",
        metavar="SOURCE",
        help="add SOURCE (file, folder, glob) as the next day of the data set at data.path, encoded with its "
        "first preparation's vocabularies (csv/parquet; data.train_days etc. select days)",
    )


def _plan_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=1, help="nodes in the cluster")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node")
    parser.add_argument("--hbm-gb", type=float, default=80.0, help="memory per device in GB")
    parser.add_argument("--ddr-gb", type=float, default=None, help="host memory per rank in GB (UVM caching)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device type to plan for")


def _export_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", help="output folder, new or empty (default: <run_dir>/export/<checkpoint>)"
    )


def _recommend_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--users", default="all", help="'all' (every user in the data set) or a file of user ids"
    )
    _k_flag(parser)
    parser.add_argument(
        "--candidates", help="file of candidate item ids (default: every item in the data set)"
    )
    parser.add_argument(
        "--output",
        help="output .parquet or .csv, new (default: <run_dir>/recommendations/top<k>-<checkpoint>.parquet)",
    )
    parser.add_argument(
        "--evaluate", action="store_true", help="also compute ranking metrics on the test split"
    )


def _init_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", required=True, help="CSV/Parquet file, folder, glob or URI to read columns from"
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        help='label column (repeat for several tasks), or NAME=EXPRESSION, e.g. "like=rating >= 4"; '
        "none: an implicit log (user, item, time), for which init writes a retrieval config",
    )
    parser.add_argument("--output", help="config file to write, new (default: <source name>.yaml)")
    parser.add_argument("--user", help="user id column (default: a column named user, user_id, uid, ...)")
    parser.add_argument(
        "--item", help="item id column (default: a column named item, item_id, product, sku, ...)"
    )
    parser.add_argument("--delimiter", help="CSV delimiter (default: the most common of , tab ; | in line 1)")
    parser.add_argument(
        "--no-header",
        action="store_true",
        help="the CSV has no header line (columns named by --column-names, else c0, c1, ...)",
    )
    parser.add_argument(
        "--column-names", help="comma-separated names of a headerless CSV's columns, in order"
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        help="column to leave out (repeat): one a label is derived from, a sample weight, ...",
    )
    parser.add_argument(
        "--sample-rows", type=int, default=100_000, help="rows read to decide (default 100000)"
    )


def _rank_eval_flags(parser: argparse.ArgumentParser) -> None:
    _k_flag(parser)
    parser.add_argument(
        "--output",
        help="JSON file for the metrics, new (default: <run_dir>/rankings/ranking-<checkpoint>.json)",
    )


class _RunDir(argparse.Action):
    """``RUN_DIR`` also selects the run's resolved ``config.yaml`` when no ``--config`` is given."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        setattr(namespace, self.dest, value)
        if value and getattr(namespace, "config", None) is None:
            namespace.config = str(Path(value) / "config.yaml")


def _report_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", nargs="?", action=_RunDir, help="run folder (default: the config's run_dir)"
    )


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prefix", nargs="?", default="", help="only keys starting with this (e.g. trainer.)")
    parser.add_argument(
        "--markdown", action="store_true", help="as the Markdown table of configs/REFERENCE.md"
    )


def _k_override(args: argparse.Namespace) -> list[str]:
    return [f"recommend.k={args.k}"] if args.k is not None else []


def _prepare_overrides(args: argparse.Namespace) -> list[str]:
    pairs = (("format", "data.prepare.format"), ("source", "data.prepare.source"), ("out", "data.path"))
    return [f"{key}={getattr(args, flag)}" for flag, key in pairs if getattr(args, flag)]


@dataclass(frozen=True)
class Command:
    help: str
    run: str
    """``module:function``: ``function(cfg, args) -> exit code`` (``args`` only, without a config)."""
    flags: Callable[[argparse.ArgumentParser], None] | None = None
    overrides: Callable[[argparse.Namespace], list[str]] | None = None
    checkpoint: bool = False
    """Takes ``--checkpoint``."""
    needs_config: bool = True

    def load(self) -> Callable:
        module, _, function = self.run.partition(":")
        return getattr(importlib.import_module(module), function)


COMMANDS: dict[str, Command] = {
    "fit": Command("train (resuming from the run's latest checkpoint), then evaluate on the test split",
                   "towerrec.trainer.run:fit_command"),
    "validate": Command("evaluate a checkpoint on the validation split (results in <run_dir>/evaluations/)",
                        "towerrec.trainer.run:validate_command", checkpoint=True),
    "test": Command("evaluate a checkpoint on the test split (results in <run_dir>/evaluations/)",
                    "towerrec.trainer.run:test_command", checkpoint=True),
    "predict": Command("write per-row predictions of a checkpoint to Parquet", "towerrec.trainer.predict:predict_command",
                       _predict_flags, checkpoint=True),
    "prepare": Command("build the Parquet data set (data.prepare, or --format/--source/--out)",
                       "towerrec.trainer.dataset_setup:prepare_command", _prepare_flags, _prepare_overrides),
    "plan": Command("print the sharding plan and per-rank memory for a cluster, no GPU needed",
                    "towerrec.trainer.plan:run_plan", _plan_flags),
    "export": Command("write an unsharded model.pt and a torch.export serving artifact from a checkpoint",
                      "towerrec.serving.export:run_export", _export_flags, checkpoint=True),
    "recommend": Command("top-K items per user from a checkpoint (Parquet/CSV), optionally with ranking metrics",
                         "towerrec.serving.recommend:run_recommend", _recommend_flags, _k_override, checkpoint=True),
    "rank-eval": Command("ranking metrics @K (model vs popularity) on the test split",
                         "towerrec.serving.ranking:run_rank_eval", _rank_eval_flags, _k_override, checkpoint=True),
    "report": Command("learning-curve and test-metric PNGs plus report.md for a run folder",
                      "towerrec.trainer.report:run_report", _report_flags),
    "init": Command("write a commented starter config from a CSV/Parquet file's columns",
                    "towerrec.trainer.starter:run_init", _init_flags, needs_config=False),
    "config": Command("list every config key with its type, default and meaning",
                      "towerrec.trainer.config_reference:run_config", _config_flags, needs_config=False),
}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """The whole command line (no heavy import: ``--help`` answers at once)."""
    top = argparse.ArgumentParser(
        prog="towerrec",
        description="Distributed multi-task recommendation training (TorchRec + Lightning + Parquet).",
        epilog="Any config key can be overridden after the flags: --trainer.max_epochs 3 --model.tower mmoe "
        "(or key=value). `towerrec config` lists every key.",
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_parent, checkpoint_parent = _config_parent(), _checkpoint_parent()
    for name, command in COMMANDS.items():
        parents = [config_parent] if command.needs_config else []
        if command.checkpoint:
            parents.append(checkpoint_parent)
        cmd = sub.add_parser(
            name,
            help=command.help,
            description=command.help,
            parents=parents,
            epilog="Config keys: --section.key VALUE after the flags (`towerrec config` lists them; e.g. "
            "`towerrec config trainer.`)."
            if command.needs_config
            else None,
        )
        if command.flags is not None:
            command.flags(cmd)
    return top
