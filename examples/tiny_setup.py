"""What the three training examples share: the exported design module loaded from its file, a tiny
random Llama with a byte-level tokenizer (no download), and key-value retrieval examples laid out
as the design's segments. No Mask Studio import: this is what runs at training time.

Swap in your own model (`AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)`),
tokenizer and data; keep each example's `sizes` (tokens per segment of the design).
"""
import importlib.util
import random

import torch

WORDS = "delta zephyr lagoon kestrel amber basalt cobalt ember fjord garnet harbor indigo".split()


def load_design(path):
    """The module `maskstudio export --format transformers` wrote (or just `import design_attention`)."""
    spec = importlib.util.spec_from_file_location("design_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def byte_tokenizer():
    """256 byte tokens + <|endoftext|> (also the padding token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_model(tokenizer, seed=0, attn_implementation="eager"):
    """A random 2-layer Llama (hidden 64, 4 query heads, 2 key-value heads): trains in seconds on CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation(attn_implementation)
    return model


def kv_examples(design, tokenizer, n=64, seed=0):
    """n retrieval examples as the design's segments (instruction, doc0..doc3, question, answer):
    token ids per segment, the loss on the answer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        codes = [rng.randrange(10, 100) for _ in words]
        gold = rng.randrange(4)
        texts = {"instruction": "Read the records and answer with the number only.\n",
                 **{f"doc{i}": f"Record: the code for {w} is {c}.\n" for i, (w, c) in enumerate(zip(words, codes))},
                 "question": f"Question: what is the code for {words[gold]}?\nAnswer:", "answer": f" {codes[gold]}"}
        ids = {name: tokenizer(text, add_special_tokens=False)["input_ids"] for name, text in texts.items()}
        out.append(design.example(ids, loss_on=["answer"]))
    return out
