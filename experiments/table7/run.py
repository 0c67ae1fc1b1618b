"""Table 7: MsT trains exactly like vanilla, and a longer context at equal memory gives a better held-out ppl.

Paper (Sec 4.3, Table 7): Llama3-8B on LongAlpaca, activation recomputation (AC) at 8K vs MsT at 30K under one
A100-80G, AdamW (wd 0.001, clip 1.0, constant LR 1e-4), batch 16 = 1 x 16 accumulation, bf16, 10k steps:
"2.7x improvement in perplexity". This script, on the same recipe scaled down:
  exact   fp32, same seed and data: vanilla vs MsT, max |loss difference| over the run (+ final weights).
  bf16    vanilla vs MsT, against vanilla's own run-to-run noise (vanilla with reversed accumulation order).
  context memory budget = what AC needs at --context_start (CUDA: the GPU); measure which context each strategy
          fits; train AC and MsT at their contexts for the same steps; held-out ppl ratio (paper: 2.7x).
  lmeval  lm-eval 0.4 local tasks on the vanilla- and MsT-trained checkpoints and on an MsT-patched model.

  bash experiments/table7/run.sh                       # CPU default: tiny-llama, GPT-2 BPE, KJV + Python docs
  bash experiments/table7/run.sh --device cuda --model llama3-8b --weights /path/to/Meta-Llama-3-8B \\
       --data_path /path/to/LongAlpaca-12k.json         # the paper's run (local files only, nothing downloaded)
Results: experiments/table7/results/table7_<device>.{json,md}, curves/*.csv, and paper_figures/table7_convergence.png
(``_cuda`` before .png for a GPU run), each replaced atomically (a kill never leaves half a file).

Each training run lives in ``<work_dir>/<tag>-<hash>``, the hash taken over ``run_settings`` (every setting that
changes what the run computes: strategy, context, steps, model, dtype, accumulation, lr, seeds, data, tokenizer, MsT
options, device), so a re-run with the same flags resumes or reuses its runs and one with other flags trains new
ones; ``experiments.train.train`` also refuses a checkpoint of another configuration. A run of some ``--parts`` adds them to
the previous results JSON only when that was made with the same settings (``previous_record``), else starts anew.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

import mst
from mst.memory.measure import free_memory
from mst.memory.strategies import prepare

from ..cli import add_figures_arg, nonnegative_int, positive_float, positive_int
from ..data import (LongAlpacaDataset, MicroBatches, cache_dir, heldout_sample, load_tokenizer, pad_collate,
                    packed_dataset,
                    write_eval_tasks)
from ..models import PRESETS, build_model, preset_config
from ..results import atomic_output, environment, figure_path, save_figure, write_json, write_text
from ..search import fit_contexts
from ..train import TrainConfig, heldout_perplexity, load_checkpoint, run_lm_eval, train, window_batches
from .plot import make_figure

HERE = Path(__file__).resolve().parent
PAPER = {"ac_context": 8192, "mst_context": 30720, "ppl_ratio": 2.7, "lr": 1e-4, "weight_decay": 0.001,
         "clip": 1.0, "accumulation_steps": 16, "steps": 10000, "dtype": "bf16"}
# ---- defaults per device: CPU = minutes on 2 cores, CUDA = the paper's recipe -------------------------------
DEFAULTS = {
    "cpu": dict(model="tiny-llama", lr=1e-3, accumulation_steps=2, threads=1,
                exact_steps=30, exact_context=256,          # fp32 vanilla vs MsT
                bf16_steps=4, bf16_context=128, bf16_accumulation_steps=3,  # bf16 matmul is ~15x slower than fp32 on AVX2
                context_steps=80, context_start=256, context_max=4096, max_train_context=1024,
                eval_tokens=8192, mlp_chunk_tokens=64, lm_head_chunk_tokens=64),
    "cuda": dict(model="llama3-8b", lr=1e-4, accumulation_steps=16, threads=0,
                 exact_steps=50, exact_context=4096, bf16_steps=50, bf16_context=4096, bf16_accumulation_steps=16,
                 context_steps=10000, context_start=8192, context_max=32768, max_train_context=32768,
                 eval_tokens=245760, mlp_chunk_tokens=None, lm_head_chunk_tokens=None),
}
PARTS = ("tasks", "exact", "bf16", "context", "lmeval")
# flags that say where results go or how fast they are made, not what they are (ignored by previous_record)
NOT_RESULT_ARGS = ("parts", "work_dir", "results", "figures", "no_wandb", "threads")


def _parts(text: str) -> str:
    """argparse type of --parts: a comma-separated subset of PARTS (a typo would silently run nothing)."""
    unknown = set(text.split(",")) - set(PARTS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, validated, with the per-device DEFAULTS filled in."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", help="preset: tiny-llama | llama3-8b (default per device)")
    p.add_argument("--exact_model", default="tiny-llama", help="model of the fp32 part (fp32 AdamW on 8B "
                   "does not fit one GPU)")
    p.add_argument("--weights", help="local HF model directory with real weights (and tokenizer) for --model")
    p.add_argument("--corpus", default="kjv+pydocs", help="packed offline corpora: kjv, pydocs, kjv+pydocs")
    p.add_argument("--data_path", help="LongAlpaca-style .json/.jsonl to train on instead of the corpora")
    p.add_argument("--parts", type=_parts, default=",".join(PARTS))
    p.add_argument("--seed", type=int, default=0, help="model init seed")
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--micro_batch", type=positive_int, default=1)
    p.add_argument("--lr", type=positive_float, help="default per device, see DEFAULTS")
    p.add_argument("--threads", type=nonnegative_int, help="torch threads, 0: torch's default (default per device)")
    for name in ("accumulation_steps", "exact_steps", "exact_context", "bf16_steps", "bf16_context", "bf16_accumulation_steps",
                 "context_steps", "context_start", "context_max", "max_train_context", "eval_tokens",
                 "mlp_chunk_tokens", "lm_head_chunk_tokens"):
        p.add_argument(f"--{name}", type=positive_int, help="default per device, see DEFAULTS")
    p.add_argument("--budget_gib", type=positive_float, help="memory budget (default: CPU: AC's peak at "
                   "--context_start; CUDA: the device's memory)")
    p.add_argument("--work_dir", default=str(cache_dir() / "table7"), help="checkpoints, wandb, logs")
    p.add_argument("--results", default=str(HERE / "results"))
    add_figures_arg(p)
    p.add_argument("--no_wandb", action="store_true")
    args = p.parse_args(argv)
    for k, v in DEFAULTS[args.device].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.context_max < args.context_start:
        p.error(f"argument --context_max: must be >= --context_start ({args.context_start}), got {args.context_max}")
    return args


def mst_options(args: argparse.Namespace) -> dict:
    """The ``mst.apply`` options the flags set (the rest are mst's defaults)."""
    return {k: v for k, v in (("mlp_chunk_tokens", args.mlp_chunk_tokens),
                              ("lm_head_chunk_tokens", args.lm_head_chunk_tokens)) if v is not None}


def run_settings(args: argparse.Namespace, *, strategy: str, context: int, steps: int, preset: str,
                 dtype: torch.dtype, micro_order: str, accumulation_steps: int) -> dict:
    """Every setting that changes what one training run computes (the flags that only say where or how fast it
    runs are not among them): it names the run's work dir and is stored with its checkpoints."""
    return {"strategy": strategy, "context": context, "steps": steps, "preset": preset, "dtype": str(dtype),
            "micro_order": micro_order, "accumulation_steps": accumulation_steps, "lr": args.lr, "seed": args.seed,
            "data_seed": args.data_seed, "micro_batch": args.micro_batch,
            "data": args.data_path or args.corpus, "weights": args.weights if preset == args.model else None,
            "tokenizer": args.weights or "gpt2", "mst_options": mst_options(args), "device": args.device}


def run_dir(work: Path, tag: str, settings: dict) -> Path:
    """``work/<tag>-<hash of settings>``: the same settings find their checkpoints again, other ones never do."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return work / f"{tag}-{digest}"


def previous_record(out_json: Path, args: argparse.Namespace) -> dict:
    """The results already in ``out_json`` if they were made with the same settings as ``args`` (up to
    NOT_RESULT_ARGS), to add this run's parts to; else {} (and say why)."""
    if not out_json.exists():
        return {}
    record = json.loads(out_json.read_text())
    old, new = (({k: v for k, v in a.items() if k not in NOT_RESULT_ARGS}) for a in
                (record.get("meta", {}).get("args", {}), vars(args)))
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if differ:
        print(f"[table7] {out_json} was made with other settings ({', '.join(differ)}): starting a new record")
        return {}
    return record


def copy_atomic(src: Path, dst: Path) -> None:
    """``src`` copied over ``dst`` atomically (curves CSVs)."""
    with atomic_output(dst) as tmp:
        shutil.copy(src, tmp)


def max_diff(a: list[dict], b: list[dict]) -> dict:
    d = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    r = [abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b)]
    return {"max_abs_dloss": max(d), "max_rel_dloss": max(r), "steps": len(d)}


