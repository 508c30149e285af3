"""A trained CalibLM logged as an MLflow pyfunc model: loadable by mlflow.pyfunc and generating."""

import mlflow
import pandas as pd

from workers.data.tokenizer import ByteTokenizer
from workers.model import checkpoint
from workers.model.mlflow_model import greedy, log_calib_lm
from workers.runtime import tracking


def test_pyfunc_model_loads_and_generates_the_checkpoints_greedy_text(tiny_checkpoint):
    with tracking.start_run("mlflow_model_test"):
        uri = log_calib_lm(tiny_checkpoint)
    loaded = mlflow.pyfunc.load_model(uri)
    assert [c.name for c in loaded.metadata.get_input_schema().inputs] == ["prompt"]
    tok, model = ByteTokenizer(), checkpoint.load(tiny_checkpoint)
    want = [tok.decode(greedy(model, tok.encode(p), 8)) for p in ("def ", "The with")]
    got = loaded.predict(pd.DataFrame({"prompt": ["def ", "The with"]}), params={"max_new_tokens": 8})
    assert list(got) == want and all(len(tok.encode(t)) >= 1 for t in got)
    assert len(loaded.predict({"prompt": ["import "]})[0]) >= 1  # a dict of columns too (default 32 tokens)
