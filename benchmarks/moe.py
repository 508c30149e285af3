"""MoE benchmarks: ratios measured in one run, logged to MLflow, printed as markdown.

1. Our MoE layer (workers.moe.MoEFFN: sort by expert + per-expert SwiGLU on CPU) against
   DeepSpeed's deepspeed.moe.layer.MoE with the same experts, gate and shapes, dropless top-2:
   tokens/s of forward + backward. First a cross-check: at top-1 (where DeepSpeed's gate,
   like ours, takes the raw softmax score as the weight) both layers give the same output.
2. The BIP router (q warm-started, T = 1, 2, 4, 8; causal T = 1; restart T = 4) against the
   plain top-K router at several (tokens, experts) shapes: the whole router call (gate matmul
   + scores + selection) and the selection alone; the minimum over alternating calls
   (sub-millisecond calls on a shared machine: the minimum is the signal).
3. The router's share of a real training step (the balancing sweep's small preset) for plain
   top-K and BIP arms.

    python -m benchmarks.moe --threads 1           # all three (a few minutes on 2 cores)
    python -m benchmarks.moe --tokens 4096 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from kernels._cpu import ENV as CPU_ENV
from kernels.bip_select import capacity
from kernels.bip_select import cpu as bip_cpu
from workers.data.corpus import load_corpus
from workers.model.config import MoEConfig, RouterConfig
from workers.model.moe.ffn import MoEFFN
from workers.model.moe.router import Router
from workers.model.transformer import CalibLM
from workers.moe.experiment import ARMS, ExperimentConfig, batch
from workers.runtime import tracking
from workers.training.loop import run_steps
from workers.training.optim import AdamWOptimizer


def bench_pair(
    a: Callable[[], object], b: Callable[[], object], repeats: int, stat: Callable = statistics.median
) -> tuple[float, float]:
    """`stat` (median; min for sub-millisecond calls) of the seconds of alternating calls, so a
    load change on a shared machine hits both sides alike."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t0)
    return stat(ta), stat(tb)


def _init_single_process_group() -> None:
    if dist.is_initialized():
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29591"))
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build at start-up
    deepspeed.init_distributed(dist_backend="gloo")


