"""The ``towerrec`` command line: parse, build, run, close. Logic lives in the modules it calls.

    towerrec fit --config configs/default.yaml --trainer.max_epochs 3 --model.tower mmoe
    towerrec test --config configs/movielens100k.yaml --checkpoint runs/ml100k-u1
    towerrec plan --config configs/large_tables.yaml --nodes 4 --gpus-per-node 8 --hbm-gb 141
    towerrec prepare --config configs/movielens100k.yaml

Each command is ``(help, add_arguments, run)`` in ``COMMANDS``; ``run(cfg, args) -> exit code``
is imported only when that command runs. Any config key can be overridden after the flags.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from trainer.config import dump_yaml, load_config
from trainer.errors import ConfigError, PeerLost, exit_code

# name -> (help, module with `add_arguments(parser)` (optional) and `run_<name>(cfg, args)`)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": (
        "train (resuming from the run's latest checkpoint), then evaluate on the test split",
        "trainer.commands",
    ),
    "validate": ("evaluate a checkpoint on the validation split", "trainer.commands"),
    "test": ("evaluate a checkpoint on the test split", "trainer.commands"),
    "predict": ("write per-row predictions of a checkpoint to Parquet", "trainer.commands"),
    "prepare": ("build the Parquet data set (data.prepare, or --format/--source/--out)", "trainer.commands"),
    "plan": ("print the sharding plan and per-rank memory for a cluster, no GPU needed", "trainer.commands"),
    "export": (
        "write an unsharded model.pt and a torch.export serving artifact from a checkpoint",
        "trainer.export",
    ),
    "recommend": (
        "top-K items per user from a checkpoint (Parquet/CSV), optionally with ranking metrics",
        "trainer.recommend",
    ),
    "rank-eval": ("ranking metrics @K (model vs popularity) on the test split", "trainer.ranking"),
    "report": ("learning-curve and test-metric PNGs plus report.md for a run folder", "trainer.report"),
}


def _python_name(command: str) -> str:
    return command.replace("-", "_")


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
    for name, (help_text, module_name) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--config", help="YAML config (see configs/)")
        cmd.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
        module = importlib.import_module(module_name)
        add = getattr(module, f"add_{_python_name(name)}_arguments", None)
        if add is not None:
            add(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    module = importlib.import_module(COMMANDS[args.command][1])
    try:
        overrides = _overrides(extra)
        config_overrides = getattr(module, f"{_python_name(args.command)}_overrides", None)
        if config_overrides is not None:
            overrides += config_overrides(args)
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        return getattr(module, f"run_{_python_name(args.command)}")(cfg, args)
    except Exception as err:
        code = exit_code(err)
        if code is None:  # not a user-facing error: a bug, keep its traceback
            raise
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, PeerLost):  # the process group is broken: no teardown can complete
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


if __name__ == "__main__":
    sys.exit(main())
