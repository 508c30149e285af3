"""Trained models as MLflow models: `mlflow.pyfunc.load_model(uri).predict(["prompt"])` generates.

A CalibLM run keeps its plain checkpoint at `model/` (what every pipeline's `runs:/<id>/model`
address reads); `log_calib_lm` wraps the same files as an MLflow pyfunc model (MLmodel, a
signature, the checkpoint as its artifact), so the MLflow UI lists it as a model and a user loads
it without calibray's addresses. Input: a DataFrame (or a dict) with a `prompt` column of strings;
output: one greedy continuation per prompt; param `max_new_tokens` (default 32).

A Hugging Face export (`log_hf_model`) keeps its `save_pretrained` folder at `hf_model/` (the
`runs:/<id>/hf_model` address) and is also logged in MLflow's transformers flavour with its
tokenizer, as a text-generation pipeline: `mlflow.transformers.load_model(uri)` gives the
pipeline, `mlflow.pyfunc.load_model(uri).predict(["prompt"], params={"max_new_tokens": 8})`
generates. That is a second copy of the weights: the flavour stores its own files and the
addresses read the plain folder. The shipped base model is never logged by any run.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch

NAME = "mlflow_model"
HF_NAME = "hf_mlflow_model"
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
        pip_requirements=[f"{p}=={v.split('+')[0]}" for p, v in _versions(torch, mlflow).items()],
    )
    return info.model_uri


def log_hf_model(hf_dir: Path) -> str:
    """Log a `save_pretrained` folder (model + tokenizer) as this run's `hf_model` artifact and as its
    transformers-flavour MLflow model `hf_mlflow_model`; returns the model's URI."""
    import transformers
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    mlflow.log_artifacts(str(hf_dir), "hf_model")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name=HF_NAME,
        task="text-generation",
        signature=ModelSignature(
            inputs=Schema([ColSpec("string")]),
            outputs=Schema([ColSpec("string")]),
            params=ParamSchema([ParamSpec("max_new_tokens", "long", MAX_NEW_TOKENS)]),
        ),
        # MLflow's own inference of requirements imports torchvision, which is not installed
        pip_requirements=[f"{p}=={v.split('+')[0]}" for p, v in _versions(torch, transformers, mlflow).items()],
    )
    return info.model_uri


def _versions(*modules) -> dict[str, str]:
    return {m.__name__: m.__version__ for m in modules}
