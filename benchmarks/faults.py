"""Bad-input audit: every CLI run with each bad input in a subprocess, outcome recorded (issue 17 item 3).

    python -m benchmarks.faults                       # all cases; table on stdout
    python -m benchmarks.faults --write docs/RELIABILITY.md   # and into the doc, between its markers
    python -m benchmarks.faults --only kvtuner/binary-corpus prefixkv/context-96

A case is clean when the CLI exits 2 within its time limit, prints exactly one
``<prog>: error: ...`` line on stderr naming the bad value or file, no traceback, and neither
Ray nor MLflow started (no store file, no "Started a local Ray instance"). Anything else is
listed with what happened. The fixtures are real: a random tiny CalibLM checkpoint and a random
byte-vocabulary Llama saved with save_pretrained, damaged copies of them, corpora that are not
text, and SQLite stores that cannot be written (as root, those cases run as uid 65534 through
setpriv, since root writes through file modes). tests/e2e/test_faults.py runs every case (slow)
and a few representative ones in CI.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
TIMEOUT_S = 150.0  # a case past this was not refused up front (pipelines on the tiny fixtures finish sooner)

# Small settings per CLI: a bad input that is missed runs the real pipeline, which then ends quickly.
# PrefixKV: 0.05 of 100 tokens over the tiny 4 layers keeps 20, just the sinks and last tokens.
KV = ("--calib-n", "2", "--valid-n", "2", "--report-n", "2", "--num-samples", "2", "--population", "2")
KV += ("--actors", "1", "--cpus-per-actor", "0.5", "--length", "32", "--continuation", "8", "--clusters", "1")
KV += ("--budget", "4.0", "--baselines", "K8V8", "--no-fidelity2")
PK = ("--samples", "2", "--workers", "1", "--context", "100", "--continuation", "16", "--eval-samples", "0")
PK += ("--cpus-per-worker", "0.5", "--bootstrap", "2")
IC = ("--retention", "0.5", "--workers", "1", "--worker-cpus", "0.5", "--calib-windows", "2")
IC += ("--heldout-windows", "2", "--seq-len", "32", "--no-overlap")
TM = ("--preset", "tiny", "--steps", "2", "--workers", "1", "--cpus-per-worker", "0.5")


@dataclass(frozen=True)
class Case:
    """One bad input for one CLI. Strings in `args`, `env` and `names` may hold {fixture} names."""

    cli: str  # module run with python -m
    bad: str  # what is wrong, for the table
    args: tuple[str, ...]
    names: str  # the message must contain this (the bad value or file)
    env: dict[str, str] = field(default_factory=dict)
    as_nobody: bool = False  # root writes through file modes: run as uid 65534

    @property
    def id(self) -> str:
        return f"{self.cli.removeprefix('pipelines.')}/{self.bad.split(':')[0]}"


def _model_cases(cli: str, extra: tuple[str, ...], hf_ok: bool = True) -> list[Case]:
    """The model, tokenizer and corpus inputs every model-calibrating CLI takes."""
    c = lambda bad, args, names, **kw: Case(cli, bad, (*args, *extra), names, **kw)
    out = [
        c("missing-model: no such directory", ("--model", "{tmp}/no/such/model"), "{tmp}/no/such/model"),
        c(
            "corrupt-config: CalibLM config.json not JSON",
            ("--model", "{calib_badjson}"),
            "{calib_badjson}/config.json",
        ),
        c("truncated-weights: CalibLM safetensors cut in half", ("--model", "{calib_trunc}"), "model.safetensors"),
        c("missing-weights: CalibLM without safetensors", ("--model", "{calib_noweights}"), "{calib_noweights}"),
        c("binary-corpus: corpus not UTF-8", ("--model", "{calib}", "--corpus", "{binary}"), "{binary}"),
        c("empty-corpus: corpus of 0 bytes", ("--model", "{calib}", "--corpus", "{empty}"), "{empty}"),
        c("missing-corpus: no such corpus file", ("--model", "{calib}", "--corpus", "{tmp}/none.txt"), "none.txt"),
        c("corpus-suffix: .csv corpus", ("--model", "{calib}", "--corpus", "{csv}"), "{csv}"),
        c("corrupt-jsonl: jsonl line not JSON", ("--model", "{calib}", "--corpus", "{badjsonl}"), "{badjsonl}"),
    ]
    if hf_ok:
        out += [
            c("hf-corrupt-config: HF config.json not JSON", ("--model", "hf:{hf_badjson}"), "{hf_badjson}/config.json"),
            c("hf-truncated-weights: HF safetensors cut in half", ("--model", "hf:{hf_trunc}"), "model.safetensors"),
            c("hf-missing-weights: HF dir without weights", ("--model", "hf:{hf_noweights}"), "{hf_noweights}"),
            c("hf-corrupt-tokenizer: tokenizer.json not JSON", ("--model", "hf:{hf_badtok}"), "tokenizer.json"),
        ]
    return out


def _store_cases(cli: str, args: tuple[str, ...]) -> list[Case]:
    """MLflow stores that cannot be written: each must fail in seconds, naming the path."""
    return [
        Case(cli, "readonly-store: SQLite file mode 0444", args, "{ro_db}", {"MLFLOW_TRACKING_URI": "sqlite:///{ro_db}"}, True),
        Case(
            cli,
            "unwritable-store-dir: SQLite in a 0555 directory",
            args,
            "{ro_dir}",
            {"MLFLOW_TRACKING_URI": "sqlite:///{ro_dir}/m.db"},
            True,
        ),
        Case(cli, "missing-store-dir: SQLite in no directory", args, "{tmp}/no/dir", {"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/no/dir/m.db"}),
        Case(cli, "file-store: file: URI", args, "file:", {"MLFLOW_TRACKING_URI": "file:{tmp}/mlruns"}),
    ]  # fmt: skip


def cases() -> list[Case]:
    kv, pk, ic, tm = "pipelines.kvtuner", "pipelines.prefixkv", "pipelines.indexcache", "pipelines.train_moe"
    out = _model_cases(kv, (*KV, "--work-dir", "{case}/work"))
    out += [
        Case(kv, "budget: --budget 1.0", ("--model", "{calib}", *KV, "--budget", "1.0"), "1.0"),
        Case(kv, "group: --group 0", ("--model", "{calib}", *KV, "--group", "0"), "group"),
        Case(kv, "work-dir-is-file: --work-dir names a file", ("--model", "{calib}", *KV, "--work-dir", "{binary}"), "{binary}"),
    ]  # fmt: skip
    out += _store_cases(kv, ("--model", "{calib}", *KV, "--work-dir", "{case}/work"))
    out += _model_cases(pk, PK)
    out += [
        Case(pk, "context-96: --context 96 (rounding of per-layer budgets)", ("--model", "{calib}", *PK, "--context", "96"), "--context"),
        Case(pk, "samples: --samples 0", ("--model", "{calib}", *PK, "--samples", "0"), "--samples"),
        Case(pk, "eval-ratios: --eval-ratios 1.5", ("--model", "{calib}", *PK, "--eval-ratios", "1.5"), "1.5"),
        Case(pk, "scores: --scores bogus", ("--model", "{calib}", *PK, "--scores", "bogus"), "--scores"),
        Case(pk, "resume: --resume of no run", ("--model", "{calib}", *PK, "--resume", "0123456789abcdef"), "0123456789abcdef"),
    ]  # fmt: skip
    out += _store_cases(pk, ("--model", "{calib}", *PK))
    out += _model_cases(ic, IC, hf_ok=False)
    out += [
        Case(ic, "not-dsa: a Llama (no indexer)", ("--model", "hf:{llama}", *IC), "{llama}"),
        Case(ic, "retention: --retention 2", ("--model", "{calib}", *IC, "--retention", "2"), "2"),
        Case(ic, "resume: --resume of no run", ("--resume", "0123456789abcdef"), "0123456789abcdef"),
    ]  # fmt: skip
    out += _store_cases(ic, ("--model", "{calib}", *IC))
    out += [
        Case(tm, "binary-corpus: corpus not UTF-8", (*TM, "--corpus", "{binary}"), "{binary}"),
        Case(tm, "missing-corpus: no such corpus file", (*TM, "--corpus", "{tmp}/none.txt"), "none.txt"),
        Case(tm, "steps: --steps 0", (*TM, "--steps", "0"), "steps"),
        Case(tm, "resume: --resume of no run", (*TM, "--resume", "0123456789abcdef"), "0123456789abcdef"),
    ]
    out += _store_cases(tm, TM)
    ms = ("--preset", "tiny", "--arms", "none", "--seeds", "0", "--steps", "2", "--cpus-per-trial", "0.5")
    out += [
        Case("pipelines.moe_sweep", "arms: --arms bogus", (*ms, "--arms", "bogus"), "bogus"),
        Case("pipelines.moe_sweep", "seeds: --seeds x", (*ms, "--seeds", "x"), "x"),
    ]
    out += _store_cases("pipelines.moe_sweep", ms)[:1]
    ex = "pipelines.indexcache_export"
    out += [
        Case(ex, "missing-model: no such directory", ("--model", "hf:{tmp}/none", "--pattern", "FS", "--out", "{tmp}/x"), "{tmp}/none"),
        Case(ex, "corrupt-config: config.json not JSON", ("--model", "hf:{hf_badjson}", "--pattern", "FS", "--out", "{tmp}/x"), "config.json"),
        Case(ex, "pattern: a pattern that is not F/S", ("--model", "hf:{glm}", "--pattern", "FX", "--out", "{tmp}/x"), "FX"),
        Case(ex, "not-glm: a Llama checkpoint", ("--model", "hf:{llama}", "--pattern", "FS", "--out", "{tmp}/x"), "llama"),
    ]  # fmt: skip
    out += [
        Case("pipelines.report", "per-pipeline: --per-pipeline 0", ("--per-pipeline", "0"), "--per-pipeline"),
        Case("pipelines.report", "out-dir: --out in no directory", ("--out", "{tmp}/no/dir/R.md"), "{tmp}/no/dir"),
        Case("pipelines.demo", "readonly-store: SQLite file mode 0444", ("--preset", "smoke"), "{ro_db}",
             {"MLFLOW_TRACKING_URI": "sqlite:///{ro_db}"}, True),
        Case("benchmarks.reference_nll", "run: a run id that is not in the store", ("0123456789abcdef",), "0123456789abcdef"),
        Case("benchmarks.indexcache", "missing-model: no such directory", ("--model", "{tmp}/none"), "{tmp}/none"),
        Case("benchmarks.serve_load", "missing-model: no such directory", ("--model", "{tmp}/none"), "{tmp}/none"),
        Case("benchmarks.kvtuner_shared_prefill", "missing-model: no such directory", ("--model", "{tmp}/none"), "{tmp}/none"),
    ]  # fmt: skip
    return out


def build_fixtures(root: Path) -> dict[str, str]:
    """The files the cases name, under `root` (made once; a second call reuses them)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from workers.model import checkpoint
    from workers.model.presets import tiny
    from workers.model.transformer import CalibLM

    root.mkdir(parents=True, exist_ok=True)
    fx = {k: str(root / k) for k in ("calib", "llama", "ro_dir")}
    fx["tmp"] = str(root)
    if not (root / "calib" / checkpoint.WEIGHTS_FILE).is_file():
        torch.manual_seed(0)
        checkpoint.save(CalibLM(tiny()), root / "calib")
    if not (root / "llama" / "model.safetensors").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128,
        )  # fmt: skip
        LlamaForCausalLM(cfg).save_pretrained(root / "llama")

    if not (root / "glm" / "config.json").is_file():  # the export reads only the config
        from transformers import GlmMoeDsaConfig

        GlmMoeDsaConfig(num_hidden_layers=2).save_pretrained(root / "glm")
    fx["glm"] = str(root / "glm")

    def damaged(name: str, src: str, fn) -> None:
        d = root / name
        if not d.is_dir():
            shutil.copytree(root / src, d)
            fn(d)
        fx[name] = str(d)

    halve = lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    damaged("calib_badjson", "calib", lambda d: (d / "config.json").write_text("{not json"))
    damaged("calib_trunc", "calib", lambda d: halve(d / checkpoint.WEIGHTS_FILE))
    damaged("calib_noweights", "calib", lambda d: (d / checkpoint.WEIGHTS_FILE).unlink())
    damaged("hf_badjson", "llama", lambda d: (d / "config.json").write_text("{not json"))
    damaged("hf_trunc", "llama", lambda d: halve(d / "model.safetensors"))
    damaged("hf_noweights", "llama", lambda d: (d / "model.safetensors").unlink())
    damaged("hf_badtok", "llama", lambda d: (d / "tokenizer.json").write_text("{not json"))
    for name, data in {
        "binary.txt": b"text \xff\xfe more bytes " * 64,
        "empty.txt": b"",
        "corpus.csv": b"text\nsome,words\n",
        "bad.jsonl": b'{"text": "fine"}\nnot json\n',
    }.items():
        (root / name).write_bytes(data)
    fx.update(binary=str(root / "binary.txt"), empty=str(root / "empty.txt"), csv=str(root / "corpus.csv"))
    fx["badjsonl"] = str(root / "bad.jsonl")
    # A store that exists but cannot be written, and a directory a new store cannot be made in.
    (root / "ro_file").mkdir(exist_ok=True)
    (root / "ro_file").chmod(0o777)  # the directory takes files: only the database is read-only
    ro_db = root / "ro_file" / "m.db"
    if not ro_db.is_file():
        import sqlite3

        sqlite3.connect(ro_db).execute("create table t (x)").connection.close()
    ro_db.chmod(0o444)
    (root / "ro_dir").mkdir(exist_ok=True)
    (root / "ro_dir").chmod(0o555)
    fx["ro_db"] = str(ro_db)
    for d in (root, *[p for p in root.iterdir() if p.is_dir()]):  # uid 65534 reads the fixtures
        d.chmod(d.stat().st_mode | 0o755)
        for f in d.iterdir():
            if f.is_file() and f != ro_db:
                f.chmod(0o644)  # safetensors writes 0600
    return fx


