"""Trainer: config, the TorchRec Lightning strategy (owner of process groups and sharding), the
training module, checkpoints, metrics and the CLI."""
