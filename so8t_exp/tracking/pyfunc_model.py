"""The MLflow ``pyfunc`` of an exported SO8T model, defined from code (MLflow's "models
from code"; so8t_exp never imports this file): MLflow copies it into the model and runs it
at load time, with ``so8t_safety_head.py`` on the path, so loading needs neither so8t_exp
nor unpickling.

Input: a DataFrame with a ``prompt`` column; param ``max_new_tokens``. Output: ``answer``,
``safety_label`` and ``safety_confidence`` per prompt.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class SO8TPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from so8t_safety_head import SO8TChat

        self.chat = SO8TChat(context.artifacts["hf_model"])

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        prompts = [str(p) for p in pd.DataFrame(model_input)["prompt"]]
        limit = int((params or {}).get("max_new_tokens", 64))
        return pd.DataFrame(self.chat.answer(prompts, max_new_tokens=limit))


mlflow.models.set_model(SO8TPyfunc())
