"""Every GPU claim in one timed run: ``bash experiments/gpu/run.sh`` on one CUDA GPU, ``--smoke`` on CPU (run.py)."""
