"""The launcher environment: how many torch threads each process takes from its CPU set under
torchrun, SLURM with and without CPU binding, and Lightning's own launcher (mocked environments)."""

from __future__ import annotations

import pytest

from towerrec.trainer.config import load_config
from towerrec.trainer.distributed.environment import launch_environment, set_threads

LAUNCHER_VARIABLES = (
    "OMP_NUM_THREADS", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
    "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE", "SLURM_CPUS_PER_TASK",
    "SLURM_CPUS_ON_NODE", "SLURM_JOB_NAME", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID",
)  # fmt: skip


@pytest.fixture
def threads_chosen(monkeypatch):
    """``threads_chosen(cpus, env)``: the threads ``build`` gives a process whose CPU set holds
    ``cpus`` CPUs, launched with ``env`` (nothing else of a launcher's environment is set)."""
    import torch

    def choose(cpus: int, env: dict[str, str]) -> int:
        for name in LAUNCHER_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)))
        chosen = []
        monkeypatch.setattr(torch, "set_num_threads", chosen.append)
        trainer = load_config("configs/default.yaml").trainer
        set_threads(trainer.num_threads, launch_environment(trainer).devices)
        return chosen[-1]

    return choose


def slurm(tasks_per_node: int, **extra: str) -> dict[str, str]:
    """What ``srun`` and launch/slurm/towerrec.sbatch set for task 1 of a one-node step with
    ``tasks_per_node`` tasks."""
    return {"SLURM_NTASKS": str(tasks_per_node), "SLURM_NNODES": "1", "SLURM_JOB_NAME": "train",
            "SLURM_NTASKS_PER_NODE": str(tasks_per_node), "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
            "SLURM_NODEID": "0", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": str(tasks_per_node),
            **extra}  # fmt: skip


def test_a_slurm_task_bound_to_its_own_cpus_uses_them_all(threads_chosen):
    # 4 tasks x 8 CPUs, each bound to its 8 (srun --cpu-bind=cores): 8 threads each, not 8 / 4
    assert threads_chosen(8, slurm(4, SLURM_CPUS_PER_TASK="8", SLURM_CPUS_ON_NODE="32")) == 8
    # no --cpus-per-task: the job's 32 CPUs on the node over its 4 tasks
    assert threads_chosen(8, slurm(4, SLURM_CPUS_ON_NODE="32")) == 8
    # 2 nodes x 4 tasks
    two_nodes = slurm(4, SLURM_NTASKS="8", SLURM_NNODES="2", SLURM_CPUS_PER_TASK="8", SLURM_CPUS_ON_NODE="32")
    assert threads_chosen(8, two_nodes) == 8


def test_slurm_tasks_that_share_the_nodes_cpus_divide_them(threads_chosen):
    # srun --cpu-bind=none: every task sees the job's 32 CPUs and takes its quarter
    assert threads_chosen(32, slurm(4, SLURM_CPUS_PER_TASK="8", SLURM_CPUS_ON_NODE="32")) == 8
    assert threads_chosen(32, slurm(4, SLURM_CPUS_ON_NODE="32")) == 8
    # a step given 16 of the job's 32 CPUs, unbound: 16 shared by 4 tasks
    assert threads_chosen(16, slurm(4, SLURM_CPUS_ON_NODE="32")) == 4
    # SLURM says nothing of CPUs: the CPU set is divided, as before
    assert threads_chosen(32, slurm(4)) == 8


def test_torchrun_processes_divide_their_cpu_set_even_inside_a_slurm_job(threads_chosen):
    torchrun = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "job"}  # fmt: skip
    assert threads_chosen(16, torchrun) == 4
    # one SLURM task per node running torchrun: its 16 CPUs are shared by torchrun's 4 processes
    inside_slurm = {**slurm(1, SLURM_CPUS_PER_TASK="16", SLURM_CPUS_ON_NODE="16"), **torchrun}
    assert threads_chosen(16, inside_slurm) == 4


def test_threads_from_the_config_or_omp_num_threads_come_first(threads_chosen):
    assert threads_chosen(8, slurm(4, SLURM_CPUS_PER_TASK="8", OMP_NUM_THREADS="3")) == 3
    assert threads_chosen(1, {}) == 1  # Lightning's own launcher, one CPU
