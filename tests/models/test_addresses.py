"""Every address form resolves to a model and its tokenizer; the CalibLM export is a normal HF checkpoint."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from workers.data.tokenizer import ByteTokenizer, HFTokenizer
from workers.model.hf import HFModelError
from workers.model.hf.address import load_any, load_tokenizer, model_shape
from workers.model.hf.export import export_llama
from workers.model.hf.shipped import build_once

TEXT = "Ein Würfel ✓ fällt\n\tdef f(x): return x  # bytes"


@pytest.fixture(scope="module")
def exported(tiny_dense_trained, tmp_path_factory):
    return export_llama(tiny_dense_trained[1], tmp_path_factory.mktemp("export") / "hf_model")


def test_export_writes_a_tokenizer_transformers_loads(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    assert tok.encode(TEXT, add_special_tokens=False) == ByteTokenizer().encode(TEXT)
    ours = load_tokenizer(f"hf:{exported}")
    assert isinstance(ours, HFTokenizer) and ours.byte_level and ours.vocab_size == 256
    ids = ours.encode(TEXT)
    assert ours.decode(ids) == TEXT and ours.n_bytes(ids) == len(TEXT.encode("utf-8"))
    assert ours.n_bytes(ids[:3]) + ours.n_bytes(ids[3:]) == ours.n_bytes(ids)  # additive inside a character


def test_every_address_form(exported, tiny_dense_checkpoint, mlflow_uri):
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tiny_dense_checkpoint), "model")
        mlflow.log_artifacts(str(exported), "hf_model")
    rid = run.info.run_id
    assert isinstance(load_tokenizer(str(tiny_dense_checkpoint)), ByteTokenizer)
    assert isinstance(load_tokenizer(f"runs:/{rid}/model"), ByteTokenizer)
    assert isinstance(load_tokenizer(f"runs:/{rid}/hf_model"), HFTokenizer)
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_any(f"runs:/{rid}/model")(x).logits
        for address in (f"runs:/{rid}/hf_model", f"hf:{exported}"):
            torch.testing.assert_close(load_any(address)(x).logits, ref, atol=1e-5, rtol=1e-5)
    assert model_shape(f"runs:/{rid}/hf_model") == model_shape(f"runs:/{rid}/model")
    assert load_any(f"hf:{exported}", dtype="bf16").hf.dtype == torch.bfloat16


def test_no_tokenizer_and_a_non_byte_vocabulary_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    cfg.update(dict(num_attention_heads=2, num_key_value_heads=1))
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(HFModelError, match=rf"hf:{tmp_path}.*4096"):
        load_tokenizer(f"hf:{tmp_path}")


def test_parallel_builds_of_a_shipped_folder_leave_one_complete_copy(tmp_path):
    """Conversions racing for the same cache folder (parallel tests, several actors): every caller
    gets the finished folder, exactly one copy is kept and no temporary folder is left behind."""
    import os
    import time
    from concurrent.futures import ThreadPoolExecutor

    final = tmp_path / "models" / "m-0123"
    with ThreadPoolExecutor(4) as ex:
        out = list(ex.map(_slow_build, [final] * 4))
    assert {Path(p) for p in out} == {final}
    assert (final / "config.json").read_text().startswith("built by ")
    assert os.listdir(final.parent) == ["m-0123"]  # the losers' temporary copies are gone
    t = (final / "config.json").stat().st_mtime
    time.sleep(0.01)
    assert build_once(final, _fail) == final and (final / "config.json").stat().st_mtime == t  # built once


def _slow_build(final):
    def build(out):
        import threading
        import time

        time.sleep(0.3)  # long enough that all four are building at once
        (out / "config.json").write_text(f"built by {threading.get_ident()}")

    return str(build_once(final, build))


def _fail(out):
    raise AssertionError("a finished folder is never rebuilt")
