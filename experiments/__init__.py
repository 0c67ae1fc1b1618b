"""The experiment harness: everything the paper's tables need that a user training with ``mst`` does not.

One importable package (installed with the repository by ``scripts/bootstrap.sh``); every script runs as a module
from the repository root, e.g. ``python -m experiments.table6.run``, and each table's ``run.sh`` does that for you.

Shared by the experiments (one home each):
- ``results``: the environment header every results file starts with (device, versions, git SHA, date), atomic
  writes of JSON / markdown / PNG, reading results back;
- ``cli``: the numeric argument types (finite, in range) and the scaled-model command line;
- ``models``: the one model builder (seeded random init or local weights; flash-attn when installed on CUDA) and
  the per-experiment model configs (scaled on CPU, full size on CUDA);
- ``budget``: the emulated-GPU memory budget of a CPU run (Table 2's rule, shared by Tables 2-6);
- ``search``: the length and batch searches, on top of ``mst.memory.length_search``;
- ``timing``: the round-robin timer (load on a shared machine hits every strategy alike);
- ``sequence_parallel``: one sequence-parallel training step (Table 12, LSS);
- ``data``: offline corpora, the GPT-2 BPE tokenizer, packing, LongAlpaca and the lm-eval task files (Table 7);
- ``train``: Table 7's training loop with exact resume, checkpoints, run logs and evaluation;
- ``readme``: the READMEs' result tables, generated from the committed results.
``max_length`` drives Tables 2-5; ``gpu/`` runs every GPU claim in one timed script (``bash experiments/gpu/run.sh``).
"""
