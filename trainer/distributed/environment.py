"""The launcher environment: which launcher started this process, the world it defines, this
process's global rank before any process group exists, and its torch threads."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from lightning.pytorch.plugins.environments import (
    ClusterEnvironment,
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from towerrec.trainer.config import TrainerConfig
from towerrec.trainer.errors import ConfigError


@dataclass(frozen=True)
class LaunchEnvironment:
    """What the launcher decided: device type, processes per node, nodes, Lightning's cluster environment."""

    accelerator: str
    devices: int
    num_nodes: int
    cluster: ClusterEnvironment

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def launch_environment(trainer: TrainerConfig) -> LaunchEnvironment:
    """Detected from the launcher (torchrun, SLURM, or Lightning's own: ``trainer.devices``)."""
    accelerator = trainer.accelerator
    if accelerator in ("auto", "gpu"):
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator: cuda requested but no CUDA device is visible")
    devices, num_nodes = trainer.devices, trainer.num_nodes
    if TorchElasticEnvironment.detect():  # torchrun: the launcher decides the world
        environment = TorchElasticEnvironment()
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
        num_nodes = int(os.environ["WORLD_SIZE"]) // devices
    elif SLURMEnvironment.detect():
        environment = SLURMEnvironment(auto_requeue=False)  # our sbatch script requeues (exit 75)
        num_nodes = int(os.environ.get("SLURM_NNODES", "1"))
        devices = int(os.environ["SLURM_NTASKS"]) // num_nodes
        os.environ.setdefault("SLURM_NTASKS_PER_NODE", str(devices))  # `srun -n 2` alone leaves it unset
    else:
        environment = LightningEnvironment()
    return LaunchEnvironment(accelerator, devices, num_nodes, environment)


def set_threads(num_threads: int | None, processes_per_node: int) -> None:
    """Config, else OMP_NUM_THREADS (torchrun sets it), else this process's CPU set / processes.

    The choice is also written to OMP_NUM_THREADS: without it, Lightning's launcher resets torch to
    CPUs / processes when the trainer starts (``trainer.num_threads: 1`` ran with 2 threads on 2 CPUs).
    """
    threads = num_threads or int(os.environ.get("OMP_NUM_THREADS") or 0)
    threads = threads or max(1, len(os.sched_getaffinity(0)) // processes_per_node)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def launcher_rank() -> int:
    """This process's global rank as the launcher set it, before any process group exists."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return int(os.environ.get("LOCAL_RANK", "0"))  # Lightning's own launcher (one node)
