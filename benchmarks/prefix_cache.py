"""The prefix cache on a GPU (issue 25): one document, several questions; a chat; the first prefill's cost.

  python benchmarks/prefix_cache.py [--preset qwen3.5-9b] [--doc 100000] [--questions 5] [--question-tokens 100]
      [--chat-turns 3] [--chat-new 128]

Random bf16 weights, one process, cp = 1. Each scenario runs once to compile its programs on a throwaway
document (of the same lengths), then on a fresh one, which is what is timed:
- document + questions: time to first token of turn 1 (the document and the first question: a miss) and of
  turns 2.. (hits: the document's blocks restored, the rest prefilled as one piece), with the tokens reused;
  correctness first: each hit's next-token logits against a cold prefill of the same prompt (bf16);
- the first prefill with the cache on (the one-shot program that also captures the last boundaries' states
  and copies the KV out) against the same prefill with the cache off, median of 3;
- bytes the cache holds per cached document;
- a chat: each turn sends the previous prompt, its answer (`--chat-new` tokens, greedy) and a new message of
  `--question-tokens`; time to first token and generation time per turn, tokens reused.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3.5-9b")
    p.add_argument("--doc", type=int, default=100_000)
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--question-tokens", type=int, default=100)
    p.add_argument("--chat-turns", type=int, default=3)
    p.add_argument("--chat-first", type=int, default=8192, help="tokens of the chat's first prompt")
    p.add_argument("--chat-new", type=int, default=128)
    args = p.parse_args()

    import jax

    from pcp_jax.config import preset
    from pcp_jax.engine import Model
    from pcp_jax.weights import RandomSource

    cfg = preset(args.preset)
    model = Model(cfg, RandomSource(cfg, seed=0), dtype="bfloat16", compile_cache_dir="off")
    rng = np.random.default_rng(0)
    tokens = lambda n: rng.integers(0, cfg.vocab_size, n)

    def ttft(rows, max_new_tokens=0):
        t = time.perf_counter()
        state = model.prefill(rows, max_new_tokens=max_new_tokens)
        logits = np.asarray(state.logits)
        return time.perf_counter() - t, state, logits

    cache = model.enable_prefix_cache(64 << 30)

    def document_round():
        doc = tokens(args.doc)
        rows, reused = [], []
        for _ in range(args.questions):
            before = cache.stats()["tokens_reused"]
            seconds, _, logits = ttft([np.concatenate([doc, tokens(args.question_tokens)])])
            rows.append((seconds, logits))
            reused.append(cache.stats()["tokens_reused"] - before)
        return doc, rows, reused

    document_round()  # compiles the miss's and the hits' programs
    held0 = cache.stats()["bytes_held"]
    doc, rows, reused = document_round()
    held = cache.stats()["bytes_held"] - held0
    # correctness: the last question's hit against a cold prefill of the same prompt
    question = [np.concatenate([doc, tokens(args.question_tokens)])]
    _, _, hit = ttft(question)
    model.prefix_cache = None
    _, _, cold = ttft(question)
    rel = float(np.linalg.norm(hit - cold) / np.linalg.norm(cold))
    print(f"check: a hit's next-token logits against a cold prefill: relative difference {rel:.2e} "
          f"({'OK' if rel <= 6e-2 else 'TOO LARGE'} for bf16)", flush=True)

    # the first prefill with the cache on vs off (one shot either way)
    prompt = [tokens(args.doc + args.question_tokens)]
    off = statistics.median(ttft(prompt)[0] for _ in range(3))
    on = []
    for _ in range(3):
        model.enable_prefix_cache(64 << 30)  # empty each time: every run is a miss
        on.append(ttft(prompt)[0])
    on = statistics.median(on[1:] if len(on) > 1 else on)

    # a chat
    model.enable_prefix_cache(64 << 30)

    def chat_round():
        rows, out = [tokens(args.chat_first)], []
        for _ in range(args.chat_turns):
            before = model.prefix_cache_stats()["tokens_reused"]
            seconds, state, _ = ttft(rows, args.chat_new)
            t = time.perf_counter()
            answer = model.decode(state, args.chat_new)
            gen = time.perf_counter() - t
            out.append((len(rows[0]), seconds, gen, model.prefix_cache_stats()["tokens_reused"] - before))
            rows = [np.concatenate([rows[0], answer[0], tokens(args.question_tokens)])]
        return out

    chat_round()
    chat = chat_round()

    first = rows[0][0]
    print(f"\n{args.preset}, bf16, cp=1, document {args.doc} tokens + questions of {args.question_tokens}:")
    print("| turn | time to first token | / turn 1 | tokens reused |")
    for i, ((seconds, _), n) in enumerate(zip(rows, reused)):
        print(f"| {i + 1} | {seconds * 1e3:.1f} ms | {seconds / first:.1%} | {n} |")
    print(f"first prefill of {args.doc + args.question_tokens} tokens: cache off {off * 1e3:.1f} ms, cache on "
          f"{on * 1e3:.1f} ms ({on / off - 1:+.1%}); bytes held for the document's entries: {held / 2**30:.2f} GiB "
          f"({held / 2**30 / args.doc * 1e5:.2f} GiB per 100k tokens)")
    print(f"chat, {args.chat_turns} turns of {args.chat_new} generated tokens:")
    print("| turn | prompt tokens | time to first token | generation | tokens reused |")
    for i, (n, seconds, gen, used) in enumerate(chat):
        print(f"| {i + 1} | {n} | {seconds * 1e3:.1f} ms | {gen:.2f} s ({gen / args.chat_new * 1e3:.1f} ms/token) | "
              f"{used} |")
    del jax
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
