"""The core commands' arguments and entry points (see trainer.cli)."""

from __future__ import annotations

import argparse

from trainer.config import Config


def run_fit(cfg: Config, args: argparse.Namespace) -> int:
    from trainer.run import fit

    return fit(cfg)


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="checkpoint folder or run folder (default: the run's latest)")


add_test_arguments = add_validate_arguments


def run_validate(cfg: Config, args: argparse.Namespace) -> int:
    from trainer.run import evaluate

    return evaluate(cfg, "val", args.checkpoint)


def run_test(cfg: Config, args: argparse.Namespace) -> int:
    from trainer.run import evaluate

    return evaluate(cfg, "test", args.checkpoint)


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    add_validate_arguments(parser)
    parser.add_argument("--split", help="split to score (default: data.test_split)")
    parser.add_argument("--output", help="output folder (default: <run_dir>/predictions)")


def run_predict(cfg: Config, args: argparse.Namespace) -> int:
    from trainer.run import predict

    return predict(cfg, args.checkpoint, args.split, args.output)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", help="input format (overrides data.prepare.format)")
    parser.add_argument("--source", help="input file/folder (overrides data.prepare.source)")
    parser.add_argument("--out", help="output data set folder (overrides data.path)")


def prepare_overrides(args: argparse.Namespace) -> list[str]:
    pairs = (("format", "data.prepare.format"), ("source", "data.prepare.source"), ("out", "data.path"))
    return [f"{key}={getattr(args, flag)}" for flag, key in pairs if getattr(args, flag)]


def run_prepare(cfg: Config, args: argparse.Namespace) -> int:
    from trainer.plan import prepare_command

    return prepare_command(cfg)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=1, help="nodes in the cluster")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node")
    parser.add_argument("--hbm-gb", type=float, default=80.0, help="memory per device in GB")
    parser.add_argument("--ddr-gb", type=float, default=None, help="host memory per rank in GB (UVM caching)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="device type to plan for")


def run_plan(cfg: Config, args: argparse.Namespace) -> int:
    from trainer.plan import plan_command

    return plan_command(cfg, args.nodes, args.gpus_per_node, args.hbm_gb, args.device, args.ddr_gb)
