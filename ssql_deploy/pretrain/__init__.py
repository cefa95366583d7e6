"""SSQL pretraining and the self-supervised baselines it is compared with (`ssql-deploy pretrain`)."""

from ssql_deploy.pretrain.trainer import run_pretrain

__all__ = ["run_pretrain"]