@dataclass
class Outcome:
    case: Case
    returncode: int | None  # None: timed out
    seconds: float
    traceback: bool
    one_line: bool
    named: bool
    started: list[str]  # "Ray", "MLflow" where they started
    message: str  # the error line (or the last stderr line)

    @property
    def clean(self) -> bool:
        return self.returncode == 2 and not self.traceback and self.one_line and self.named and not self.started

    def verdict(self) -> str:
        if self.clean:
            return "clear error"
        if self.returncode is None:
            return f"no error within {TIMEOUT_S:.0f} s"
        what = [f"exit {self.returncode}"]
        what += ["traceback"] * self.traceback + ["value not named"] * (not self.named)
        what += ["not one line"] * (not self.one_line) + [f"{s} started" for s in self.started]
        return ", ".join(what)


def _reap(case_dir: Path) -> None:
    """Kill what a case left running (Ray's daemons outlive a driver killed on timeout): exactly the
    processes whose working directory is that case's own directory."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and Path(proc.cwd()) == case_dir:
                proc.kill()
        except (psutil.Error, OSError):
            continue


def run_case(case: Case, fx: dict[str, str], timeout: float = TIMEOUT_S) -> Outcome:
    case_dir = Path(fx["tmp"]) / "runs" / re.sub(r"\W", "_", case.id)
    fmt = lambda s: s.format(**fx, case=case_dir)
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    case_dir.chmod(0o777)
    store = case_dir / "m.db"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CALIBRAY_DEBUG")}
    env.update(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{store}", RAY_DEDUP_LOGS="0")
    env.update({k: fmt(v) for k, v in case.env.items()})
    cmd = [sys.executable, "-m", case.cli, *map(fmt, case.args)]
    if case.as_nobody and os.geteuid() == 0:
        env["HOME"] = str(case_dir)  # caches (triton, torch) of a user without a home
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=case_dir, env=env, capture_output=True, text=True, timeout=timeout)
        rc, err, out = p.returncode, p.stderr, p.stdout
    except subprocess.TimeoutExpired as e:
        rc, err = None, (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    seconds = time.monotonic() - t0
    _reap(case_dir)
    prog = case.cli.split(".")[-1]
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    started = ["Ray"] * ("Started a local Ray instance" in err + out) + ["MLflow"] * store.exists()
    lines = [line for line in err.splitlines() if line.strip()]
    message = errors[0] if errors else (lines[-1] if lines else "")
    return Outcome(
        case, rc, seconds, "Traceback (most recent call last)" in err, len(errors) == 1,
        fmt(case.names) in message, started, message,
    )  # fmt: skip


def table(outcomes: list[Outcome]) -> str:
    clean = sum(o.clean for o in outcomes)
    rows = ["| CLI | bad input | outcome | s | message |", "| --- | --- | --- | --- | --- |"]
    for o in outcomes:
        msg = o.message.replace("|", "\\|")
        msg = re.sub(r"/tmp/\S*?calibray-faults[^/]*", "<tmp>", msg).replace(str(REPO), "<repo>")[:220]
        rows.append(f"| `{o.case.cli}` | {o.case.bad} | {o.verdict()} | {o.seconds:.0f} | {msg} |")
    return f"{clean} of {len(outcomes)} bad inputs give a clear error.\n\n" + "\n".join(rows) + "\n"


BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


def write_into(doc: Path, text: str) -> None:
    """Replace what stands between the doc's markers with `text`."""
    body = doc.read_text()
    i, j = body.index(BEGIN) + len(BEGIN), body.index(END)
    doc.write_text(body[:i] + "\n" + text + body[j:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=None, help="case ids (cli/bad-input) to run; default all")
    p.add_argument("--list", action="store_true", help="print the case ids and exit")
    p.add_argument("--fixtures", default=None, help="directory for the fixtures (default: a new temporary one)")
    p.add_argument("--write", default=None, help="a markdown file with faults:begin/end markers to update")
    a = p.parse_args(argv)
    todo = cases()
    if a.list:
        print("\n".join(c.id for c in todo))
        return 0
    if a.only:
        unknown = set(a.only) - {c.id for c in todo}
        if unknown:
            p.error(f"--only: unknown case ids {sorted(unknown)} (see --list)")
        todo = [c for c in todo if c.id in a.only]
    import tempfile

    fx = build_fixtures(Path(a.fixtures or tempfile.mkdtemp(prefix="calibray-faults-")))
    outcomes = []
    for c in todo:
        o = run_case(c, fx)
        print(f"{c.id:48s} {o.verdict():40s} {o.seconds:5.0f} s  {o.message[:120]}", file=sys.stderr, flush=True)
        outcomes.append(o)
    text = table(outcomes)
    print(text)
    if a.write:
        write_into(Path(a.write), text)
    return 0 if all(o.clean for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
