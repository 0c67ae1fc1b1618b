"""Every GPU claim of the repository in one timed run on one CUDA GPU (issue 22), and its CPU smoke mode.

    bash experiments/gpu/run.sh            # one CUDA GPU, ~9 min wall: results into the experiments' results/ folders
    bash experiments/gpu/run.sh --smoke    # CPU, tiny shapes, the same code paths in under 2 min (CI runs it)
    python -m experiments.gpu.run --smoke --out /tmp/gpu --parts max_length throughput   # some parts only

GPU time comes in short, rare leases, so the parts run in order of value, each within a share of one wall-clock
budget (``Budget``: time a part leaves unused goes to the next ones; a part with too little time left is recorded
as "skipped: time"), and each writes its JSON when it starts, after every item and when it ends (atomically), so
a killed run keeps what finished. A part that fails is recorded with its traceback and the run goes on (exit 1).

  exactness   a. bf16 exactness of ``mst.apply`` per family at S = 4096, and the CUDA-only tests (pytest)
  validation  b. measured ``max_memory_allocated`` of full-size Llama3-8B training steps (vanilla, AC, MsT at three
                 lengths each) against ``mst.memory.plan`` for the same step
  max_length  c. Table 2: Llama3-8B's longest sequence per strategy, each search seeded at the planner's limit and
                 stopped after 3 probes
  throughput  d. Table 6: MsT vs AC tokens/s at 8K, batch 1 and 2, timed round-robin
  lm_head     e. Tables 13-16: the LM-head op's peak at S = 80K (HF's loss and MsT's chunks) against the planner
  ladder      e. the long-context ladder's next rungs (MsT + checkpoint offload; MsT with the norms in
                 mini-sequences, without and with offload) at moderate lengths, and every rung's measured bytes per
                 token against the planner's (the traced engine for the norms rungs)

Full size: random weights, bf16, optimizer-in-backward (the paper's max-length setting), batch 1 unless said, the
GPU's memory capped at 80 GiB (``torch.cuda.set_per_process_memory_fraction``) on bigger cards. One model lives at
a time and is switched between strategies with ``mst.revert`` + ``prepare``.
"""
from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

import mst
from mst.configs import load_config
from mst.memory import max_seq_len, plan
from mst.memory.length_search import Trial, is_allocation_failure, run_trial, search_max_seq_len
from mst.memory.live_bytes import LiveBytes
from mst.memory.measure import free_memory, measure_peak
from mst.memory.planner import DEFAULT_RESERVE_GB
from mst.memory.strategies import make_train_step, prepare
from mst.ops import chunked_lm_head_loss

from ..cli import positive_float
from ..models import build_model, model_config
from ..results import ROOT, environment, write_json, write_text
from ..timing import round_robin, throughput

GiB = 1024 ** 3
MODEL = "llama3-8b"
OPTIMIZER = "adamw_in_backward"  # the paper's setting of Tables 2, 6 and 9-11
STRATEGIES = ("vanilla", "ac", "mst")
# ladder rungs that are a strategy with extra mst.apply options (planned by the traced engine, which models them)
VARIANTS = {"mst_norms": ("mst", {"norms": True}), "mst_norms_offload": ("mst_offload", {"norms": True})}
CAP_GIB = 80.0  # bigger cards are capped to the paper's A100 80GB
MAX_PROBES = 3  # trials per max-length cell
MIN_START = 0.25  # a part starts only with at least this fraction of its share left
OPTIONAL = ("pytest", "flash_attn", "deepspeed", "peft", "bitsandbytes")  # reported in every results file
# docs/paper.md §1 (A100 80GB): Table 2 (Llama3-8B), Table 6 (Llama3-8B, 8K: tokens/s), Table 14 (LM-head, S=80K)
PAPER_MAX_LENGTH = {"vanilla": "5K (inferred 60K/12)", "ac": "15K (inferred 60K/4)", "mst": "60K (exact)"}
PAPER_THROUGHPUT = {2: {"ac": 3271.42, "mst": 3194.90}}
PAPER_LM_HEAD_GB = {"standard": "59.92 GB", "M=16": "9.12 GB", "M=32": "89.8% reduction (~6.1 GB)"}
# LM-head settings, most informative first (HF's standard loss at 80K is expected not to fit: last)
LM_HEAD_SETTINGS = (("M=16", {"num_chunks": 16}), ("M=32", {"num_chunks": 32}), ("default", {}), ("standard", None))


