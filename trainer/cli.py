"""The ``towerrec`` command line: parse, build, run, close. Logic lives in trainer.run & co.

    towerrec fit --config configs/default.yaml --trainer.max_epochs 3 --model.tower mmoe
    towerrec test --config configs/movielens100k.yaml --checkpoint runs/ml100k
    towerrec plan --config configs/large.yaml --nodes 4 --gpus-per-node 8 --hbm-gb 141
    towerrec prepare --config configs/movielens100k.yaml
"""

from __future__ import annotations

import argparse
import sys

from data.dataset import DataError
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, dump_yaml, load_config

COMMANDS = {
    "fit": "train (resuming from the run's latest checkpoint), then evaluate on the test split",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
    "predict": "write per-row predictions of a checkpoint to Parquet",
    "prepare": "build the Parquet data set (data.prepare in the config, or --format/--source/--out)",
    "plan": "print the sharding plan and per-rank memory for a (hypothetical) cluster, no GPU needed",
}


def _overrides(extra: list[str]) -> list[str]:
    """``--a.b 3``, ``--a.b=3`` and ``a.b=3`` → ``["a.b=3", ...]``."""
    out, i = [], 0
    while i < len(extra):
        token = extra[i]
        if token.startswith("--") and "=" not in token:
            if i + 1 >= len(extra):
                raise ConfigError(f"{token}: missing value (write {token} VALUE)")
            out.append(f"{token[2:]}={extra[i + 1]}")
            i += 2
        else:
            out.append(token.removeprefix("--"))
            i += 1
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="towerrec",
        description="Distributed multi-task recommendation training (TorchRec + Lightning + Parquet).",
        epilog="Any config key can be overridden: --trainer.max_epochs 3 --model.tower mmoe (or key=value).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--config", help="YAML config (see configs/)")
        cmd.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
        if name in ("validate", "test", "predict"):
            cmd.add_argument("--checkpoint", help="checkpoint folder or run folder (default: the run's latest)")
        if name == "predict":
            cmd.add_argument("--split", help="split to score (default: data.test_split)")
            cmd.add_argument("--output", help="output folder (default: <run_dir>/predictions)")
        if name == "prepare":
            cmd.add_argument("--format", help="input format (overrides data.prepare.format)")
            cmd.add_argument("--source", help="input file/folder (overrides data.prepare.source)")
            cmd.add_argument("--out", help="output data set folder (overrides data.path)")
        if name == "plan":
            cmd.add_argument("--nodes", type=int, default=1, help="nodes in the cluster")
            cmd.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node")
            cmd.add_argument("--hbm-gb", type=float, default=80.0, help="GPU memory per device in GB")
            cmd.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device type to plan for")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    try:
        overrides = _overrides(extra)
        if args.command == "prepare":
            for flag, key in (("format", "data.prepare.format"), ("source", "data.prepare.source"), ("out", "data.path")):
                if getattr(args, flag):
                    overrides.append(f"{key}={getattr(args, flag)}")
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        if args.command == "fit":
            from trainer.run import fit

            return fit(cfg)
        if args.command in ("validate", "test"):
            from trainer.run import evaluate

            return evaluate(cfg, "val" if args.command == "validate" else "test", args.checkpoint)
        if args.command == "predict":
            from trainer.predict import predict

            return predict(cfg, args.checkpoint, args.split, args.output)
        if args.command == "prepare":
            from trainer.plan import prepare_command

            return prepare_command(cfg)
        if args.command == "plan":
            from trainer.plan import plan_command

            return plan_command(cfg, args.nodes, args.gpus_per_node, args.hbm_gb, args.device)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        if type(err).__name__ == "PlanDoesNotFit":
            print(f"error: {err}", file=sys.stderr)
            return 3
        raise
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
