"""tvr: text-video retrieval methods on open_clip backbones, in plain PyTorch.

Nothing here imports Ray, MLflow, boto3 or DeepSpeed: the platform (``tvr_platform``) applies
data loading, parallelism and tracking from outside.
"""

__version__ = "0.1.0"
