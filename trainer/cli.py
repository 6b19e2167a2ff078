"""The ``towerrec`` command line: parse, load the config, run, map errors to exit codes.

    towerrec fit --config configs/default.yaml --trainer.max_epochs 3 --model.tower mmoe
    towerrec test --config configs/movielens100k.yaml --checkpoint runs/ml100k-u1
    towerrec plan --config configs/large_tables.yaml --nodes 4 --gpus-per-node 8 --hbm-gb 141
    towerrec config trainer.                     # every key under trainer., with type, default, meaning

Commands and their flags are declared in ``towerrec.trainer.commands`` without heavy imports (the help
answers at once); a command's module is imported when it runs. Any config key can be overridden
after the flags. User-facing errors print ``error: ...`` and exit with their code
(``towerrec.trainer.errors``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

from towerrec.trainer.commands import COMMANDS, parser
from towerrec.trainer.config import dump_yaml, load_config
from towerrec.trainer.errors import (
    ConfigError,
    PeerLost,
    TowerrecError,
    exit_code,
    no_space,
    no_space_message,
)
from towerrec.trainer.logs import configure_logging


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


def main(argv: list[str] | None = None) -> int:
    args, extra = parser().parse_known_args(argv)
    command = COMMANDS[args.command]
    configure_logging()
    cfg = None
    try:
        if not command.needs_config:
            if extra:
                raise ConfigError(f"{args.command}: unexpected arguments {' '.join(extra)}")
            return command.load()(None, args)
        overrides = _overrides(extra) + (command.overrides(args) if command.overrides else [])
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        return command.load()(cfg, args)
    except Exception as err:
        code = exit_code(err)
        if code is None:  # not a user-facing error: a bug, keep its traceback
            raise
        full = no_space(err)
        if full is not None and not isinstance(err, TowerrecError):  # ours name what they wrote
            folders = [cfg.run_dir, cfg.data.path] if cfg is not None else []
            print(f"error: {no_space_message(full, folders)}", file=sys.stderr)
        else:
            print(f"error: {err}", file=sys.stderr)
        if isinstance(err, PeerLost):  # the process group is broken: no teardown can complete
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code


if __name__ == "__main__":
    sys.exit(main())
