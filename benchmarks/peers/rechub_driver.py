"""torch-rechub's own MMOE / SharedBottom with its MTLTrainer on the benchmark task.

    benchmarks/.peers/rechub/bin/python benchmarks/peers/rechub_driver.py DATA.npz mmoe 4096 3 OUTDIR

The usual torch-rechub loop: ``DataGenerator`` → ``DataLoader`` (per-row ``__getitem__``, default
collate) → ``MTLTrainer.fit`` (Adam on all parameters, dense embedding gradients, validation each
epoch). Prints one JSON line (samples/s of training steps after epoch 1, test RMSE and AUC).
"""

import json
import os
import sys
import time

import numpy as np
import torch
from peer_common import MULTI_HOT, SPARSE, StepTimer, auc, load, rmse
from torch_rechub.basic.features import SequenceFeature, SparseFeature
from torch_rechub.models.multi_task import MMOE, SharedBottom
from torch_rechub.trainers import MTLTrainer
from torch_rechub.utils.data import DataGenerator


def main() -> None:
    path, tower, batch_size, epochs, out_dir = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5],
    )
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    arrays, vocab = load(path)
    features = [SparseFeature(name, vocab_size=vocab[name], embed_dim=16) for name in SPARSE]
    features.append(
        SequenceFeature(MULTI_HOT, vocab_size=vocab[MULTI_HOT], embed_dim=16, pooling="mean", padding_idx=0)
    )
    task_types = ["regression", "classification"]

    def split(name):
        x = {f: arrays[f"{name}/{f}"] for f in (*SPARSE, MULTI_HOT)}
        y = np.stack([arrays[f"{name}/rating"], arrays[f"{name}/like"]], axis=1)
        return x, y

    (x_train, y_train), (x_test, y_test) = split("train"), split("test")
    train_dl, val_dl, test_dl = DataGenerator(x_train, y_train).generate_dataloader(
        x_val=x_test, y_val=y_test, x_test=x_test, y_test=y_test, batch_size=batch_size
    )
    heads = [{"dims": [32]}, {"dims": [32]}]
    if tower == "mmoe":
        model = MMOE(features, task_types, n_expert=4, expert_params={"dims": [64]}, tower_params_list=heads)
    else:
        model = SharedBottom(features, task_types, bottom_params={"dims": [128, 64]}, tower_params_list=heads)
    trainer = MTLTrainer(
        model,
        task_types,
        optimizer_params={"lr": 1e-3, "weight_decay": 1e-5},
        n_epoch=epochs,
        earlystop_taskid=1,
        earlystop_patience=100,
        device="cpu",
        model_path=out_dir,
    )
    timer = StepTimer(model)
    train_one_epoch = trainer.train_one_epoch

    def timed_epoch(loader):
        timer.new_epoch()
        return train_one_epoch(loader)

    trainer.train_one_epoch = timed_epoch
    started = time.perf_counter()
    trainer.fit(train_dl, val_dl)
    wall_s = time.perf_counter() - started
    model.eval()
    preds = []
    with torch.no_grad():
        for x, _ in test_dl:
            preds.append(model(x).numpy())
    pred = np.concatenate(preds)
    print(
        json.dumps(
            {
                "samples_per_s": timer.samples_per_s(),
                "epoch_steps": [len(s) for s in timer.starts],
                "wall_s": wall_s,
                "rmse": rmse(pred[:, 0], y_test[:, 0]),
                "auc": auc(pred[:, 1], y_test[:, 1]),
            }
        )
    )


if __name__ == "__main__":
    main()
