"""DeepCTR-Torch's own MMOE / SharedBottom with its ``BaseModel.fit`` on the benchmark task.

    benchmarks/.peers/deepctr/bin/python benchmarks/peers/deepctr_driver.py DATA.npz mmoe 4096 3 OUTDIR

The usual DeepCTR loop: ``compile("adam", ["mse", "binary_crossentropy"])`` → ``fit`` (TensorDataset
DataLoader, Adam on all parameters, dense embedding gradients, its default L2 regularisation). No
per-step training metrics and ``verbose=2`` (no tqdm), the cheapest setting of its loop. Prints one
JSON line (samples/s of training steps after epoch 1, test RMSE and AUC).
"""

import json
import os
import sys
import time

import numpy as np
import torch
from deepctr_torch.callbacks import Callback
from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
from deepctr_torch.models.multitask import MMOE, SharedBottom
from peer_common import MULTI_HOT, SPARSE, StepTimer, auc, load, rmse


def main() -> None:
    path, tower, batch_size, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    arrays, vocab = load(path)
    columns = [SparseFeat(name, vocabulary_size=vocab[name], embedding_dim=16) for name in SPARSE]
    columns.append(
        VarLenSparseFeat(
            SparseFeat(MULTI_HOT, vocabulary_size=vocab[MULTI_HOT], embedding_dim=16),
            maxlen=arrays[f"train/{MULTI_HOT}"].shape[1],
            combiner="mean",
        )
    )
    kwargs = dict(task_types=("regression", "binary"), task_names=("rating", "like"), device="cpu")
    if tower == "mmoe":
        model = MMOE(
            columns,
            num_experts=4,
            expert_dnn_hidden_units=(64,),
            gate_dnn_hidden_units=(),
            tower_dnn_hidden_units=(32,),
            **kwargs,
        )
    else:
        model = SharedBottom(
            columns, bottom_dnn_hidden_units=(128, 64), tower_dnn_hidden_units=(32,), **kwargs
        )
    model.compile("adam", loss=["mse", "binary_crossentropy"])

    def inputs(split):
        return {name: arrays[f"{split}/{name}"] for name in (*SPARSE, MULTI_HOT)}

    timer = StepTimer(model)

    class EpochMark(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            timer.new_epoch()

    y_train = np.stack([arrays["train/rating"], arrays["train/like"]], axis=1)
    started = time.perf_counter()
    model.fit(
        inputs("train"), y_train, batch_size=batch_size, epochs=epochs, verbose=2, callbacks=[EpochMark()]
    )
    wall_s = time.perf_counter() - started
    pred = model.predict(inputs("test"), batch_size=4096)
    print(
        json.dumps(
            {
                "samples_per_s": timer.samples_per_s(),
                "epoch_steps": [len(s) for s in timer.starts],
                "wall_s": wall_s,
                "rmse": rmse(pred[:, 0], arrays["test/rating"]),
                "auc": auc(pred[:, 1], arrays["test/like"]),
            }
        )
    )


if __name__ == "__main__":
    main()