@dataclass(frozen=True)
class Setting:
    """The shapes of one run: full size on the GPU; tiny on CPU for --smoke (the same code paths in seconds)."""

    device: str
    dtype: torch.dtype
    config: PretrainedConfig  # the trained model (Llama3-8B, or its tiny scaled version)
    warmup_seq: int  # one step at this length after building a model, so the optimizer state exists
    exact_seq: int
    exact_options: dict  # mst.apply options of the bf16 check
    validation: dict[str, tuple[int, ...]]  # strategy -> lengths of part b
    granule: int  # the max-length search's smallest step, and the planner's
    throughput_seq: int
    batches: tuple[int, ...]
    rounds: int
    lm_head_seq: int
    ladder: tuple[tuple[str, tuple[int, ...]], ...]  # (strategy, lengths) rungs not covered by part b
    budget_s: float
    emulated_bytes: int | None = None  # CPU: the memory a max-length trial may use; None: the GPU decides


def full_setting() -> Setting:
    return Setting(device="cuda", dtype=torch.bfloat16, config=load_config(MODEL), warmup_seq=256, exact_seq=4096,
                   exact_options={}, validation={"vanilla": (1024, 2048, 4096), "ac": (4096, 8192, 16384),
                                                 "mst": (8192, 16384, 32768)},
                   granule=256, throughput_seq=8192, batches=(1, 2), rounds=3, lm_head_seq=80_000,
                   ladder=(("mst_offload", (16384, 32768)), ("mst_norms", (32768, 65536)),
                           ("mst_norms_offload", (32768, 65536))), budget_s=480.0)


def smoke_setting() -> Setting:
    return Setting(device="cpu", dtype=torch.float32, config=model_config(MODEL, "cpu", hidden=32, layers=1),
                   warmup_seq=16, exact_seq=64, exact_options={"mlp_chunk_tokens": 16},
                   validation={s: (32, 64) for s in STRATEGIES}, granule=16, throughput_seq=64, batches=(1, 2),
                   rounds=2, lm_head_seq=256,
                   ladder=(("mst_offload", (32, 64)), ("mst_norms", (32, 64)), ("mst_norms_offload", (32, 64))),
                   budget_s=600.0,
                   emulated_bytes=2 << 20)


# ---------------------------------------------------------------------------------------------------- the budget
class Budget:
    """One wall-clock budget split into the parts' shares, cumulatively: part i must end by start + the shares of
    parts 0..i (scaled to ``total_s``), so time a part leaves unused goes to the next ones and an overrun is taken
    from them. ``can_start``: at least ``MIN_START`` of the part's own share is left before its deadline."""

    def __init__(self, total_s: float, shares: dict[str, float], clock: Callable[[], float] = time.monotonic):
        self.clock, self.total_s, self.start = clock, total_s, clock()
        scale = total_s / sum(shares.values())
        self.share_s = {name: share * scale for name, share in shares.items()}
        self.ends, end = {}, self.start
        for name, share in self.share_s.items():
            end += share
            self.ends[name] = end

    def left(self, part: str) -> float:
        """Seconds until ``part``'s deadline (negative once it has passed)."""
        return self.ends[part] - self.clock()

    def can_start(self, part: str) -> bool:
        return self.left(part) >= MIN_START * self.share_s[part]

    def elapsed(self) -> float:
        return self.clock() - self.start


# ------------------------------------------------------------------------------------------------ the run context
class TrainModel:
    """One training model at a time (two full-size 8B models with optimizer state do not fit one GPU): built for a
    batch size on first use with ``make_train_step`` (optimizer-in-backward) and one warm-up step, so every later
    measured step starts with the optimizer state in place; switched between strategies with ``mst.revert`` +
    ``prepare``. Asking for another batch size drops the model first."""

    def __init__(self, setting: Setting):
        self.setting = setting
        self.batch: int | None = None
        self.model = self.step = self.track = None

    def get(self, batch: int, strategy: str) -> tuple[Callable[[int], torch.Tensor], list]:
        s = self.setting
        if self.batch != batch:
            self.drop()
            self.model = prepare(build_model(s.config, device=s.device, dtype=s.dtype), "mst")
            self.step, self.track = make_train_step(self.model, optimizer=OPTIMIZER, batch_size=batch)
            self.step(s.warmup_seq)
            self.batch = batch
        strategy, options = VARIANTS.get(strategy, (strategy, {}))
        prepare(mst.revert(self.model), strategy, **options)
        return self.step, self.track

    def factory(self, batch: int, strategy: str) -> Callable[[int], tuple[Callable[[], object], list]]:
        """``run_trial``'s step factory: ``seq_len -> (step, track)`` on this model under ``strategy``."""
        def make(seq_len: int):
            step, track = self.get(batch, strategy)
            return (lambda: step(seq_len)), track

        return make

    def drop(self) -> None:
        self.model = self.step = self.track = None
        self.batch = None
        free_memory()


@dataclass
class Run:
    """What every part gets: the setting, the device, the budget, the shared model and the finished parts."""

    setting: Setting
    budget: Budget
    card_bytes: int  # the memory a step may use: the GPU's (capped at 80 GiB), or the emulated CPU budget
    models: TrainModel
    part: str = ""
    results: dict[str, dict] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return torch.device(self.setting.device)

    def left(self) -> float:
        return self.budget.left(self.part)

    def planner_card(self) -> dict:
        """``max_seq_len``'s card: the GPU's memory less the default reserve, or the emulated budget exactly."""
        reserve = DEFAULT_RESERVE_GB if self.setting.emulated_bytes is None else 0.0
        return dict(gpu_mem_gb=self.card_bytes / GiB, reserve_gb=reserve)


