"""Checkpoints prove they are intact: every file's checksums are recorded when it is written and
checked before it is loaded; a damaged checkpoint is named, a resumed fit falls back to the newest
intact one, and nothing in a checkpoint ends in a traceback."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_SYNTHETIC
from tests.trainer.in_process import isolated
from towerrec.trainer import run
from towerrec.trainer.config import load_config
from towerrec.trainer.distributed import checkpoint as ckpt
from towerrec.trainer.errors import exit_code


def save(root: Path, step: int, value: float = 1.0, checksums: bool = True) -> Path:
    tensors = {"w": torch.full((1000,), value), "v": torch.arange(10.0)}
    return ckpt.save(root, step, tensors, {"global_step": step, "epoch": 0}, True, lambda: None,
                     keep_last=5, checksums=checksums)  # fmt: skip


def flip_a_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def shard(checkpoint: Path) -> Path:
    (path,) = checkpoint.glob("*.distcp")
    return path


def test_every_file_of_a_checkpoint_has_checksums_and_a_flipped_byte_is_named(tmp_path):
    path = save(tmp_path, 1)
    recorded = json.loads((path / ckpt.CHECKSUM_FILE).read_text())["files"]
    assert set(recorded) == {p.name for p in path.iterdir()} - {ckpt.CHECKSUM_FILE}
    assert ckpt.check_intact(path) is None
    loaded = {"w": torch.zeros(1000), "v": torch.zeros(10)}
    ckpt.load_tensors(path, loaded)
    assert loaded["w"].eq(1).all()

    flip_a_byte(shard(path))
    assert ckpt.check_intact(path) == (
        f"{shard(path)}: bytes 0-{shard(path).stat().st_size} differ from their checksum recorded when it was written"
    )
    with pytest.raises(
        ckpt.CheckpointError, match=re.escape(f"{path}: damaged: {shard(path)}: bytes")
    ) as err:
        ckpt.load_tensors(path, loaded)
    assert exit_code(err.value) == 2


def test_checksums_taken_while_writing_equal_those_of_the_file_read_back(tmp_path, monkeypatch):
    """Each rank hashes its shards as DCP writes them; chunk boundaries fall inside writes."""
    monkeypatch.setattr(ckpt, "CHECKSUM_CHUNK_BYTES", 1000)
    path = save(tmp_path, 1)
    (name,) = [p.name for p in path.glob("*.distcp")]
    recorded = json.loads((path / ckpt.CHECKSUM_FILE).read_text())["files"][name]
    assert len(recorded["crc32"]) > 3
    assert recorded == ckpt.file_checksums(path, [name])[name]


def test_with_no_intact_checkpoint_left_resuming_stops_naming_the_damage(tmp_path):
    first, second = save(tmp_path, 1), save(tmp_path, 2)
    flip_a_byte(shard(first))
    state = second / ckpt.STATE_FILE
    state.write_text(state.read_text().replace('"global_step": 2', '"global_step": 7'))
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.intact(second, fallback=True)
    assert str(err.value).startswith(f"{tmp_path}: no intact checkpoint to resume from ({state}: bytes 0-")
    assert exit_code(err.value) == 2


def test_a_damaged_index_or_shard_without_checksums_is_one_clear_error(tmp_path, caplog):
    """Checkpoints written before checksums: what loading them meets is still one line, naming
    the file, with no traceback logged first and no advice to unpickle arbitrary code."""
    path = save(tmp_path / "index", 1, checksums=False)
    assert not (path / ckpt.CHECKSUM_FILE).exists()
    flip_a_byte(path / ".metadata", 0.6)
    loaded = {"w": torch.zeros(1000), "v": torch.zeros(10)}
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_tensors(path, loaded)
    assert str(err.value).startswith(f"{path / '.metadata'}: ")
    assert "damaged" in str(err.value)
    assert "\n" not in str(err.value)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]  # DCP's tracebacks

    path = save(tmp_path / "shard", 1, checksums=False)
    data = shard(path).read_bytes()
    shard(path).write_bytes(
        data.replace(b"torch._utils", b"posix.system", 1)
    )  # a global no tensor file holds
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_tensors(path, loaded)
    assert (
        str(err.value)
        == f"{path}: cannot be loaded into this model (rank 0: a tensor file is damaged or is not a checkpoint shard)"
    )
    assert "weights_only" not in str(err.value)


def test_non_utf8_bytes_in_the_pointer_or_the_state_are_named_not_a_traceback(tmp_path, capsys):
    save(tmp_path, 1)
    newest = save(tmp_path, 2, checksums=False)
    (tmp_path / ckpt.LATEST_FILE).write_bytes(b"step-0000\xff\xfe02\n")
    assert ckpt.find_latest(tmp_path) == newest  # the pointer is only a shortcut to the newest
    assert f"{tmp_path / ckpt.LATEST_FILE} is damaged" in capsys.readouterr().out

    (newest / ckpt.STATE_FILE).write_bytes(b'{"global_step": \xff}')
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{newest / ckpt.STATE_FILE}: cannot be read")):
        ckpt.load_state(newest)
    (tmp_path / ckpt.BEST_FILE).write_bytes(b"\xff")
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"{tmp_path / ckpt.BEST_FILE}: not a readable")):
        ckpt.read_best(tmp_path)


def fit(run_dir: Path, overrides: list[str]) -> dict:
    with isolated():
        assert run.fit(load_config("configs/default.yaml", [*overrides, f"run_dir={run_dir}"])) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    del metrics["train_seconds"]
    return metrics


@pytest.mark.slow
def test_fit_resumes_from_the_newest_intact_checkpoint_and_ends_as_an_uninterrupted_run(
    tiny_data, tmp_path, capsys
):
    """A byte flipped in a tensor shard of the newest checkpoint and ``consumed`` edited in the
    reader position of the one before (both loaded silently before checksums): the resume names
    both and trains on from the one before them."""
    overrides = [f"data.path={tiny_data}", *TINY_SYNTHETIC, "data.batch_size=128", "checkpoint.every_n_steps=5",
                 "checkpoint.keep_last=3", "trainer.progress_bar=off"]  # fmt: skip
    straight = fit(tmp_path / "straight", [*overrides, "trainer.max_epochs=2"])
    run_dir = tmp_path / "damaged"
    fit(run_dir, [*overrides, "trainer.max_epochs=1"])
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000010", "step-00000015", "step-00000019"]
    damaged = shard(root / "step-00000019")
    flip_a_byte(damaged)
    state = root / "step-00000015" / ckpt.STATE_FILE
    state.write_text(re.sub(r'"consumed": \d+', '"consumed": 11', state.read_text()))
    capsys.readouterr()
    resumed = fit(run_dir, [*overrides, "trainer.max_epochs=2"])
    out = capsys.readouterr().out
    assert f"checkpoint {root / 'step-00000019'} is damaged: {damaged}: bytes" in out
    assert f"checkpoint {root / 'step-00000015'} is damaged: {state}: bytes" in out
    assert f"resuming from {root / 'step-00000010'}, the newest intact checkpoint" in out
    assert resumed == straight
