"""A trained CalibLM as an MLflow model: `mlflow.pyfunc.load_model(uri).predict(["prompt"])` generates.

The run keeps its plain checkpoint at `model/` (what every pipeline's `runs:/<id>/model` address
reads); this wraps the same files as an MLflow pyfunc model (MLmodel, a signature, the checkpoint
as its artifact), so the MLflow UI lists it as a model and a user loads it without calibray's
addresses. Input: a DataFrame (or a dict) with a `prompt` column of strings; output: one
greedy continuation per prompt; param `max_new_tokens` (default 32).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch

NAME = "mlflow_model"
MAX_NEW_TOKENS = 32


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", MAX_NEW_TOKENS)]),
    )


@torch.no_grad()
def greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation ids of `ids`, no cache (CalibLMs are small), the context clipped to the
    model's max_seq_len."""
    out = list(ids)
    for _ in range(max_new_tokens):
        window = torch.tensor([out[-model.cfg.max_seq_len :]])
        out.append(int(model(window).logits[0, -1].argmax()))
    return out[len(ids) :]


class CalibLMModel(mlflow.pyfunc.PythonModel):
    """pyfunc: prompts -> greedy continuations of the CalibLM checkpoint in artifacts["checkpoint"]."""

    def load_context(self, context) -> None:
        from workers.data.tokenizer import ByteTokenizer
        from workers.model import checkpoint

        self.model = checkpoint.load(context.artifacts["checkpoint"])
        self.tokenizer = ByteTokenizer()

    def predict(self, context, model_input, params=None) -> list[str]:
        import numpy as np

        column = model_input["prompt"]  # a DataFrame column, or a dict's value as MLflow enforced it
        prompts = [str(p) for p in np.asarray(column, dtype=object).reshape(-1)]
        n = int((params or {}).get("max_new_tokens", MAX_NEW_TOKENS))
        tok = self.tokenizer
        return [tok.decode(greedy(self.model, tok.encode(p) or [0], n)) for p in prompts]


def log_calib_lm(checkpoint_dir: Path) -> str:
    """Log `checkpoint_dir` as this run's pyfunc model `mlflow_model`; returns its model URI."""
    info = mlflow.pyfunc.log_model(
        name=NAME,
        python_model=CalibLMModel(),
        artifacts={"checkpoint": str(checkpoint_dir)},
        signature=signature(),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
    )
    return info.model_uri
