"""The one owner of everything distributed: the launcher environment, the TorchRec Lightning
strategy (process group, sharding plan, DMP, dense gradient averaging), sharded checkpoints and
fault tolerance. Nothing outside this package creates process groups or places tables."""
