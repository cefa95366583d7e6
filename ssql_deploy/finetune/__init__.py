from ssql_deploy.finetune.trainer import run_finetune

__all__ = ["run_finetune"]
