"""The command line answers at once and documents every config key."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO
from towerrec.trainer.config_reference import entries, markdown


def test_help_does_not_import_torch_or_any_command_module():
    """``towerrec --help`` and ``towerrec COMMAND --help`` build the parser from declarations
    only (trainer.commands): no torch, TorchRec, Lightning, pyarrow or numpy is imported."""
    probe = (
        "import sys, contextlib, io\n"
        "from trainer import cli\n"
        "for argv in (['--help'], ['fit', '--help'], ['recommend', '--help'], ['config', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: cli.main(argv)\n"
        "        except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'torchrec', 'lightning', 'pyarrow', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_command_help_names_its_flags_and_points_to_the_config_keys():
    out = subprocess.run(
        [sys.executable, "-m", "towerrec.trainer.cli", "recommend", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    for flag in ("--config", "--checkpoint", "--users", "--k", "--output", "--evaluate"):
        assert flag in out
    assert "towerrec config" in out


def test_the_config_reference_in_the_repository_is_current():
    assert (REPO / "configs" / "REFERENCE.md").read_text() == markdown(), (
        "regenerate it: towerrec config --markdown > configs/REFERENCE.md"
    )


def test_every_config_key_has_a_meaning():
    undocumented = [key for key, _, _, doc in entries() if not doc]
    assert undocumented == []


def test_config_command_lists_keys_with_type_and_default():
    out = subprocess.run(
        [sys.executable, "-m", "towerrec.trainer.cli", "config", "model.tower"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout
    assert "model.tower  ('shared_bottom' | 'mmoe' | 'ple' | 'esmm'; default 'shared_bottom')" in out
