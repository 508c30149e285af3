"""`python -m pipelines.train_moe --model hf:<dir>`: the real pipeline (Ray Train, 2 workers,
expert parallel, MLflow) on a tiny qwen3_moe, and its refusals of bad input."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines import train_moe, train_moe_hf
from workers.model.config import RouterConfig
from workers.model.hf.tiny_moe import save_tiny, tiny_config
from workers.runtime import cli, tracking
from workers.training.hf_moe import HFMoETrainConfig


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("hf") / "qwen3_moe")


def test_finetune_ep2_worker_killed_resumes_and_exports(ray_local, mlflow_uri, qwen_dir, tmp_path):
    """BIP on 2 expert-parallel workers (4 of the 8 experts each); rank 1 dies after step 3 and
    both ranks restart from the step-2 checkpoint; every step's loads and MaxVio per layer reach
    MLflow; the exported hf_model loads in plain transformers with its tokenizer, and as an MLflow
    transformers-flavour model that generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.model.hf.moe import ROUTING_FILE

    marker = tmp_path / "killed"
    tc = HFMoETrainConfig(
        model=f"hf:{qwen_dir}",
        router=RouterConfig("bip"),
        steps=5,
        batch_size=2,
        seq_len=32,
        num_workers=2,
        ep_size=2,
        ckpt_every=2,
        log_every=1,
        eval_windows=8,
        max_failures=1,
    )
    extra = {"crash_at_step": 3, "crash_marker": str(marker), "crash_delay_s": 2.0}
    run_id = train_moe_hf.run(tc, experiment="test-hf-moe", extra=extra)
    assert marker.exists()
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "resumed_from_step")] == [2.0]
    assert {m.step for m in client.get_metric_history(run_id, "maxvio/layer_1")} == set(range(1, 6))
    m = run.data.metrics
    assert {"load/layer_0/expert_7", "avg_maxvio", "heldout_nll", "heldout_global_maxvio"} <= set(m)
    assert sum(m[f"load/layer_0/expert_{j}"] for j in range(8)) == 2 * 2 * 32 * 2  # workers x rows x len x K
    path = tracking.download(f"runs:/{run_id}/hf_model")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert (path / ROUTING_FILE).is_file()
    ids = AutoTokenizer.from_pretrained(path).encode("def f(x):", add_special_tokens=False)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([ids])).logits).all()
    import mlflow

    (logged,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'", output_format="list"
    )
    assert logged.name == "hf_mlflow_model"
    (text,) = mlflow.pyfunc.load_model(logged.model_uri).predict(["def f(x):"], params={"max_new_tokens": 4})
    assert isinstance(text, str) and text.startswith("def f(x):")


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    from transformers import AutoConfig

    AutoConfig.for_model("llama", hidden_size=32, num_attention_heads=2).save_pretrained(root / "llama")
    tiny_config("qwen3_moe", vocab_size=512).save_pretrained(root / "no_tokenizer")
    return root


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/x"], "model='/x': MoE fine-tuning takes an hf:<dir> address"),
        (["--model", "hf:{root}/missing"], "no config.json"),
        (["--model", "hf:{root}/llama"], "model_type='llama': MoE fine-tuning supports qwen3_moe, olmoe"),
        (["--model", "hf:{qwen}", "--workers", "3", "--ep-size", "3"], "ep_size=3: must divide the model's 8"),
        (["--model", "hf:{qwen}", "--n-layers", "4"], "--n-layers=4: does not apply to --model"),
        (["--model", "hf:{qwen}", "--seq-len", "9999"], "seq_len=9999: must be in [2, max_position_embeddings=512]"),
        (["--model", "hf:{root}/no_tokenizer"], "no tokenizer files and a vocabulary of 512 tokens"),
    ],
    ids=["not-hf", "missing", "dense-llama", "ep-size", "preset-flag", "seq-len", "no-tokenizer"],
)
def test_bad_input_is_one_line_and_exit_2(args, message, bad_dirs, qwen_dir, capsys):
    argv = [a.format(root=bad_dirs, qwen=qwen_dir) for a in args]
    before = tracking.runs_started()
    with pytest.raises(SystemExit) as e:
        cli.run(train_moe.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert tracking.runs_started() == before  # refused before any MLflow run (and before Ray)


@pytest.mark.slow
def test_resume_continues_a_finished_run_from_its_last_checkpoint(ray_local, mlflow_uri, qwen_dir):
    """--resume <run_id> (two fits, hence slow): the second run starts at the first one's last
    checkpoint (step 3) with its router state, and trains the remaining step only."""
    tc = HFMoETrainConfig(
        model=f"hf:{qwen_dir}", router=RouterConfig("loss_free"), steps=3, batch_size=2, seq_len=32, eval_windows=4
    )
    first = train_moe_hf.run(tc, experiment="test-hf-moe-resume")
    second = train_moe_hf.run(tc.replace(steps=4), experiment="test-hf-moe-resume", resume=first)
    client = MlflowClient(mlflow_uri)
    assert [m.value for m in client.get_metric_history(second, "resumed_from_step")] == [3.0]
    assert {m.step for m in client.get_metric_history(second, "train_loss")} == {4}  # log_every 5: the last step
    assert client.get_run(second).data.tags["resumed_from"] == first
