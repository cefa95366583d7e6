"""A dataset as one model sees it: which set, where its files are, the input size and the normalisation.

The normalisation belongs to the model, not to the dataset: a model trained on Fashion-MNIST and
scored on another set must still see inputs normalised as in training. Every stage after
fine-tuning builds its data from the model's `DataSource`, so a run remembers its data.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ssql_deploy.data.registry import Split, get_spec, load_split
from ssql_deploy.data.transforms import eval_transform


@dataclass(frozen=True)
class DataSource:
    data: str
    root: Path | None
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    download: bool = False

    @classmethod
    def of(cls, data: str, root: Path | None, input_size: int | None = None, download: bool = False) -> "DataSource":
        """The dataset with its own normalisation and default input size (what fine-tuning starts from)."""
        spec = get_spec(data)
        return cls(spec.name, root, input_size or spec.input_size, spec.mean, spec.std, download)

    def eval_transform(self) -> Any:
        return eval_transform(self.input_size, self.mean, self.std)

    def split(self, split: Split, subset: int | None = None, transform: Any = "eval") -> Dataset[Any]:
        """One split, eval-transformed unless another transform (or None, for raw images) is given."""
        chosen = self.eval_transform() if transform == "eval" else transform
        return load_split(self.data, split, self.root, chosen, self.download, subset)

    def describe(self) -> str:
        where = str(self.root) if self.root is not None else "its default location"
        return f"{self.data} from {where}, {self.input_size} px"