def markdown(rec: dict) -> str:
    """The results as markdown tables: paper | planner | measured (device)."""
    dev = f"measured ({rec['environment']['device']}, {rec['environment']['date']})"
    lines = [f"# Table 7 convergence: {dev}", "",
             f"| quantity | paper (Llama3-8B, LongAlpaca, A100-80G) | planner | {dev} |", "|---|---|---|---|"]
    if "exact" in rec:
        e = rec["exact"]
        lines += [f"| fp32 max abs/rel loss diff vanilla vs MsT ({e['model']}, S={e['context']}, {e['steps']} steps) "
                  f"| not reported (claims no degradation) | n/a | "
                  f"{e['max_abs_dloss']:.2e} / {e['max_rel_dloss']:.2e} |",
                  f"| fp32 max abs weight diff after training | not reported | n/a | {e['max_abs_dparam']:.2e} |"]
    if "bf16" in rec:
        b = rec["bf16"]
        lines += [f"| bf16 max abs loss diff vanilla vs MsT ({b['model']}, S={b['context']}, "
                  f"{b['mst_vs_vanilla']['steps']} steps) | not reported | n/a | "
                  f"{b['mst_vs_vanilla']['max_abs_dloss']:.2e} |",
                  f"| bf16 noise: vanilla vs vanilla, reversed accumulation order | not reported | n/a | "
                  f"{b['noise_vanilla_reverse_vs_vanilla']['max_abs_dloss']:.2e} |"]
    if "context" in rec:
        c = rec["context"]
        ac, ms = c["runs"]["ac"], c["runs"]["mst"]
        ms_short = ms[f"heldout_at_{ac['context']}"]["ppl"]
        mst_fit = (f">= {c['context_max']} (largest context searched)" if c["longest"]["mst"] >= c["context_max"]
                   else str(c["longest"]["mst"]))
        budget_note = (f"(AC's peak at {rec['meta']['args']['context_start']})"
                       if rec["meta"]["args"]["budget_gib"] is None and rec["meta"]["device"] == "cpu" else "")
        lines += [f"| memory budget | A100 80 GB | n/a | {c['budget_bytes'] / 2 ** 20:.1f} MiB {budget_note} |",
                  f"| longest context AC fits | 8K | n/a | {c['longest']['ac']} |",
                  f"| longest context MsT fits | 30K | n/a | {mst_fit}; trained at {c['mst_context']} |",
                  f"| held-out ppl AC @ {ac['context']} | not reported | n/a | "
                  f"{ac['heldout_own_context']['ppl']:.2f} |",
                  f"| held-out ppl MsT @ {ms['context']} | not reported | n/a | "
                  f"{ms['heldout_own_context']['ppl']:.2f} |",
                  f"| ppl ratio AC / MsT | 2.7 | n/a | {c['ppl_ratio_ac_over_mst']:.2f} |",
                  f"| MsT model evaluated at AC's context {ac['context']} | not reported | n/a | {ms_short:.2f} |",
                  f"| training tokens AC / MsT (same steps) | not reported | n/a | {ac['train_tokens']:,} / "
                  f"{ms['train_tokens']:,} |"]
        lines += ["", "Peak memory of one training step (measure_peak, after one warm-up step):", "",
                  "| strategy | context | peak MiB | fits |", "|---|---|---|---|"]
        for t in c["trials"]:
            peak = "OOM" if t["peak_bytes"] is None else f"{t['peak_bytes'] / 2 ** 20:.1f}"
            lines.append(f"| {t['strategy']} | {t['seq_len']} | {peak} | {t['fits']} |")
    if "lm_eval" in rec:
        lines += ["", f"lm-eval 0.4.13 (local tasks, max_length {rec['lm_eval']['max_length']}):", "",
                  "| model | t7_heldout_ppl word_perplexity | bits_per_byte | t7_next_verse acc | acc_norm |",
                  "|---|---|---|---|---|"]
        for name, r in rec["lm_eval"]["results"].items():
            p, v = r["t7_heldout_ppl"], r["t7_next_verse"]
            lines.append(f"| {name} | {p['word_perplexity,none']:.6g} | {p['bits_per_byte,none']:.6f} | "
                         f"{v['acc,none']:.3f} | {v['acc_norm,none']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the parts asked for; the results JSON is rewritten after each part."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    work, results = Path(args.work_dir), Path(args.results)
    (results / "curves").mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(args.weights or "gpt2")
    mst_opts = mst_options(args)
    out_json = results / f"table7_{args.device}.json"
    record = previous_record(out_json, args)
    record["environment"] = environment(args.device)
    record["meta"] = {"device": args.device, "threads": torch.get_num_threads(), "args": vars(args),
                      "mst_options": mst_opts, "paper": PAPER}
    t_start = time.time()

    def save_record() -> None:
        write_json(out_json, record)

    def data_for(context: int, split: str = "train"):
        """Training / held-out dataset at ``context`` tokens: packed corpora, or LongAlpaca examples."""
        if args.data_path:
            return LongAlpacaDataset(args.data_path, tok, max_length=context, split=split)
        return packed_dataset(args.corpus, split, tok, context)

    def build(preset: str, dtype=torch.float32, context: int = 8192):
        """A fresh seeded model (real weights for ``--model`` when ``--weights`` is given); a preset's vocabulary
        grows to the tokenizer's (e.g. tiny-llama over Llama-3's tokenizer), positions to ``context``."""
        if args.weights and preset == args.model:
            return build_model(None, weights=args.weights, dtype=dtype, device=args.device)
        overrides = {"max_position_embeddings": max(context, PRESETS[preset]().max_position_embeddings)}
        if len(tok) > PRESETS[preset]().vocab_size:
            overrides["vocab_size"] = len(tok)
        return build_model(preset_config(preset, **overrides), dtype=dtype, device=args.device, seed=args.seed)

    def run(tag: str, strategy: str, context: int, steps: int, *, preset: str, dtype=torch.float32,
            micro_order: str = "forward", accumulation_steps: int | None = None):
        """Train one run from scratch (or resume / reuse the run of the same settings); returns (model, log rows,
        its work dir). ``tag`` names its curve in results/curves."""
        accumulation_steps = args.accumulation_steps if accumulation_steps is None else accumulation_steps
        settings = run_settings(args, strategy=strategy, context=context, steps=steps, preset=preset, dtype=dtype,
                                micro_order=micro_order, accumulation_steps=accumulation_steps)
        out_dir = run_dir(work, tag, settings)
        model = prepare(build(preset, dtype, context), strategy, **mst_opts)
        batches = MicroBatches(data_for(context), args.micro_batch, seed=args.data_seed,
                               collate=lambda items: pad_collate(items, pad_id=tok.pad_token_id))
        cfg = TrainConfig(steps=steps, accumulation_steps=accumulation_steps, lr=args.lr, micro_order=micro_order,
                          ckpt_every=max(1, steps // 4))
        rows = train(model, batches, cfg, out_dir=out_dir, name=tag, use_wandb=not args.no_wandb,
                     run_config=settings)
        copy_atomic(out_dir / "log.csv", results / "curves" / f"{tag}.csv")
        return model, rows, out_dir

    # ---- tasks: lm-eval data from held-out documents ---------------------------------------------------------------
    if "tasks" in parts and not (HERE / "tasks" / "data" / "next_verse.jsonl").exists():
        write_eval_tasks(HERE / "tasks" / "data", corpus=args.corpus)

    # ---- exact: fp32 vanilla vs MsT, same seed, same data ------------------------------------------------------------
    if "exact" in parts:
        L = args.exact_context
        runs, exact_dirs = {}, {}
        for s in ("vanilla", "mst"):
            _, runs[s], exact_dirs[s] = run(f"exact_fp32_{s}", s, L, args.exact_steps, preset=args.exact_model)
        weights = []
        for s in ("vanilla", "mst"):
            m = build(args.exact_model)
            load_checkpoint(exact_dirs[s] / "checkpoint.pt", model=m)
            weights.append(m.state_dict())
        dparam = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
        record["exact"] = {"model": args.exact_model, "context": L, "dtype": "fp32",
                           **max_diff(runs["vanilla"], runs["mst"]),
                           "max_abs_dparam": dparam, "final_loss": {s: r[-1]["loss"] for s, r in runs.items()},
                           "tokens_per_s": {s: sum(x["tokens_per_s"] for x in r[1:]) / max(1, len(r) - 1)
                                            for s, r in runs.items()}}
        del weights, m
        free_memory()
        save_record()
        print("[table7] exact:", {k: v for k, v in record["exact"].items() if "dloss" in k or "dparam" in k})

    # ---- bf16: vanilla vs MsT vs vanilla's own noise ---------------------------------------------------------------
    if "bf16" in parts:
        L = args.bf16_context
        spec = {"vanilla": ("vanilla", "forward"), "mst": ("mst", "forward"), "vanilla_reverse": ("vanilla", "reverse")}
        runs = {}
        for name, (strategy, order) in spec.items():
            model, runs[name], _ = run(f"bf16_{name}", strategy, L, args.bf16_steps, preset=args.model,
                                       dtype=torch.bfloat16, micro_order=order, accumulation_steps=args.bf16_accumulation_steps)
            del model
            free_memory()
        record["bf16"] = {"model": args.model, "context": L, "dtype": "bf16", "accumulation_steps": args.bf16_accumulation_steps,
                          "mst_vs_vanilla": max_diff(runs["vanilla"], runs["mst"]),
                          "noise_vanilla_reverse_vs_vanilla": max_diff(runs["vanilla"], runs["vanilla_reverse"]),
                          "final_loss": {s: r[-1]["loss"] for s, r in runs.items()}}
        save_record()
        print("[table7] bf16:", record["bf16"]["mst_vs_vanilla"], record["bf16"]["noise_vanilla_reverse_vs_vanilla"])

    # ---- context: which context fits one memory budget, then train both there --------------------------------------
    if "context" in parts:
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        budget = None if args.budget_gib is None else int(args.budget_gib * 2 ** 30)
        if budget is None and args.device == "cuda":
            budget = torch.cuda.get_device_properties(0).total_memory
        fit = fit_contexts(lambda: build(args.model, dtype, args.context_max), ("vanilla", "ac", "mst"),
                           start=args.context_start, max_len=args.context_max, budget_bytes=budget,
                           mst_options=mst_opts, device=args.device,
                           progress=lambda s: print("[table7] fit", s, flush=True))
        ac_ctx, mst_ctx = fit["longest"]["ac"], min(fit["longest"]["mst"], args.max_train_context)
        if not ac_ctx or mst_ctx <= ac_ctx:
            raise SystemExit(f"[table7] no longer context for MsT in the budget: {fit['longest']}")
        grid = math.gcd(ac_ctx, mst_ctx)  # positions on this grid are scored by neither context: same token set
        heldout = None if args.data_path else heldout_sample(args.corpus, tok, args.eval_tokens)
        if heldout is not None:
            heldout = heldout[:len(heldout) // math.lcm(ac_ctx, mst_ctx) * math.lcm(ac_ctx, mst_ctx)]
        ctx_runs = {}
        for strategy, ctx in (("ac", ac_ctx), ("mst", mst_ctx)):
            model, rows, _ = run(f"context_{strategy}_{ctx}", strategy, ctx, args.context_steps, preset=args.model,
                                 dtype=dtype)
            if heldout is not None:
                own, short = (heldout_perplexity(model, window_batches(heldout, c, score_grid=grid))
                              for c in (ctx, ac_ctx))
            else:
                own, short = (heldout_perplexity(model, [pad_collate([x], tok.pad_token_id)
                                                         for x in data_for(c, "heldout")]) for c in (ctx, ac_ctx))
            lm = (run_lm_eval(model, tok, ["t7_heldout_ppl"], HERE / "tasks", max_length=ctx)
                  if "lmeval" in parts else None)
            ctx_runs[strategy] = {"context": ctx, "steps": len(rows),
                                  "train_tokens": sum(r["tokens"] for r in rows),
                                  "final_train_loss": rows[-1]["loss"], "heldout_own_context": own,
                                  f"heldout_at_{ac_ctx}": short, "lm_eval": lm}
            del model
            free_memory()
        record["context"] = {**fit, "ac_context": ac_ctx, "mst_context": mst_ctx, "context_max": args.context_max,
                             "runs": ctx_runs, "ppl_ratio_ac_over_mst": ctx_runs["ac"]["heldout_own_context"]["ppl"]
                             / ctx_runs["mst"]["heldout_own_context"]["ppl"]}
        save_record()
        print(f"[table7] context: AC {ac_ctx} vs MsT {mst_ctx}: "
              f"ppl ratio {record['context']['ppl_ratio_ac_over_mst']:.3f}")

    # ---- lmeval: vanilla- and MsT-trained checkpoints, and the MsT-trained model under mst.apply -------------------
    if "lmeval" in parts and "exact" in parts:
        tasks, L = ["t7_heldout_ppl", "t7_next_verse"], args.exact_context
        evals = {}
        for name, trained, strategy in (("vanilla_trained", "vanilla", "vanilla"), ("mst_trained", "mst", "vanilla"),
                                        ("mst_trained_mst_patched", "mst", "mst")):
            m = build(args.exact_model)
            load_checkpoint(exact_dirs[trained] / "checkpoint.pt", model=m)
            evals[name] = run_lm_eval(prepare(m, strategy, **mst_opts), tok, tasks, HERE / "tasks", max_length=L)
            del m
            free_memory()
        record["lm_eval"] = {"max_length": L, "results": evals}
        save_record()
        print("[table7] lm_eval:", json.dumps(evals))

    record["meta"]["wall_s"] = time.time() - t_start
    save_record()
    write_text(results / f"table7_{args.device}.md", markdown(record))
    save_figure(make_figure(record, results / "curves"), figure_path("table7_convergence", args.device, args.figures))
    print(f"[table7] wrote {out_json} ({record['meta']['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
