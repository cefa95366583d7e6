"""ssql-deploy: SSQL-pretrained backbones from checkpoint to measured, deployable INT8 artifact."""

__version__ = "0.1.0"
