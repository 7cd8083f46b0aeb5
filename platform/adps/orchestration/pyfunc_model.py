"""The pyfunc model of a registered adps network, logged as MLflow "model from code".

MLflow stores this file with the model and executes it when the model is loaded (no pickled Python object): it
builds the network from the ``weights`` artifact (safetensors + JSON) and reconstructs through
:func:`adps.orchestration.registry.predict_arrays`, whose module describes the input and output format.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


class RequestError(MlflowException):
    """A bad request, answered with HTTP 400 and ``message`` saying what is wrong with it.

    MLflow's scoring server answers any other exception of ``predict`` with a generic message (ours only in
    ``stack_trace``), and rewrites an MlflowException's message to start with the whole request ("Failed to predict
    data '<input>'", megabytes for one slice). This class keeps the first message it is given."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self.__dict__["_message"]

    @message.setter
    def message(self, value: str) -> None:
        self.__dict__.setdefault("_message", value)


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
        try:
            return predict_arrays(self.method, self.model, model_input, sigma=sigma)
        except ValueError as err:
            raise RequestError(str(err)) from None


mlflow.models.set_model(AdpsReconstructor())
