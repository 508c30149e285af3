"""Screenshots of the MLflow UI for a finished demo run, for docs/DEMO.md (headless Chromium).

    python -m pipelines.demo_screenshots [--run <demo parent run id>] [--out docs/img]

Starts `mlflow ui` on 127.0.0.1 against the store the demo wrote (MLFLOW_TRACKING_URI or the
repository's mlruns.db), opens the demo experiment's run list, MLflow's compare view of the stage
runs, the demo's parent run, its KVTuner child and the logged models, and writes one PNG per page. Needs a `chromium` binary
(Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from workers.runtime import cli, tracking

PORT = 5055


def _wait(url: str, seconds: float = 60.0) -> None:
    t = time.time()
    while time.time() - t < seconds:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow ui did not answer at {url} within {seconds:.0f} s")


def shoot(browser: str, url: str, out: Path, size: str = "2000,1100") -> None:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size}"]
    cmd += ["--virtual-time-budget=15000", f"--screenshot={out}", url]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def pages(client: MlflowClient, parent: str) -> dict[str, str]:
    """{file stem: UI fragment} for the demo's parent run and its children."""
    run = client.get_run(parent)
    exp = run.info.experiment_id
    kids = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    by = {k.data.tags.get("pipeline"): k.info.run_id for k in kids}
    # the run list folds the stages under the parent: MLflow's compare page shows them side by side
    ids = urllib.parse.quote(json.dumps([k.info.run_id for k in kids]))
    out = {
        "demo_runs": f"#/experiments/{exp}/runs",
        "demo_stages": f"#/compare-runs?runs={ids}&experiments={urllib.parse.quote(json.dumps([exp]))}",
        "demo_parent": f"#/experiments/{exp}/runs/{parent}",
    }
    if "kvtuner" in by:
        out["kvtuner_run"] = f"#/experiments/{exp}/runs/{by['kvtuner']}"
    if "train_moe" in by:
        out["models"] = f"#/experiments/{exp}/models"  # the trained model, logged as an MLflow (pyfunc) model
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo_screenshots", description=__doc__.split("\n")[0])
    p.add_argument("--run", default=None, help="the demo's parent run id (default: the newest demo run)")
    p.add_argument("--out", type=Path, default=tracking.REPO_ROOT / "docs" / "img", help="PNG directory")
    a = p.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        p.error("no chromium binary on PATH (Debian: apt-get install chromium)")
    uri = tracking.check_store()
    client = MlflowClient(uri)
    parent = a.run
    if parent is None:
        exp = client.get_experiment_by_name("demo")
        runs = (
            client.search_runs([exp.experiment_id], "tags.pipeline = 'demo'", order_by=["start_time DESC"])
            if exp
            else []
        )
        if not runs:
            p.error(f"no demo run in {uri}; run python -m pipelines.demo first")
        parent = runs[0].info.run_id
    a.out.mkdir(parents=True, exist_ok=True)
    mlflow_bin = str(Path(sys.executable).parent / "mlflow")
    ui = subprocess.Popen(
        [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{PORT}/"
        _wait(base)
        for stem, fragment in pages(client, parent).items():
            shoot(browser, base + fragment, a.out / f"{stem}.png")
            print(a.out / f"{stem}.png")
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
