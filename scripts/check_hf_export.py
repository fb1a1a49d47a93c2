#!/usr/bin/env python3
"""Check `wick export --hf` against Hugging Face transformers.

Exports CKPT, loads it with transformers.LlamaForCausalLM, and compares its logits with wick's
own (`model:logits` through `wick run`) on the same tokens. Passes when the max abs difference
is below 1e-4.

    python scripts/check_hf_export.py [CKPT] [--wick target/release/wick]

Needs torch and transformers (see ../shared/bench/README.md for a venv); wick's own tests don't.
"""
import argparse, json, os, subprocess, sys, tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", nargs="?", default="checkpoints/full_model.ckpt")
    ap.add_argument("--wick", default="target/release/wick")
    ap.add_argument("--text", default="ROMEO: But soft, what light through yonder window breaks?")
    args = ap.parse_args()

    import torch
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "hf")
        subprocess.run([args.wick, "export", args.ckpt, "--hf", out], check=True)
        recipe = os.path.join(tmp, "logits.lua")
        with open(recipe, "w") as f:
            f.write(
                "local m = wick.load(wick.args[1])\n"
                "local ids = {}\n"
                "for i = 1, math.min(#wick.args[2], m.seq_len) do ids[i] = wick.args[2]:byte(i) end\n"
                "local rows = m:logits(ids)\n"
                "local parts = {}\n"
                "for i, r in ipairs(rows) do parts[i] = '[' .. table.concat(r, ',') .. ']' end\n"
                "print(string.format('{\"ids\": [%s], \"logits\": [%s]}', table.concat(ids, ','), table.concat(parts, ',')))\n"
            )
        res = subprocess.run(
            [args.wick, "run", recipe, "--ckpt-dir", os.path.join(tmp, "ck"), "--", args.ckpt, args.text],
            check=True, capture_output=True, text=True,
        )
        got = json.loads(res.stdout.strip().splitlines()[-1])
        model = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            ids = torch.tensor([got["ids"]], dtype=torch.long)
            ref = model(ids).logits[0]
        mine = torch.tensor(got["logits"], dtype=torch.float32)
        diff = (ref - mine).abs().max().item()
        print(f"tokens {len(got['ids'])}, vocab {ref.shape[-1]}, max abs diff of logits {diff:.3e}")
        if diff >= 1e-4:
            print("FAIL: exported model disagrees with wick", file=sys.stderr)
            sys.exit(1)
        print("OK: transformers.LlamaForCausalLM reproduces wick's logits")

        # The exported tokenizer.json: AutoTokenizer encodes to wick's ids.
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(out)
        for text in [args.text, "  spaces,\ttabs\nand ünïcode ✓"]:
            ids = tok.encode(text, add_special_tokens=False)
            want = list(text.encode("utf-8"))
            if ids != want:
                print(f"FAIL: AutoTokenizer gives {ids[:12]}... for {text!r}, wick {want[:12]}...", file=sys.stderr)
                sys.exit(1)
        print("OK: AutoTokenizer.from_pretrained encodes to wick's ids")

        # Greedy continuation: transformers' generate() and wick's model:generate agree.
        prompt = "ROMEO:"
        with open(recipe, "w") as f:
            f.write("local m = wick.load(wick.args[1])\n"
                    "io.write(m:generate(wick.args[2], { max_tokens = 24, temperature = 0 }))\n")
        res = subprocess.run(
            [args.wick, "run", recipe, "--ckpt-dir", os.path.join(tmp, "ck2"), "--", args.ckpt, prompt],
            check=True, capture_output=True, text=True,
        )
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=24, do_sample=False)
        theirs = tok.decode(gen[0][ids.shape[1]:].tolist())
        mine = res.stdout
        print(f"greedy: transformers {theirs!r}, wick {mine!r}")
        if not theirs.startswith(mine) and not mine.startswith(theirs):
            print("FAIL: greedy continuations differ", file=sys.stderr)
            sys.exit(1)
        print("OK: generate() continues the prompt as wick does")


if __name__ == "__main__":
    main()
