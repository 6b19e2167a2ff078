"""Models: multi-task towers on TorchRec embedding collections. No torch.distributed in here."""