def deepspeed_peer(ours: MoEFFN, d_model: int, k: int):
    """deepspeed.moe.layer.MoE with our layer's gate and experts copied in (dropless top-k)."""
    from deepspeed.moe.layer import MoE

    from workers.model.layers import SwiGLU

    E, F = ours.cfg.n_experts, ours.cfg.expert_hidden
    peer = MoE(
        hidden_size=d_model,
        expert=SwiGLU(d_model, F),
        num_experts=E,
        ep_size=1,
        k=k,
        capacity_factor=1.0,
        eval_capacity_factor=1.0,
        min_capacity=0,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    with torch.no_grad():
        peer.deepspeed_moe.gate.wg.weight.copy_(ours.router.gate.weight)
        for e, expert in enumerate(peer.deepspeed_moe.experts.deepspeed_experts):
            expert.gate_proj.weight.copy_(ours.w_gate[e].T)
            expert.up_proj.weight.copy_(ours.w_up[e].T)
            expert.down_proj.weight.copy_(ours.w_down[e].T)
    return peer


def layer_benchmark(tokens: int, d_model: int, hidden: int, experts: int, repeats: int) -> dict[str, float]:
    _init_single_process_group()
    out: dict[str, float] = {}
    x = torch.randn(1, tokens, d_model)
    # cross-check at top-1: same output
    torch.manual_seed(0)
    ours1 = MoEFFN(d_model, MoEConfig(n_experts=experts, top_k=1, expert_hidden=hidden, shared_expert=False))
    peer1 = deepspeed_peer(ours1, d_model, 1)
    with torch.no_grad():
        y_ours, y_peer = ours1(x)[0], peer1(x)[0]
    out["crosscheck_top1_max_abs_diff"] = float((y_ours - y_peer).abs().max())
    out["crosscheck_top1_output_rms"] = float(y_ours.square().mean().sqrt())
    torch.manual_seed(0)
    ours = MoEFFN(d_model, MoEConfig(n_experts=experts, top_k=2, expert_hidden=hidden, shared_expert=False))
    peer = deepspeed_peer(ours, d_model, 2)

    def step(layer):
        def run():
            xg = x.clone().requires_grad_(True)
            layer(xg)[0].square().mean().backward()

        return run

    t_ours, t_peer = bench_pair(step(ours), step(peer), repeats)
    out.update(
        ours_tokens_per_s=tokens / t_ours,
        deepspeed_tokens_per_s=tokens / t_peer,
        ours_over_deepspeed_throughput=t_peer / t_ours,
    )
    return out


# the BIP routers timed against plain top-K: q carried (warm-started) at T = 1, 2, 4, 8, the
# causal router at T = 1 (its routing top-(K+1) also gives the first round's token prices),
# and the restart-each-batch router of the first release at T = 4
BIP_ROUTERS = {
    "bip_t1": RouterConfig(strategy="bip", bip_iters=1, bip_q_mode="carry"),
    "bip_t2": RouterConfig(strategy="bip", bip_iters=2, bip_q_mode="carry"),
    "bip_t4": RouterConfig(strategy="bip", bip_iters=4, bip_q_mode="carry"),
    "bip_t8": RouterConfig(strategy="bip", bip_iters=8, bip_q_mode="carry"),
    "bip_causal_t1": RouterConfig(strategy="bip", bip_iters=1, bip_mode="causal", bip_q_mode="carry"),
    "bip_restart_t4": RouterConfig(strategy="bip", bip_iters=4, bip_q_mode="restart"),
}


# the routers also timed on the PyTorch reference path (CALIBRAY_CPU_KERNELS=0), beside the
# fused CPU kernel (kernels.bip_select), in the same run
TORCH_COMPARED = ("bip_t1", "bip_t2", "bip_causal_t1")


@contextlib.contextmanager
def cpu_kernels(on: bool):
    """The compiled CPU kernels on or off (kernels._cpu reads the switch on every call)."""
    before = os.environ.get(CPU_ENV)
    os.environ[CPU_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CPU_ENV)
        else:
            os.environ[CPU_ENV] = before


def router_benchmark(tokens: int, experts: int, d_model: int, repeats: int) -> dict[str, float]:
    """Per BIP router: ms of the whole router call (gate matmul + scores + selection + gate
    weights + load) and of the selection alone (scores given), each against plain top-K
    (torch.topk) in alternating calls; the minimum over `repeats` calls per side. Every router
    runs the fused CPU kernel; those in TORCH_COMPARED also the PyTorch path (`<name>_torch`).
    `fused_topk`: the kernel with T = 0 (a plain top-K of s, no rounds), selection only."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d_model)  # [N, D]
    routers = {}
    for name, rc in {"topk": RouterConfig(strategy="none"), **BIP_ROUTERS}.items():
        torch.manual_seed(0)
        routers[name] = Router(d_model, MoEConfig(n_experts=experts, top_k=2, router=rc)).train()
    out: dict[str, float] = {}
    top = routers["topk"]

    def pair(key: str, a: Callable[[], object], b: Callable[[], object]) -> None:
        t_a, t_b = bench_pair(a, b, repeats, min)
        out[f"{key}_ms"], out[f"topk_ms_vs_{key}"], out[f"{key}_over_topk_time"] = 1e3 * t_a, 1e3 * t_b, t_a / t_b

    with torch.no_grad():
        s = top.scores(x)  # [N, E]; every router has the same gate
        zero, cap = torch.zeros(experts), capacity(tokens, experts, 2)
        pair("fused_topk_select", lambda: bip_cpu.bip_select(s, 2, 0, cap, zero, "pre"), lambda: top.select(s))
        for name in BIP_ROUTERS:
            r = routers[name]
            for i in range(3):  # warm-start q on other batches first, as in training
                r(torch.randn(tokens, d_model, generator=torch.Generator().manual_seed(i)))
            q = r.bip_price.clone()
            for key, on in [(name, True)] + [(f"{name}_torch", False)] * (name in TORCH_COMPARED):

                def whole(r=r, on=on, q=q):
                    r.bip_price.copy_(q)  # every call starts from the same carried q
                    with cpu_kernels(on):
                        return r(x)

                def select(r=r, on=on, q=q):
                    r.bip_price.copy_(q)
                    with cpu_kernels(on):
                        return r.select(s)

                pair(key, whole, lambda: top(x))
                pair(f"{key}_select", select, lambda: top.select(s))
    return out


def step_benchmark(arms: list[str], steps: int) -> dict[str, float]:
    """The router's share of a training step: the balancing sweep's small preset (4 layers,
    16 experts, top-2, 8 x 128 tokens), `steps` real optimizer steps per arm (the first one
    dropped); router time = scores + selection summed over the layers. An arm named
    `<arm>:torch` runs with the compiled CPU kernels off."""
    cfg = ExperimentConfig(steps=steps)
    tokens = load_corpus(cfg.corpus).tokens("train")
    out: dict[str, float] = {}
    for key in arms:
        arm, on = key.removesuffix(":torch"), not key.endswith(":torch")
        if arm not in ARMS:
            raise SystemExit(f"--step-arms: {arm!r} is not an arm of workers.moe.experiment.ARMS")
        torch.manual_seed(0)
        model = CalibLM(cfg.model_config(arm))
        opt = AdamWOptimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
        rows: list[tuple[float, float]] = []
        with cpu_kernels(on):
            run_steps(
                model,
                opt,
                cfg.schedule,
                lambda step: (batch(tokens, cfg, 0, step), None),
                hooks=[lambda r, rows=rows: rows.append((r.seconds, r.router_s))],
            )
        step_s = statistics.median(t for t, _ in rows[1:])
        router_s = statistics.median(t for _, t in rows[1:])
        key = key.replace(":", "_")  # a metric name
        out[f"{key}/step_ms"], out[f"{key}/router_ms"] = 1e3 * step_s, 1e3 * router_s
        out[f"{key}/router_share"] = router_s / step_s
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.moe", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per MoE-layer call")
    p.add_argument("--d-model", type=int, default=128, help="model width D")
    p.add_argument("--hidden", type=int, default=256, help="expert hidden width F")
    p.add_argument("--experts", type=int, default=8, help="experts E for the layer benchmark")
    p.add_argument("--router-tokens", default="1024,8192", help="comma-separated token counts (router)")
    p.add_argument("--router-experts", default="16,64", help="comma-separated expert counts (router)")
    p.add_argument("--router-d-model", default="128,1024", help="comma-separated gate input widths D (router)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per side (median)")
    p.add_argument("--router-repeats", type=int, default=30, help="timed router calls per side (min)")
    p.add_argument(
        "--step-arms",
        default="none,bip_pre_carry_t1,bip_pre_carry_t1:torch,bip_pre_carry_t2,bip_pre_carry_t2:torch,bip_pre_t4",
        help="sweep arms timed in a training step (`<arm>:torch`: with the compiled CPU kernels off)",
    )
    p.add_argument("--step-steps", type=int, default=8, help="optimizer steps per arm in the step benchmark")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--experiment", default="calibray-bench", help="MLflow experiment name")
    args = p.parse_args(argv)
    for name in ("tokens", "d_model", "hidden", "experts", "repeats", "router_repeats", "step_steps", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    torch.set_num_threads(args.threads)
    params = {k: v for k, v in vars(args).items() if k != "experiment"}
    with tracking.start_run("bench_moe", experiment=args.experiment, run_name="bench-moe", params=params) as run:
        layer = layer_benchmark(args.tokens, args.d_model, args.hidden, args.experts, args.repeats)
        tracking.log_metrics({f"layer/{k}": v for k, v in layer.items()})
        print(f"MLflow run {run.info.run_id}\n")
        print(f"## MoE layer, fwd+bwd, N={args.tokens} D={args.d_model} F={args.hidden} E={args.experts} top-2\n")
        print("| ours tok/s | DeepSpeed tok/s | ours / DeepSpeed | top-1 cross-check max abs diff (output rms) |")
        print("|---|---|---|---|")
        print(
            f"| {layer['ours_tokens_per_s']:.0f} | {layer['deepspeed_tokens_per_s']:.0f} | "
            f"{layer['ours_over_deepspeed_throughput']:.2f}x | {layer['crosscheck_top1_max_abs_diff']:.2e}"
            f" ({layer['crosscheck_top1_output_rms']:.2e}) |"
        )
        widths = [int(t) for t in args.router_d_model.split(",")]
        print("\n## Router time per call, top-2, BIP q warm-started (min over alternating calls)\n")
        print("Cells: BIP / plain top-K (torch.topk) time ratio, whole router (gate matmul + scores + selection +")
        print("gate weights + load) then selection alone (scores given); each against its own alternating top-K")
        print("partner. `<router>` = fused CPU kernel, `<router> torch` = PyTorch path in the same run;")
        print("`fused top-K` = the kernel at T = 0 (plain top-K of s), selection only.\n")
        cols = [c for name in BIP_ROUTERS for c in (name, f"{name}_torch") if c in name or name in TORCH_COMPARED]
        print(
            "| D | tokens | experts | top-K whole ms | top-K selection ms | fused top-K | "
            + " | ".join(c.replace("_torch", " torch") for c in cols)
            + " |"
        )
        print("|---" * (6 + len(cols)) + "|")
        for d in widths:
            for n in [int(t) for t in args.router_tokens.split(",")]:
                for e in [int(t) for t in args.router_experts.split(",")]:
                    r = router_benchmark(n, e, d, args.router_repeats)
                    tracking.log_metrics({f"router/d{d}_n{n}_e{e}/{k}": v for k, v in r.items()})
                    cells = [f"{r[f'{c}_over_topk_time']:.2f}x / {r[f'{c}_select_over_topk_time']:.2f}x" for c in cols]
                    top_whole = statistics.median(r[f"topk_ms_vs_{c}"] for c in cols)
                    top_sel = statistics.median(r[f"topk_ms_vs_{c}_select"] for c in cols)
                    print(
                        f"| {d} | {n} | {e} | {top_whole:.3f} | {top_sel:.3f} | "
                        f"{r['fused_topk_select_over_topk_time']:.2f}x | " + " | ".join(cells) + " |"
                    )
        arms = [a.strip() for a in args.step_arms.split(",") if a.strip()]
        st = step_benchmark(arms, args.step_steps)
        tracking.log_metrics({f"step/{k}": v for k, v in st.items()})
        print(f"\n## Router share of a training step (small sweep preset, median of {args.step_steps - 1} steps)\n")
        print("| arm | step ms | router ms (4 layers) | router share |")
        print("|---|---|---|---|")
        for arm in arms:
            m = arm.replace(":", "_")
            print(f"| {arm} | {st[f'{m}/step_ms']:.1f} | {st[f'{m}/router_ms']:.2f} | {st[f'{m}/router_share']:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
