"""The MLflow "models from code" file of every registered tvr model (no pickled Python object).

``mlflow.pyfunc.log_model(python_model=<this file>)`` stores this file's text next to the
``weights.pt`` / ``job.yaml`` artifacts; ``mlflow.pyfunc.load_model`` runs it, which only imports
the installed tvr (``TvrRetrievalModel`` below) and hands MLflow an instance: the registry holds
no cloudpickle ``python_model.pkl`` whose loading could run whatever was pickled into it.
tvr's own loaders (``tvr eval``, ``tvr index build``) never run it: they read the two artifacts.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.pyfunc
import torch

from tvr_platform.registry import build_from_artifacts


class TvrRetrievalModel(mlflow.pyfunc.PythonModel):
    """pyfunc: a DataFrame/list of query strings -> L2-normalised text embeddings."""

    def load_context(self, context):
        self.job, self.method = build_from_artifacts(Path(context.artifacts["job"]),
                                                     Path(context.artifacts["weights"]))

    def predict(self, context, model_input, params=None):
        texts = list(model_input["text"] if hasattr(model_input, "columns") else model_input)
        with torch.no_grad():
            feats = self.method.encode_text(self.method.backbone.tokenize(texts))
        first = next(iter(feats.values()))
        return torch.nn.functional.normalize(first.float(), dim=-1).numpy()


mlflow.models.set_model(TvrRetrievalModel())
