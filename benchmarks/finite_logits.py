"""Do the logits stay finite at twice the training length? One forward per method over
random token ids on an embedded default model; the LM head runs on the last 16 positions
only (the full N × vocab logits would be 17 GB at 64k × 262k in bfloat16).

    python benchmarks/finite_logits.py --model gemma3-270m --length 65536 \
        --methods "rerope:window=16384;leaky-rerope:window=8192,scale=16"

Frequency-only methods can be given as `rerope:window=<≥ length>,frequency_method=yarn(scale=2)`:
a ReRoPE window at or beyond the sequence is plain RoPE (tested), so this is the same
function through ropelab's O(S)-memory attention instead of transformers' own attention
path (at 8k on Gemma-3-270m, 2.5× slower than ropelab's here; not tried at 64k).
"""

from __future__ import annotations

import argparse
import time

import torch

from ropelab import patches as P


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--methods", required=True, help="';'-separated method specs ('none' = unpatched)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    model, _ = P.load_default_model(args.model, dtype=getattr(torch, args.dtype))
    ids = torch.randint(10, 20000, (1, args.length), generator=torch.Generator().manual_seed(0))
    softcap = getattr(model.config, "final_logit_softcapping", None)
    print(f"| method | finite | max abs logit | forward s |\n|---|---|---|---|", flush=True)
    with torch.inference_mode():
        for spec in args.methods.split(";"):
            start = time.perf_counter()
            try:
                handle = None if spec == "none" else P.patch(model, spec)
                try:
                    hidden = model.model(ids).last_hidden_state[:, -16:]
                finally:
                    if handle is not None:
                        handle.undo()
                logits = model.lm_head(hidden).float()
                if softcap:
                    logits = softcap * torch.tanh(logits / softcap)
                finite = bool(torch.isfinite(logits).all())
                peak = logits.abs().max().item() if finite else float("nan")
                print(f"| `{spec}` | {finite} | {peak:.2f} | {time.perf_counter() - start:.0f} |", flush=True)
            except Exception as error:  # one failing method must not lose the others
                print(f"| `{spec}` | error: {error!r} | | |", flush=True)


if __name__ == "__main__":
    main()
