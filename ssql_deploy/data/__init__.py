from ssql_deploy.data.registry import DatasetSpec, get_spec, list_datasets, load_split, num_classes
from ssql_deploy.data.source import DataSource
from ssql_deploy.data.transforms import TwoViews, eval_transform, ssl_view_transform, train_transform

__all__ = [
    "DataSource",
    "DatasetSpec",
    "TwoViews",
    "eval_transform",
    "get_spec",
    "list_datasets",
    "load_split",
    "num_classes",
    "ssl_view_transform",
    "train_transform",
]
