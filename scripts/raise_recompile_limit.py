"""Run a check script with dynamo's recompile limit raised from 8 to 64: each design's mask_mod (hand-written,
exported file, Spec) is its own code object, so one process compiles flex_attention 15+ times; past 8 torch
silently falls back to the unfused path (measured on CPU). Usage (the device runs of 7 Dec): python3 scripts/raise_recompile_limit.py ../shared/gpu/gpu_kernels_check.py 131072"""
import os
import runpy
import sys

import torch._dynamo

torch._dynamo.config.recompile_limit = 64
sys.argv = [os.path.abspath(sys.argv[1])] + sys.argv[2:]
sys.path[0] = os.path.dirname(sys.argv[0])  # as when the script runs itself
runpy.run_path(sys.argv[0], run_name="__main__")
