"""Which loaders keep their worker processes between passes."""

import multiprocessing

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from ssql_deploy.data.loaders import make_loader
from ssql_deploy.distributed import DistInfo


def _digits() -> TensorDataset:
    images, labels = load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(labels))


def test_only_training_loaders_keep_their_workers() -> None:
    """An evaluation loader's workers exit after each pass: forked from a process that training has grown, persistent
    ones would hold its pages for the rest of the run (the out-of-memory of a MobileNetV2-0.5 SSQL pretraining)."""
    dataset = _digits()
    before = set(multiprocessing.active_children())
    evaluation = make_loader(dataset, 256, False, DistInfo(), 2, 0)
    images = sum(len(batch[0]) for batch in evaluation)
    assert images == len(dataset)
    assert set(multiprocessing.active_children()) == before  # while the loader lives on, as the trainer's do
    train = make_loader(dataset, 256, True, DistInfo(), 2, 0)
    steps = sum(1 for _ in train)
    assert steps == len(dataset) // 256
    assert len(set(multiprocessing.active_children()) - before) == 2
