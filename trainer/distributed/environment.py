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
    """Config, else OMP_NUM_THREADS (torchrun sets it), else this process's share of its CPU set
    (``cpus_for_process``).

    The choice is also written to OMP_NUM_THREADS: without it, Lightning's launcher resets torch to
    CPUs / processes when the trainer starts (``trainer.num_threads: 1`` ran with 2 threads on 2 CPUs).
    """
    threads = num_threads or int(os.environ.get("OMP_NUM_THREADS") or 0)
    threads = threads or cpus_for_process(processes_per_node)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def cpus_for_process(processes_per_node: int) -> int:
    """The CPUs this process may use: its CPU set (``os.sched_getaffinity``) divided by the
    processes on the node, which all share it, unless SLURM started this process as one of its
    tasks and bound it to CPUs of its own (``srun --cpu-bind``, the default with the task/affinity
    plugin): then the CPU set is already this task's share and is not divided again.

    A task's CPU set is its own when it holds no more CPUs than one task is given:
    ``SLURM_CPUS_PER_TASK``, else the job's CPUs on the node (``SLURM_CPUS_ON_NODE``) over its tasks
    on the node. Under torchrun (even inside a SLURM job) the processes share the launcher's CPU set.
    """
    cpus = len(os.sched_getaffinity(0))
    share = _slurm_task_cpus(processes_per_node)
    if share is not None and cpus <= share:
        return cpus
    return max(1, cpus // processes_per_node)


def _slurm_task_cpus(processes_per_node: int) -> int | None:
    """CPUs SLURM gives each of its tasks on this node; None when SLURM did not start this process
    as a task (no SLURM, or torchrun inside a SLURM job) or does not say."""
    if TorchElasticEnvironment.detect() or not SLURMEnvironment.detect():
        return None
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    if os.environ.get("SLURM_CPUS_ON_NODE"):
        return int(os.environ["SLURM_CPUS_ON_NODE"]) // max(1, processes_per_node)
    return None


def launcher_rank() -> int:
    """This process's global rank as the launcher set it, before any process group exists."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return int(os.environ.get("LOCAL_RANK", "0"))  # Lightning's own launcher (one node)
