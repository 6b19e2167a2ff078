"""Trainer: the training job. Config and CLI, the Lightning module and data module, the run
folder, metrics and reports; ``towerrec.trainer.distributed`` owns process groups, sharding, checkpoints
and fault tolerance."""
