"""GPU check of the run package: compiled FlexAttention == eager on CUDA for text models with
per-layer / per-head rules and full blocks, at lengths past one block (random weights).

    python scripts/gpu_runner_check.py [ARCH ...]     # on a CUDA machine; default llama mistral

Measured on an H200 (torch 2.11): llama and mistral at 3,360 tokens, max |d logit| 1.2e-6 / 9.2e-7.
Gemma2 (a score_mod for soft-capping and its own window) fails inside torch.compile's dynamic-shape
lowering ("unbacked_bindings") — the same before and after the run package restructure.
"""
import sys
import time

import torch

sys.path.insert(0, "tests")
from test_runner import ByteTokenizer  # noqa: E402  (the tests' byte tokenizer: no download)

from maskstudio import run as R  # noqa: E402


def small(arch: str) -> R.LoadedModel:
    """A random-weight model with head_dim 32 (compiled FlexAttention needs >= 16)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, max_position_embeddings=4096)
    cfg = {"llama": lambda: tf.LlamaConfig(**common),
           "mistral": lambda: tf.MistralConfig(**common, sliding_window=200),
           "gemma2": lambda: tf.Gemma2Config(**common, head_dim=32, sliding_window=200, attn_logit_softcapping=50.0)}[arch]()
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval().to("cuda")
    return R.LoadedModel(model, ByteTokenizer(), f"small-{arch}", torch.device("cuda"))

words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi " * 40
spec = {"segments": [{"name": "a", "text": words[:1200]}, {"name": "b", "text": words[1200:2600]},
                     {"name": "c", "text": words[2600:]}],
        "mask": {"rules": [{"q": "a", "k": "a", "pattern": "full"},
                           {"q": "c", "k": "a", "pattern": "none", "heads": [1]},
                           {"q": "b", "k": "b", "pattern": "window", "size": 300, "layers": [0]}],
                 "overlays": [{"op": "or", "q": "*", "k": "a", "pattern": "first", "size": 4}]}}
for arch in sys.argv[1:] or ("llama", "mistral"):
    lm = small(arch)
    eager = R.run(spec, lm, attentions=False, backend="eager")
    t0 = time.perf_counter()
    flex = R.run(spec, lm, attentions=False, backend="flex")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    R.run(spec, lm, attentions=False, backend="flex")
    again = time.perf_counter() - t0
    diff = (flex.logits - eager.logits).abs().max().item()
    print(f"{arch:8s} N={len(flex.input_ids)} flex vs eager max|dlogit| {diff:.2e}  "
          f"(first flex run {first:.1f} s incl. compile, second {again:.2f} s)")
    assert diff < 2e-2, arch
print("ok")
