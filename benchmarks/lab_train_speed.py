"""Training-step time of the lab's `small` model (128x4x4, L = 256, batch 8) with the default
model's vocabulary (49,152) against a corpus-trained one (8,192), interleaved in one process
so the two see the same machine load. Prints the median seconds per step and tokens/s.

    python benchmarks/lab_train_speed.py [--rounds 4] [--position rope]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ropelab.evals.lab.positions import SIZES, build_config


def step_fn(position: str, vocab: int, length: int, batch: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(position, SIZES["small"], vocab, length, 0)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--position", default="rope")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    vocabs = (49152, 8192)
    steps = {v: step_fn(args.position, v, args.length, args.batch) for v in vocabs}
    for v in vocabs:
        steps[v]()  # warm-up
    times = {v: [] for v in vocabs}
    for _ in range(args.rounds):
        for v in vocabs:
            times[v].append(steps[v]())
    tokens = args.length * args.batch
    print(f"threads {torch.get_num_threads()}, {args.position}, small, L={args.length}, batch {args.batch}")
    for v in vocabs:
        med = statistics.median(times[v])
        print(f"vocabulary {v:6d}: median {med:.2f} s/step, {tokens / med:.0f} tokens/s  (steps: "
              + ", ".join(f"{t:.2f}" for t in times[v]) + ")")
    print(f"ratio 49152/8192: {statistics.median(times[49152]) / statistics.median(times[8192]):.2f}x")


if __name__ == "__main__":
    main()
