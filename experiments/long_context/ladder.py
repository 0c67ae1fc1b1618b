"""The long-context ladder for Llama3-8B: what each technique adds to the longest trainable sequence.

    python -m experiments.long_context.ladder                 # CPU: full-size planner + scaled measurements
    python -m experiments.long_context.ladder --quick         # smoke: vanilla, AC, MsT measured at d = 64, no full size
    python -m experiments.long_context.ladder --device cuda   # full-size measurements on this GPU

Rungs, each adding one thing to the one before: vanilla, AC, MsT, + checkpoint offload, + whole-layer mini-sequences
(``norms=True``), + model state on the host (DeepSpeed ZeRO-3 offload_param + offload_optimizer), + mini-sequence
attention, + Ulysses x 8. Part 1, full size (planner, bf16, batch 1): each rung's limit on 1 x 80 GB and 1 x 141 GB
(the Ulysses rung on 8 x 80 GB), the host RAM it needs, a step-time estimate (``mst.memory.planner.cost``), and
what stops it (the largest tensor at the peak), beside DeepSpeed ALST's published limits. Part 2, CPU: each rung
that keeps the model state on the device measured by a real length search on the scaled Llama3 (d = ``--hidden``)
under Table 2's emulated 80 GB budget (``experiments.budget``, lengths scaled by k = d_s / d), next to the planner
for that same scaled setting.
On a CPU host and device are one memory, so the host-state rungs are planner-only there; ``--device cuda``
measures the device-state rungs at full size (running out of memory decides).
Results: ``results/ladder_<device>.json`` / ``.md`` (rewritten atomically after every search),
``paper_figures/long_context_ladder.png``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from mst.configs import load_config
from mst.memory.planner import DEFAULT_RESERVE_GB, max_seq_len, plan, step_cost
from mst.memory.strategies import make_train_step, prepare

from ..budget import GiB, emulated_free_bytes
from ..cli import add_figures_arg, positive_int, require_device
from ..models import build_model, model_config
from ..results import environment, figure_path, write_results
from ..search import search_length

MODEL = "llama3-8b"
# DeepSpeed ALST (arXiv 2506.13996; recipes in snowflakedb/ArcticTraining projects/sequence-parallelism/), Llama-3.1-8B
ALST = {"1x80": (500_000, "ALST, 1 x H100 80 GB, run-h100-sp1-llama-8b.yml"),
        "1x141": (1_200_000, "ALST, 1 x H200, run-h200-sp1-llama-8b-liger-offload-tiled-mlp.yml"),
        "8x80": (3_700_000, "ALST, 8 x H100, run-h100-sp8-llama-8b*.yml")}
SETTINGS = {"1x80": (80.0, 1), "1x141": (141.0, 1), "8x80": (80.0, 8)}  # GiB per GPU, GPUs (Ulysses ranks)


@dataclass(frozen=True)
class Rung:
    name: str
    strategy: str
    options: dict = field(default_factory=dict)  # mst.apply options beyond the strategy's
    model_state: str = "device"
    settings: tuple[str, ...] = ("1x80", "1x141")

    @property
    def optimizer(self) -> str:
        """The best optimizer each placement has: AdamW in backward on the device, DeepSpeedCPUAdam on the host."""
        return "adamw" if self.model_state == "host" else "adamw_in_backward"


WHOLE_LAYER, ATTENTION = {"norms": True}, {"norms": True, "attention": True}
RUNGS = (
    Rung("vanilla", "vanilla"),
    Rung("AC", "ac"),
    Rung("MsT", "mst"),
    Rung("+ checkpoint offload", "mst_offload"),
    Rung("+ whole-layer mini-sequences", "mst_offload", WHOLE_LAYER),
    Rung("+ model state on host", "mst_offload", WHOLE_LAYER, "host"),
    Rung("+ mini-sequence attention", "mst_offload", ATTENTION, "host"),
    Rung("+ Ulysses x 8", "mst_offload", ATTENTION, "host", ("8x80",)),
)


def full_size(rung: Rung, setting: str, granularity: int) -> dict:
    """The planner's limit of ``rung`` at full size on ``setting``, and what the step at that length costs."""
    gpu_mem_gb, sp = SETTINGS[setting]
    kwargs = dict(sp_size=sp, gpu_mem_gb=gpu_mem_gb, optimizer=rung.optimizer, model_state=rung.model_state,
                  engine="traced" if rung.options else "analytic", mst_options=rung.options or None)
    config = load_config(MODEL)
    limit = max_seq_len(config, rung.strategy, granularity=granularity, **kwargs)
    p = plan(config, limit, rung.strategy, **kwargs)
    cost = step_cost(config, limit, rung.strategy, sp_size=sp, model_state=rung.model_state,
                     attention=bool(rung.options.get("attention")))
    top = p.peak_tensors[0] if p.peak_tensors else None
    return {"max_seq_len": int(limit), "capped": limit.capped, "peak_gib": p.peak_gib, "phase": p.phase,
            "breakdown": p.breakdown, "host_gib_per_rank": p.host_bytes / GiB, "host_gib_node": sp * p.host_bytes / GiB,
            "largest_at_peak": top and {**top, "kb_per_token": top["bytes"] / (limit // sp) / 1e3},
            "step_cost": cost.to_dict()}


def scaled(rung: Rung, args, on_trial) -> dict:
    """``rung`` measured on CPU at the scaled size under the emulated 80 GB budget, and the planner for exactly that
    setting (the search's seed)."""
    device = torch.device(args.device)
    full = load_config(MODEL)
    small = model_config(MODEL, device, args.hidden, args.layers)
    k = small.hidden_size / full.hidden_size  # per-token bytes scale by k; lengths by t = k (Table 2's rule)
    free = emulated_free_bytes(full, rung.strategy, scale=k * k, dtype=args.dtype, gpu_mem_gb=80.0,
                               optimizer=rung.optimizer)

    def seed_for_budget(budget: int) -> int:
        return max_seq_len(small, rung.strategy, gpu_mem_gb=budget / GiB, reserve_gb=0.0, device="cpu",
                           granularity=16, optimizer=rung.optimizer, dtype=args.dtype,
                           engine="traced" if rung.options else "analytic", mst_options=rung.options or None)

    found = search_length(lambda: prepare(build_model(small, device=device, dtype=args.dtype), rung.strategy,
                                          **rung.options),
                          lambda model: make_train_step(model, optimizer=rung.optimizer), device=device,
                          free_bytes=free, seed_for_budget=seed_for_budget, on_trial=on_trial)
    measured, planned = found["max_seq_len"], found["seed"]
    return {"hidden": small.hidden_size, "layers": small.num_hidden_layers, "measured": measured, "planner": planned,
            "error_pct": 100 * (planned - measured) / measured if measured and planned else None, "search": found}


def measured_full(rung: Rung, args, on_trial) -> dict:
    """``rung`` at full size on this GPU: the device decides (seeded by the planner's 80 GB limit)."""
    device = torch.device(args.device)
    config = model_config(MODEL, device)
    found = search_length(lambda: prepare(build_model(config, device=device, dtype=args.dtype), rung.strategy,
                                          **rung.options),
                          lambda model: make_train_step(model, optimizer=rung.optimizer), device=device,
                          expect=None, on_trial=on_trial)
    return {"measured": found["max_seq_len"], "search": found}


def run(args, save) -> dict:
    """Every rung: the full-size planner (unless ``--quick``), then the measurement where one is possible."""
    rungs = [r for r in RUNGS if r.name in args.rungs]
    result = {"experiment": "long_context ladder", "model": MODEL, "environment": environment(args.device),
              "dtype_measured": str(args.dtype).replace("torch.", ""), "alst": ALST,
              "targets": {k: 2 * v[0] for k, v in ALST.items()}, "complete": False, "rungs": []}
    with tqdm(total=len(rungs), desc="ladder", unit="rung") as bar:
        for rung in rungs:
            row = {"rung": rung.name, "strategy": rung.strategy, "options": rung.options,
                   "model_state": rung.model_state, "optimizer": rung.optimizer, "full": {}}
            result["rungs"].append(row)
            if not args.quick:
                for setting in rung.settings:
                    bar.set_postfix_str(f"{rung.name}: planner {setting}")
                    row["full"][setting] = full_size(rung, setting, args.granularity)
                    save(result)
            if rung.model_state == "device" and "8x80" not in rung.settings:

                def on_trial(trial, name=rung.name):
                    bar.set_postfix_str(f"{name}: S={trial.seq_len} {'fits' if trial.fits else 'no'}")

                row["measured"] = (scaled if args.device == "cpu" else measured_full)(rung, args, on_trial)
            else:
                row["measured"] = {"skipped": "host and device are one memory on a CPU" if args.device == "cpu"
                                   else "needs the DeepSpeed launcher (tests/distributed/zero3_worker.py)"}
            save(result)
            bar.update(1)
    result["complete"] = True
    save(result)
    return result


def _m(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def markdown(result: dict) -> str:
    """The README tables: full-size limits beside ALST and the 2x targets, then the scaled measurements."""
    env = result["environment"]
    lines = [f"# Long-context ladder, {result['model']} (planner at full size, bf16; measured on {env['device']})", ""]
    if not result.get("complete", True):
        lines += ["**incomplete**: the run stopped or is still running; finished rungs only", ""]
    head = "| rung | 1 x 80 GB | 1 x 141 GB | 8 x 80 GB | host RAM per node | step time (est.) | what stops it |"
    lines += [head, "|---" * 7 + "|"]
    for row in result["rungs"]:
        full = row["full"]
        if not full:
            continue
        main = full.get("1x80") or full.get("8x80")
        top = main["largest_at_peak"]
        stop = (f"{main['phase']}: {top['op']} {top['dtype']} {top['kb_per_token']:.1f} KB/token" if top
                else main["phase"])
        cells = " | ".join(_m(full[s]["max_seq_len"]) if s in full else "" for s in SETTINGS)
        lines.append(f"| {row['rung']} | {cells} | {main['host_gib_node']:.0f} GiB | "
                     f"{main['step_cost']['step_s'] / 60:.1f} min | {stop} |")
    if any(row["full"] for row in result["rungs"]):
        alst = " | ".join(_m(v[0]) for v in result["alst"].values())
        target = " | ".join(_m(v) for v in result["targets"].values())
        lines += [f"| DeepSpeed ALST (published) | {alst} | | | |", f"| target (2 x ALST) | {target} | | | |", "",
                  "Host RAM and step time are at the 1 x 80 GB limit (the Ulysses rung: 8 x 80 GB, the node's 8 "
                  "ranks together); step time from FLOPs at 400 TFLOP/s and a 25 GB/s host link, both assumed "
                  "(`python -m mst plan --tflops --host-gbps`). ALST sources: "
                  + "; ".join(v[1] for v in result["alst"].values()) + "."]
    measured = [row for row in result["rungs"] if "measured" in row.get("measured", {})]
    if measured:
        cpu = env["device_type"] == "cpu"
        lines += ["", "| rung | measured | planner, same setting | error % |" if cpu else "| rung | measured (GPU) |",
                  "|---|---|---|---|" if cpu else "|---|---|"]
        for row in measured:
            m = row["measured"]
            if cpu:
                err = "—" if m["error_pct"] is None else f"{m['error_pct']:+.1f}"
                lines.append(f"| {row['rung']} (d={m['hidden']}, L={m['layers']}) | {m['measured']} tok | "
                             f"{m['planner']} tok | {err} |")
            else:
                lines.append(f"| {row['rung']} | {_m(m['measured'])} |")
    skipped = sorted({row["measured"]["skipped"] for row in result["rungs"] if "skipped" in row.get("measured", {})})
    if skipped:
        lines += ["", "Not measured here: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Full-size limits per rung (log scale) with ALST's published numbers and the targets as lines."""
    import matplotlib.pyplot as plt

    from ..results import save_figure

    rows = [row for row in result["rungs"] if row["full"]]
    fig, ax = plt.subplots(figsize=(9, 4))
    if rows:
        width = 0.27
        for i, setting in enumerate(SETTINGS):
            xs = [j + (i - 1) * width for j in range(len(rows))]
            ax.bar(xs, [row["full"].get(setting, {}).get("max_seq_len", 0) for row in rows], width,
                   label=f"planner, {setting.replace('x', ' x ')} GB")
        for (setting, (tokens, _)), style in zip(result["alst"].items(), (":", "--", "-.")):
            ax.axhline(tokens, color="gray", linestyle=style, linewidth=1, label=f"ALST {setting.replace('x', ' x ')}")
        ax.set_xticks(range(len(rows)), [row["rung"] for row in rows], rotation=25, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("max sequence length (tokens)")
        ax.legend(fontsize=7)
    save_figure(fig, path, title=f"{result['model']}: long-context ladder (planner, full size)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--hidden", type=positive_int, default=None,
                   help="hidden size of the scaled CPU model (default 128; 64 with --quick)")
    p.add_argument("--layers", type=positive_int, default=None, help="layer count of the scaled model (default 32)")
    p.add_argument("--granularity", type=positive_int, default=4096, help="full-size search step in tokens")
    p.add_argument("--rungs", nargs="+", default=[r.name for r in RUNGS], metavar="RUNG",
                   help="a subset of the rung names (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: vanilla / AC / MsT measured at d = 64, no full size")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    add_figures_arg(p)
    args = p.parse_args(argv)
    unknown = set(args.rungs) - {r.name for r in RUNGS}
    if unknown:
        p.error(f"unknown rungs {sorted(unknown)}; choose from {[r.name for r in RUNGS]}")
    if args.quick:
        args.rungs = [r for r in args.rungs if r in ("vanilla", "AC", "MsT")]
    args.hidden = args.hidden or (64 if args.quick else 128)
    require_device(args.device)
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    stem = Path(args.out) / f"ladder{'_quick' if args.quick else ''}_{args.device}"
    result = run(args, lambda partial: write_results(stem, partial, markdown(partial)))
    plot(result, figure_path("long_context_ladder" + ("_quick" if args.quick else ""), args.device, args.figures))
    print(markdown(result))


if __name__ == "__main__":
    main()
