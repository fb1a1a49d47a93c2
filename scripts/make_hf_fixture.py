#!/usr/bin/env python3
"""Write tests/fixtures/hf_tiny_llama: a tiny random LlamaForCausalLM saved by transformers'
own save_pretrained (GQA, untied head, rope_theta 500000, bf16 weights on disk), with the logits
transformers computes for a few token sequences, for wick's import test.

    python scripts/make_hf_fixture.py [OUT]

Needs torch and transformers (see ../shared/bench/README.md for a venv); wick's tests only
read the files it wrote, which are committed.
"""
import json, os, sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/hf_tiny_llama"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    # Larger than the default init so the logits are not all near zero.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    # The reference: the saved bf16 weights loaded afresh in f32 (a model cast to bf16 and back
    # would keep a bf16-rounded rotary table).
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cases = [[5, 17, 250, 3, 99, 42, 7], list(range(10, 40))]
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0].tolist() for ids in cases]
    with open(os.path.join(out, "expected_logits.json"), "w") as f:
        json.dump({"ids": cases, "logits": logits, "transformers": __import__("transformers").__version__}, f)
    print("wrote", out)


if __name__ == "__main__":
    main()
