"""The pyfunc model of a registered adps network, logged as MLflow "model from code".

MLflow stores this file with the model and executes it when the model is loaded (no pickled
Python object): it builds the network from the ``weights`` artifact (safetensors + JSON) and
reconstructs through :func:`adps.orchestration.registry.predict_arrays`. See
:mod:`adps.orchestration.registry` for the input and output format.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class AdpsReconstructor(PythonModel):
    """Reconstructs MRI slices with a registered adps network (A-OS or the unrolled network)."""

    def load_context(self, context: Any) -> None:
        import torch

        from adps.orchestration.registry import WEIGHTS_ARTIFACT, load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.config = load_model(context.artifacts[WEIGHTS_ARTIFACT], device=device, with_config=True)
        self.method = self.config.get("method", "ambient")

    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None):  # noqa: ANN001
        from adps.nn.reconstruct import A_OS_SIGMA
        from adps.orchestration.registry import predict_arrays

        sigma = float((params or {}).get("sigma", A_OS_SIGMA))
        return predict_arrays(self.method, self.model, model_input, sigma=sigma)


mlflow.models.set_model(AdpsReconstructor())
