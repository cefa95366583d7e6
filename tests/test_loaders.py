"""Which loaders keep their worker processes between passes."""

import multiprocessing
from pathlib import Path

from torch.utils.data import Subset

from ssql_deploy.data import DataSource
from ssql_deploy.data.loaders import make_loader
from ssql_deploy.distributed import DistInfo


def test_only_training_loaders_keep_their_workers(fmnist_root: Path) -> None:
    """An evaluation loader's workers exit after each pass: forked from a process that training has grown, persistent
    ones would hold its pages for the rest of the run (the out-of-memory of a MobileNetV2-0.5 SSQL pretraining)."""
    dataset = Subset(DataSource.of("fashion-mnist", fmnist_root, 32).split("test"), range(600))
    before = set(multiprocessing.active_children())
    evaluation = make_loader(dataset, 256, False, DistInfo(), 2, 0)
    assert sum(len(images) for images, _ in evaluation) == len(dataset)
    assert set(multiprocessing.active_children()) == before  # while the loader lives on, as the trainer's do
    train = make_loader(dataset, 256, True, DistInfo(), 2, 0)
    assert sum(1 for _ in train) == len(dataset) // 256
    assert len(set(multiprocessing.active_children()) - before) == 2
