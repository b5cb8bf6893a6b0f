"""Generation benchmark: prefill time and decode tokens/s of `fedlora-jax generate`'s decoder on
SmolLM2-135M-Instruct (the offline default model), with the KV cache and without it (the full
forward re-run for every token), greedy, a fixed number of new tokens (no EOS stop), after one
warm-up (compilation) run; median over repeats.

    python experiments/bench/generate_bench.py [--new-tokens 64] [--repeats 3] [--out FILE.json]
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax

from fedlora_jax.models.hub import load_model
from fedlora_jax.runs import generate as G

PROMPT = "Explain in a few sentences what differential privacy protects in federated learning."


def bench(lm, ids, new_tokens: int, repeats: int, use_cache: bool) -> dict:
    run = lambda: G.generate_ids(lm.definition, lm.base, lm.lora, [ids], new_tokens, use_cache=use_cache)
    t = time.perf_counter()
    first = run()  # compiles the prefill and the decode step (or the full step)
    warm = time.perf_counter() - t
    runs = [run() for _ in range(repeats)]
    assert all(r.tokens == first.tokens for r in runs)
    return {
        "first_call_seconds": warm,
        "prefill_seconds": statistics.median(r.prefill_seconds for r in runs),
        "decode_tokens_per_second": statistics.median(r.tokens_per_second for r in runs),
        "decode_steps": runs[0].steps,
        "tokens": first.tokens[0],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default: 64)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (default: 3)")
    ap.add_argument("--no-uncached", action="store_true", help="skip the (slow) run without the cache")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    lm = load_model("default")
    ids = G.prompt_ids(lm.tokenizer, PROMPT)
    res = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
        },
        "model": "SmolLM2-135M-Instruct (GGUF, dequantized to float32)",
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
    }
    modes = [("kv_cache", True)] + ([] if args.no_uncached else [("no_cache", False)])
    for name, use_cache in modes:
        res[name] = bench(lm, ids, args.new_tokens, args.repeats, use_cache)
        r = res[name]
        print(
            f"{name:9s} prefill {r['prefill_seconds'] * 1e3:8.1f} ms (median of {args.repeats})  decode "
            f"{r['decode_tokens_per_second']:7.1f} tokens/s  first call (compile) {r['first_call_seconds']:.1f} s",
            flush=True,
        )
    if "no_cache" in res:
        res["same_tokens"] = res["kv_cache"]["tokens"] == res["no_cache"]["tokens"]
        res["decode_speedup"] = (
            res["kv_cache"]["decode_tokens_per_second"] / res["no_cache"]["decode_tokens_per_second"]
        )
        print(f"same tokens with and without the cache: {res['same_tokens']}; speedup {res['decode_speedup']:.1f}x")
    print("text:", repr(lm.tokenizer.decode(res["kv_cache"]["tokens"], skip_special_tokens=True)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