def log(message: str) -> None:
    print(f"[gpu] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ a. exactness
def cuda_test_ids(root: Path = ROOT) -> list[str]:
    """pytest node ids of the tests that run only on CUDA: test functions under tests/ decorated with
    ``skipif(not torch.cuda.is_available(), ...)`` (found in the source, so a new one is picked up)."""
    def cuda_only(decorator: ast.expr) -> bool:
        if not (isinstance(decorator, ast.Call) and decorator.args and ast.unparse(decorator.func).endswith("skipif")):
            return False
        condition = decorator.args[0]
        return (isinstance(condition, ast.UnaryOp) and isinstance(condition.op, ast.Not)
                and ast.unparse(condition.operand).endswith("cuda.is_available()"))

    return [f"{path.relative_to(root)}::{node.name}" for path in sorted((root / "tests").rglob("test_*.py"))
            for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef) and any(cuda_only(d) for d in node.decorator_list)]


def junit_counts(path: Path) -> dict:
    """Passed / failed / errors / skipped from a pytest ``--junitxml`` report."""
    suites = list(ElementTree.parse(path).getroot().iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
            "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}


def run_pytest(ids: list[str], timeout_s: float) -> dict:
    """The tests ``ids`` in a pytest subprocess (the suite's own conftest and fixtures)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *ids]
        try:
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout_s, 60))
        except subprocess.TimeoutExpired as exc:
            return {"tests": ids, "timed_out": True, "output_tail": str(exc.stdout or "")[-2000:]}
        counts = junit_counts(report) if report.exists() else {}
    return {"tests": ids, "returncode": done.returncode, **counts, "output_tail": (done.stdout + done.stderr)[-2000:]}


def bf16_check(model_type: str, seq: int, device: torch.device, options: dict) -> dict:
    """tests/integrations/test_hf_bf16.py's criterion on ``device`` at length ``seq``: MsT's bf16 loss and
    gradients are no further from the fp32 reference than vanilla bf16's (x1.05 overall, x1.5 per parameter)."""
    from tests.integrations.test_hf_bf16 import FACTOR, GRAD_EPS, LOSS_EPS, PER_PARAM_FACTOR, loss_and_grads
    from tests.utils import clone_model, make_input_ids, make_labels, rel_err, tiny_model

    ref = tiny_model(model_type, max_position_embeddings=max(seq, 512)).to(device)
    vanilla = clone_model(ref).to(torch.bfloat16)
    patched = mst.apply(clone_model(vanilla), **options)
    ids = make_input_ids(1, seq).to(device)
    labels = make_labels(ids, "prefix")
    (r_loss, r_grads), (v_loss, v_grads), (m_loss, m_grads) = (loss_and_grads(m, ids, labels)
                                                               for m in (ref, vanilla, patched))

    def flat(grads: dict) -> torch.Tensor:
        return torch.cat([grads[n].flatten() for n in r_grads])

    loss = {"mst": rel_err(m_loss, r_loss), "vanilla": rel_err(v_loss, r_loss)}
    grad = {"mst": rel_err(flat(m_grads), flat(r_grads)), "vanilla": rel_err(flat(v_grads), flat(r_grads))}
    per_param = {n: (rel_err(m_grads[n], r_grads[n]), rel_err(v_grads[n], r_grads[n])) for n in r_grads}
    worst = max(per_param, key=lambda n: per_param[n][0] / max(per_param[n][1], 1e-30))
    ok = (loss["mst"] <= FACTOR * loss["vanilla"] + LOSS_EPS and grad["mst"] <= FACTOR * grad["vanilla"] + GRAD_EPS
          and all(m <= PER_PARAM_FACTOR * v + GRAD_EPS for m, v in per_param.values()))
    return {"model_type": model_type, "seq_len": seq, "loss_rel_err": loss, "grad_rel_err": grad,
            "worst_param": {"name": worst, "mst": per_param[worst][0], "vanilla": per_param[worst][1]},
            "no_worse_than_vanilla": ok}


def part_exactness(run: Run, save: Callable[[dict], None]) -> dict:
    from tests.utils import SUPPORTED_TYPES

    s = run.setting
    out: dict = {"bf16": []}
    for model_type in SUPPORTED_TYPES:  # first: about a second each on a GPU
        if run.left() <= 0:
            out["bf16"].append({"model_type": model_type, "skipped": "time"})
            continue
        out["bf16"].append(bf16_check(model_type, s.exact_seq, run.device, s.exact_options))
        save(out)
    out["tests"] = run_pytest(cuda_test_ids(), timeout_s=run.left())  # a new process: imports, CUDA start
    return out


# ------------------------------------------------------------------------------- b. planner validation (+ ladder)
def measure_row(run: Run, strategy: str, seq: int) -> dict:
    """One training step of the shared batch-1 model: the allocator's peak (CUDA; the tracker's on CPU) next to
    the planner's prediction for the same step. Running out of memory is a row with the error."""
    s = run.setting
    trial, breakdown = run_trial(run.models.factory(1, strategy), seq, None, run.device, warmup_steps=0)
    planned = plan(s.config, seq, **planned_as(strategy), optimizer=OPTIMIZER, dtype=s.dtype, device=run.device.type)
    row = {"strategy": strategy, "seq_len": seq, "measured_bytes": trial.peak_bytes,
           "tracker_bytes": sum(breakdown.values()) or None, "breakdown": breakdown,
           "step_time_s": trial.step_time_s, "error": trial.error, "planned_bytes": planned.peak_bytes,
           "planned_phase": planned.phase, "planned_breakdown": planned.breakdown}
    if trial.peak_bytes:
        row["error_pct"] = 100.0 * (planned.peak_bytes - trial.peak_bytes) / trial.peak_bytes
    log(f"{strategy} S={seq}: measured {_size(trial.peak_bytes)}, planned {_size(planned.peak_bytes)}")
    return row


def planned_as(label: str) -> dict:
    """The planner's arguments for a strategy or a ``VARIANTS`` label (traced engine with its options)."""
    if label not in VARIANTS:
        return {"strategy": label}
    strategy, options = VARIANTS[label]
    return {"strategy": strategy, "engine": "traced", "mst_options": options}


def measure_rows(run: Run, lengths: dict[str, tuple[int, ...]], rows: list, save: Callable[[], None]) -> None:
    """Rows for every (strategy, length), shortest first; after an out-of-memory step the longer ones of that
    strategy are not tried."""
    for strategy, seqs in lengths.items():
        for seq in seqs:
            if run.left() <= 0:
                rows.append({"strategy": strategy, "seq_len": seq, "skipped": "time"})
                continue
            rows.append(measure_row(run, strategy, seq))
            save()
            if rows[-1]["measured_bytes"] is None:
                break


def part_validation(run: Run, save: Callable[[dict], None]) -> dict:
    out: dict = {"model": MODEL, "optimizer": OPTIMIZER, "rows": []}
    measure_rows(run, run.setting.validation, out["rows"], lambda: save(out))
    out["slopes"] = slopes(out["rows"], run)
    return out


def slopes(rows: list[dict], run: Run) -> dict:
    """Per strategy, bytes per token between its two longest measured lengths, measured against planned, and the
    longest sequence the measured slope extrapolates to on this card next to the planner's limit."""
    out = {}
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        done = sorted((r for r in rows if r["strategy"] == strategy and r.get("measured_bytes")),
                      key=lambda r: r["seq_len"])
        if len(done) < 2:
            continue
        a, b = done[-2], done[-1]
        tokens = b["seq_len"] - a["seq_len"]
        measured = (b["measured_bytes"] - a["measured_bytes"]) / tokens
        planned = (b["planned_bytes"] - a["planned_bytes"]) / tokens
        limit = max_seq_len(run.setting.config, **planned_as(strategy), optimizer=OPTIMIZER, dtype=run.setting.dtype,
                            device=run.device.type, granularity=run.setting.granule, **run.planner_card())
        out[strategy] = {"from": a["seq_len"], "to": b["seq_len"], "measured_bytes_per_token": measured,
                         "planned_bytes_per_token": planned, "ratio": measured / planned if planned else None,
                         "extrapolated_max_seq_len": int(b["seq_len"] + (run.card_bytes - b["measured_bytes"])
                                                         / measured) if measured > 0 else None,
                         "planner_max_seq_len": int(limit)}
    return out


def part_ladder(run: Run, save: Callable[[dict], None]) -> dict:
    out: dict = {"model": MODEL, "optimizer": OPTIMIZER, "rows": []}
    measure_rows(run, dict(run.setting.ladder), out["rows"], lambda: save(out))
    earlier = run.results.get("validation", {}).get("rows", [])
    out["slopes"] = slopes(earlier + out["rows"], run)  # every rung: vanilla, AC, MsT (part b), then these
    return out


# --------------------------------------------------------------------------------------------- c. max length
class ProbeLimit(Exception):
    """Raised by ``bounded_search``'s step factory to end a search (not an allocation failure, so it stops it)."""


def granularity(expect: int, base: int) -> int:
    """The search's step near a prediction: about 1/16 of it, a multiple of ``base``."""
    return max(base, expect // 16 // base * base)


def bounded_search(make_step, *, expect: int, granule: int, device: torch.device, budget_bytes: int | None,
                   left: Callable[[], float], max_probes: int = MAX_PROBES,
                   on_trial: Callable[[Trial], None] = lambda trial: None) -> dict:
    """``search_max_seq_len`` seeded at ``expect`` (rounded down to ``granule``), capped at expect + 2 granules so
    it cannot run away upwards, and stopped after ``max_probes`` trials or when ``left()`` runs out: the answer is
    then the longest length that fitted, with the shortest one above it that did not ("first_failure")."""
    trials: list[Trial] = []

    def limited(seq_len: int):
        if len(trials) >= max_probes or left() <= 0:
            raise ProbeLimit("probes" if len(trials) >= max_probes else "time")
        return make_step(seq_len)

    def record(trial: Trial) -> None:
        trials.append(trial)
        on_trial(trial)

    seed = max(granule, expect // granule * granule)
    stopped = None
    try:
        search_max_seq_len(limited, budget_bytes=budget_bytes, device=device, expect=seed, granularity=granule,
                           max_len=seed + 2 * granule, warmup_steps=0, progress=record)
    except ProbeLimit as exc:
        stopped = str(exc)
    best = max((t.seq_len for t in trials if t.fits), default=0)
    above = min((t.seq_len for t in trials if not t.fits and t.seq_len > best), default=None)
    return {"max_seq_len": best, "first_failure": above, "granularity": granule, "seed": seed,
            "capped": best >= seed + 2 * granule, "stopped_by": stopped, "trials": [asdict(t) for t in trials]}


def part_max_length(run: Run, save: Callable[[dict], None]) -> dict:
    s = run.setting
    out: dict = {"model": MODEL, "optimizer": OPTIMIZER, "card_bytes": run.card_bytes, "paper": PAPER_MAX_LENGTH,
                 "cells": {}}
    for strategy in STRATEGIES:
        if run.left() <= 0:
            out["cells"][strategy] = {"skipped": "time"}
            continue
        predicted = int(max_seq_len(s.config, strategy, optimizer=OPTIMIZER, dtype=s.dtype, device=run.device.type,
                                    granularity=s.granule, **run.planner_card()))
        cell = {"planner": predicted, "in_progress": True}
        out["cells"][strategy] = cell
        save(out)
        cell.update(bounded_search(run.models.factory(1, strategy), expect=predicted,
                                   granule=granularity(predicted, s.granule), device=run.device,
                                   budget_bytes=s.emulated_bytes, left=run.left,
                                   on_trial=lambda t, st=strategy: log(f"{st} S={t.seq_len}: "
                                                                       f"{'fits' if t.fits else t.error}")))
        del cell["in_progress"]
        save(out)
    cells = out["cells"]
    out["ratios"] = {f"mst/{b}": {key: cells["mst"][key] / cells[b][key]
                                  for key in ("max_seq_len", "planner") if cells[b].get(key) and key in cells["mst"]}
                     for b in ("vanilla", "ac") if "max_seq_len" in cells.get("mst", {})}
    return out


# --------------------------------------------------------------------------------------------- d. throughput
def part_throughput(run: Run, save: Callable[[dict], None]) -> dict:
    s = run.setting
    out: dict = {"model": MODEL, "optimizer": OPTIMIZER, "seq_len": s.throughput_seq, "rounds": s.rounds,
                 "warmup_rounds": 1, "groups": []}
    for batch in s.batches:
        out["groups"].append(time_group(run, batch) if run.left() > 0 else {"batch": batch, "skipped": "time"})
        save(out)
    return out


def time_group(run: Run, batch: int) -> dict:
    """AC and MsT timed round-robin on one model (a function of its own, so that nothing refers to the model once
    it returns and the next batch size's model finds the memory free)."""
    seq = run.setting.throughput_seq
    step, _ = run.models.get(batch, "mst")
    times = round_robin({v: (lambda: step(seq)) for v in ("ac", "mst")}, rounds=run.setting.rounds, warmup=1,
                        device=run.device, before=lambda v: run.models.get(batch, v))
    cells = {v: throughput(t, batch * seq) if t else {"oom": True} for v, t in times.items()}
    ratio = (cells["mst"]["tokens_per_s"] / cells["ac"]["tokens_per_s"]
             if all("tokens_per_s" in c for c in cells.values()) else None)
    paper = PAPER_THROUGHPUT.get(batch)
    log(f"throughput b={batch}: MsT/AC {ratio}")
    return {"batch": batch, "cells": cells, "mst/ac": ratio,
            "paper": {**paper, "mst/ac": paper["mst"] / paper["ac"]} if paper else None}


# ---------------------------------------------------------------------------------------------- e. LM-head op
def lm_head_case(config: PretrainedConfig, seq: int, device: torch.device,
                 chunking: dict | None) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """Forward + backward of the LM head and loss over ``seq`` tokens in bf16 (``chunking`` None: HF's
    ``ForCausalLMLoss`` on the full logits; else ``chunked_lm_head_loss(**chunking)``), and the tensors alive
    before it (weight, hidden states, labels)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    vocab, d = config.vocab_size, config.hidden_size
    weight = (torch.randn(vocab, d, device=device, dtype=torch.bfloat16) * config.initializer_range).requires_grad_()
    hidden = torch.randn(1, seq, d, device=device, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (1, seq), device=device)
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]  # what HF's loss shifts internally

    def step() -> None:
        weight.grad = hidden.grad = None
        if chunking is None:
            loss = ForCausalLMLoss(F.linear(hidden, weight), labels, vocab_size=vocab)
        else:
            loss = chunked_lm_head_loss(hidden, weight, shifted, **chunking)
        loss.backward()

    return step, [weight, hidden, labels, shifted]


def planned_lm_head(config: PretrainedConfig, seq: int, device: torch.device, chunking: dict | None) -> int:
    """The planner's peak of ``lm_head_case``: the same code on fake tensors, bytes counted by ``LiveBytes``
    (nothing allocated), plus the tensors it is handed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        step, static = lm_head_case(config, seq, device, chunking)
        tracker = LiveBytes(static)
        with tracker:
            step()
        return sum(t.untyped_storage().nbytes() for t in static) + tracker.mark().peak


def measure_lm_head(config: PretrainedConfig, seq: int, device: torch.device, chunking: dict | None) -> dict:
    """``lm_head_case``'s peak on ``device`` (the allocator's on CUDA), or the out-of-memory error."""
    try:
        step, static = lm_head_case(config, seq, device, chunking)
        report = measure_peak(step, static, device)
        return {"measured_bytes": report.allocator_peak_bytes or report.peak_bytes, "tracker_bytes": report.peak_bytes}
    except Exception as exc:
        if not is_allocation_failure(exc):
            raise
        return {"error": f"OOM: {_first_line(exc)}"}
    finally:
        step = static = None  # noqa: F841  (drop the tensors before freeing)
        free_memory()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]


def part_lm_head(run: Run, save: Callable[[dict], None]) -> dict:
    s = run.setting
    run.models.drop()  # the op alone on the device
    out: dict = {"model": MODEL, "seq_len": s.lm_head_seq, "dtype": "bfloat16", "paper_gb": PAPER_LM_HEAD_GB,
                 "rows": []}
    for label, chunking in LM_HEAD_SETTINGS:
        if run.left() <= 0:
            out["rows"].append({"setting": label, "skipped": "time"})
            continue
        row = {"setting": label, "options": chunking, **measure_lm_head(s.config, s.lm_head_seq, run.device, chunking)}
        try:  # after the real run: a fake trace must not be the first to probe (and cache) a CUDA kernel choice
            row["planned_bytes"] = planned_lm_head(s.config, s.lm_head_seq, run.device, chunking)
        except Exception as exc:  # fake tensors lacking a kernel: say so, keep the measurement
            row["planner_error"] = f"{type(exc).__name__}: {_first_line(exc)}"
        log(f"LM head {label} S={s.lm_head_seq}: measured {_size(row.get('measured_bytes'))}, "
            f"planned {_size(row.get('planned_bytes'))}")
        out["rows"].append(row)
        save(out)
    return out


# ------------------------------------------------------------------------------------------------- the runner
@dataclass(frozen=True)
class Part:
    name: str
    title: str
    share: float  # planned seconds on the GPU (scaled to the budget)
    run: Callable[[Run, Callable[[dict], None]], dict]
    home: str  # the experiment folder whose results/ holds it on CUDA
    needs: tuple[str, ...] = ()  # modules it cannot run without


PARTS = (
    Part("exactness", "a. CUDA-only tests, bf16 exactness per family", 60, part_exactness, "gpu", ("pytest",)),
    Part("validation", "b. planner vs measured peak, Llama3-8B steps", 80, part_validation, "planner"),
    Part("max_length", "c. Table 2: Llama3-8B max length", 180, part_max_length, "table2"),
    Part("throughput", "d. Table 6: MsT vs AC tokens/s at 8K", 90, part_throughput, "table6"),
    Part("lm_head", "e. Tables 13-16: LM-head op at S=80K", 20, part_lm_head, "table13_16"),
    Part("ladder", "e. long-context ladder: bytes per token", 50, part_ladder, "planner"),
)


def results_path(part: Part, out: Path | None) -> Path:
    """``<experiment>/results/gpu_<part>.json`` on CUDA; ``out/gpu_<part>.json`` when ``--out`` is given."""
    return (out or ROOT / "experiments" / part.home / "results") / f"gpu_{part.name}.json"


def packages() -> dict[str, str | None]:
    """Versions of the optional packages (None: not installed), so every result says what the run had."""
    found = {}
    for name in OPTIONAL:
        try:
            found[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def cap_memory(setting: Setting) -> int:
    """The bytes a step may use: on CUDA the GPU's memory, capped at 80 GiB (``set_per_process_memory_fraction``)
    on bigger cards; on CPU the emulated budget."""
    if setting.device != "cuda":
        return setting.emulated_bytes
    total = torch.cuda.get_device_properties(0).total_memory
    if total > CAP_GIB * GiB:
        torch.cuda.set_per_process_memory_fraction(CAP_GIB * GiB / total, 0)
    return min(total, int(CAP_GIB * GiB))


def run_parts(setting: Setting, parts: tuple[Part, ...], budget_s: float, out: Path | None,
              clock: Callable[[], float] = time.monotonic) -> dict:
    """Every part in order under one budget; returns the summary (also written after each part)."""
    budget = Budget(budget_s, {p.name: p.share for p in parts}, clock)
    run = Run(setting, budget, cap_memory(setting), TrainModel(setting))
    header = {"environment": environment(setting.device),
              "run": {"mode": "smoke" if setting.device == "cpu" else "gpu", "budget_s": budget_s,
                      "card_bytes": run.card_bytes, "packages": packages(),
                      "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}}
    summary = {**header, "parts": {}}
    summary_dir = out or ROOT / "experiments" / "gpu" / "results"
    try:
        for part in parts:
            run.part = part.name
            missing = [m for m in part.needs if importlib.util.find_spec(m) is None]
            if not run.budget.can_start(part.name):
                summary["parts"][part.name] = {"status": "skipped: time", "seconds_left": run.left()}
            elif missing:
                summary["parts"][part.name] = {"status": f"skipped: needs {', '.join(missing)}"}
            else:
                summary["parts"][part.name] = {"status": "killed"}  # until it returns
                summary["parts"][part.name] = run_part(part, run, header, results_path(part, out))
            log(f"{part.name}: {summary['parts'][part.name]['status']}")
            write_summary(summary, summary_dir)
    finally:
        run.models.drop()
        summary["elapsed_s"] = run.budget.elapsed()
        write_summary(summary, summary_dir)
        print(markdown(summary), flush=True)  # the closing table, also when run.sh's timeout stops the run
    return summary


def run_part(part: Part, run: Run, header: dict, path: Path) -> dict:
    """One part: its JSON (environment header first) written at the start, after every item and at the end."""
    start = time.monotonic()
    meta = {"part": part.name, "title": part.title, "budget_share_s": run.budget.share_s[part.name]}
    latest: dict = {}  # what the part saved last: a killed part is rewritten from it with status "killed"

    def save(data: dict, status: str = "running") -> None:
        latest["data"] = data
        write_json(path, {**header, **meta, "status": status, "seconds": time.monotonic() - start, **data})

    log(f"{part.title} ({run.left():.0f} s)")
    save({})
    status = "killed"
    try:
        data = part.run(run, save)
        status = "done"
    except Exception:  # a bug in one part must not cost the GPU time of the others: recorded, exit 1 at the end
        data = {**latest.get("data", {}), "traceback": traceback.format_exc()}
        status = "failed"
        log(data["traceback"])
    finally:
        if status == "killed":
            save(latest.get("data", {}), status)
    run.results[part.name] = data
    save(data, status)
    return {"status": status, "seconds": time.monotonic() - start, "file": str(path), "table": table_rows(part, data)}


# ---------------------------------------------------------------------------------------------- the summary
def _size(n: float | None) -> str:
    """Bytes in GiB (MiB below 1 GiB: the smoke run's tiny shapes)."""
    if n is None:
        return "—"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2 ** 20:.2f} MiB"


def _tokens(n: int | None) -> str:
    return "—" if n is None else (f"{n / 1000:.1f}K" if n >= 1000 else str(n))


def table_rows(part: Part, data: dict) -> list[list[str]]:
    """The part's lines of the closing table: [what, measured, planner, paper]."""
    rows = []
    if part.name == "exactness" and data.get("bf16"):
        checked = [c for c in data["bf16"] if "no_worse_than_vanilla" in c]
        ratio = max((c["grad_rel_err"]["mst"] / c["grad_rel_err"]["vanilla"] for c in checked), default=None)
        rows.append([f"bf16 MsT vs fp32, no worse than vanilla (S={checked[0]['seq_len'] if checked else '—'})",
                     f"{sum(c['no_worse_than_vanilla'] for c in checked)}/{len(data['bf16'])} families"
                     + (f", worst gradient error ratio {ratio:.3f}" if ratio else ""), "", ""])
    if part.name == "exactness" and "tests" in data:
        t = data["tests"]
        rows.append(["CUDA-only tests", "timed out" if t.get("timed_out") else
                     f"{t.get('passed', 0)} passed, {t.get('failed', 0) + t.get('errors', 0)} failed, "
                     f"{t.get('skipped', 0)} skipped", "", ""])
    for r in data.get("rows", []) if part.name in ("validation", "ladder") else []:
        what = f"{r['strategy']} step peak, S={_tokens(r['seq_len'])}"
        if "skipped" in r:
            rows.append([what, "skipped: time", "", ""])
        else:
            err = f" ({r['error_pct']:+.1f}%)" if "error_pct" in r else ""
            rows.append([what, _size(r["measured_bytes"]) if r["measured_bytes"] else r["error"],
                         _size(r["planned_bytes"]) + err, ""])
    own = {r.get("strategy") for r in data.get("rows", [])}
    for strategy, sl in ((k, v) for k, v in data.get("slopes", {}).items() if k in own):
        rows.append([f"{strategy} bytes/token, S={_tokens(sl['from'])}-{_tokens(sl['to'])}",
                     f"{sl['measured_bytes_per_token']:,.0f} (max ~{_tokens(sl['extrapolated_max_seq_len'])})",
                     f"{sl['planned_bytes_per_token']:,.0f} (max {_tokens(sl['planner_max_seq_len'])})", ""])
    for strategy, c in data.get("cells", {}).items():
        if "max_seq_len" not in c:
            rows.append([f"{strategy} max length", c.get("skipped", "unfinished"), _tokens(c.get("planner")), ""])
            continue
        above = f", {_tokens(c['first_failure'])} fails" if c["first_failure"] else (", cap" if c["capped"] else "")
        rows.append([f"{strategy} max length ({len(c['trials'])} probes)", f"{_tokens(c['max_seq_len'])} fits{above}",
                     _tokens(c["planner"]), PAPER_MAX_LENGTH[strategy]])
    for g in data.get("groups", []):
        if "cells" not in g:
            rows.append([f"MsT/AC tokens/s, b={g['batch']}", g.get("skipped", ""), "", ""])
            continue
        tps = " / ".join(f"{v} {c['tokens_per_s']:,.0f}" if "tokens_per_s" in c else f"{v} OOM"
                         for v, c in g["cells"].items())
        rows.append([f"MsT/AC tokens/s, b={g['batch']}, S={_tokens(data['seq_len'])}",
                     (f"{g['mst/ac']:.3f} ({tps})" if g["mst/ac"] else tps), "",
                     f"{g['paper']['mst/ac']:.3f}" if g["paper"] else "not printed"])
    for r in data.get("rows", []) if part.name == "lm_head" else []:
        measured = r.get("skipped") or r.get("error") or _size(r.get("measured_bytes"))
        paper = PAPER_LM_HEAD_GB.get(r["setting"])
        rows.append([f"LM head {r['setting']}, S={_tokens(data['seq_len'])}", measured,
                     _size(r.get("planned_bytes")), paper or "not printed"])
    return rows


def markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [f"# GPU run: {env['device']}, torch {env['versions']['torch']}, transformers "
             f"{env['versions']['transformers']}, {env['date']}", "",
             f"Budget {summary['run']['budget_s']:.0f} s, {summary.get('elapsed_s', 0):.0f} s used; memory cap "
             f"{_size(summary['run']['card_bytes'])}; optional packages: "
             + ", ".join(f"{k} {v or 'missing'}" for k, v in summary["run"]["packages"].items()), "",
             "| part | status | what | measured | planner | paper |", "|---|---|---|---|---|---|"]
    for name, p in summary["parts"].items():
        rows = p.get("table") or [["", "", "", ""]]
        for i, row in enumerate(rows):
            lines.append("| " + " | ".join([name if i == 0 else "", p["status"] if i == 0 else "", *row]) + " |")
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, folder: Path) -> None:
    write_json(folder / "summary.json", summary)
    write_text(folder / "summary.md", markdown(summary))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the same code paths in seconds")
    parser.add_argument("--out", default=None,
                        help="folder for every results file (default: the experiments' results/ folders on CUDA, "
                             "a new temporary folder with --smoke)")
    parser.add_argument("--budget-s", type=positive_float, default=None,
                        help="wall-clock budget of the parts in seconds (default 480 on CUDA, 600 with --smoke)")
    parser.add_argument("--parts", nargs="+", choices=[p.name for p in PARTS], default=None,
                        help="run only these parts (default: all, in order)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run on a GPU, or pass --smoke for the CPU check")
    if args.smoke:  # tiny shapes gain nothing from a second thread, and spin-wait on a shared machine (40x slower)
        torch.set_num_threads(1)
    setting = smoke_setting() if args.smoke else full_setting()
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="mst-gpu-smoke-")) if args.smoke else None)
    parts = tuple(p for p in PARTS if args.parts is None or p.name in args.parts)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run.sh's timeout: finish the summary, then stop
    summary = run_parts(setting, parts, args.budget_s or setting.budget_s, out)
    print(f"results: {out or ROOT / 'experiments'}", file=sys.stderr)
    return int(any(p["status"] == "failed" for p in summary["parts"].values()))


if __name__ == "__main__":
    sys.exit(main())
