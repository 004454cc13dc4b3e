#!/usr/bin/env python3
"""The quality cost of a quantized KV cache (`kv_cache_type`), measured like `wicore quantize
--check` measures a quantized model: the next-token distributions at every position of its
built-in prompts, with an f16 cache and with each quantized one (flash attention on for all),
compared by mean KL divergence and top-1 agreement (wicore_cpp/quantize/check.py).

    python tools/kv_cache_quality.py models/bench-gemma3-q8_0.gguf
"""

from __future__ import annotations

import argparse
import sys

from wicore_cpp.quantize.check import compare_kv_cache_types


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="GGUF model file")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads; 0: physical cores")
    args = parser.parse_args(argv)
    results = compare_kv_cache_types(args.model, n_threads=args.threads)
    lines = ["| `kv_cache_type` | KV bytes vs f16 | mean KL (nats) | max KL | top-1 agreement |",
             "|---|---:|---:|---:|---:|",
             "| f16 | 1.00 | 0 | 0 | 100% |"]
    size = {"q8_0": 34 / 64, "q4_0": 18 / 64}  # block bytes per 32 values against f16's 64
    for kv, r in results.items():
        lines.append(f"| {kv} | {size[kv]:.2f} | {r.mean_kl:.4f} | {r.max_kl:.4f} | "
                     f"{100 * r.top1_agreement:.1f}% |")
    n = next(iter(results.values()))
    lines.append(f"\n({n.n_positions} positions of {n.n_prompts} prompts)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
