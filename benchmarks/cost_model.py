"""The cost model of README "Running at scale", as arithmetic (estimates, not measurements).

    python benchmarks/cost_model.py

FLOPs of one perplexity forward over n tokens (batch 1, no KV cache): linear layers
2·P_linear·n (P_linear: every weight matrix including the LM head, which the harness applies
to every position in chunks) plus causal attention 2·n²·h per layer (QKᵀ and AV over the
lower triangle, 2 FLOPs a multiply-add; flash-style kernels skip the upper half; ropelab's
relative methods split the same triangle into a near band and a far part).

Memory (bfloat16, 2 bytes): weights 2·P; activations per token of one layer, the largest
live set: residual stream, normed input, q, attention output, layer output (5·h values),
k and v (2·kv_heads·head_dim), the MLP's gate, up and their product (3·I), and the norms'
float32 upcast (h values at 4 bytes). Memory mode keeps the MLP and norm terms to `chunk`
tokens. Attention kernels' own workspace (O(n) for flash-style kernels) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def linear_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate
        return self.layers * per_layer + h * self.vocab  # + LM head

    @property
    def params(self) -> int:
        return self.linear_params + self.hidden * self.vocab  # + input embeddings (untied)

    def flops(self, n: int) -> float:
        return 2.0 * self.linear_params * n + 2.0 * n * n * self.hidden * self.layers

    def activation_bytes_per_token(self, memory_mode: bool) -> tuple[float, float]:
        """(bytes per token that scale with n, bytes per token held only for a chunk)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        stream = 2 * (5 * h + 2 * kv)
        position_wise = 2 * 3 * self.intermediate + 4 * h
        return (stream, position_wise) if memory_mode else (stream + position_wise, 0.0)


LLAMA3_8B = Model("Llama-3-8B", 32, 4096, 32, 8, 14336, 128256)
LLAMA3_70B = Model("Llama-3-70B", 80, 8192, 64, 8, 28672, 128256)
GB = 1e9
K = 1024


def memory_gb(model: Model, n: int, memory_mode: bool, chunk: int = 4096) -> float:
    per_n, per_chunk = model.activation_bytes_per_token(memory_mode)
    return (2 * model.params + per_n * n + per_chunk * chunk) / GB


def main() -> None:
    print("| model | length | TFLOP per forward | weights GB (bf16) | activations GB | with memory mode (chunk 4096) |")
    print("|---|---|---|---|---|---|")
    for model in (LLAMA3_8B, LLAMA3_70B):
        for n in (32 * K, 128 * K, 1024 * K):
            weights = 2 * model.params / GB
            print(f"| {model.name} | {n // K}k | {model.flops(n) / 1e12:,.0f} | {weights:.1f} | "
                  f"{memory_gb(model, n, False) - weights:.1f} | {memory_gb(model, n, True) - weights:.1f} |")
    # The sweep: 7 methods x 4 lengths x 10 documents, one forward per job, on 8 GPUs
    lengths = [16 * K, 32 * K, 64 * K, 128 * K]
    sustained = 400e12  # FLOP/s per GPU: an H100's ~989 dense bf16 peak at ~40% utilisation (assumed)
    for model, gpus_per_rank in ((LLAMA3_8B, 1), (LLAMA3_70B, 2)):
        total = 7 * 10 * sum(model.flops(n) for n in lengths)
        ranks = 8 // gpus_per_rank  # a device-mapped model runs one GPU at a time: a rank computes at one GPU's rate
        minutes = total / (ranks * sustained) / 60
        print(f"sweep {model.name}, 7 methods x {'/'.join(f'{n // K}k' for n in lengths)} x 10 documents: "
              f"{total / 1e18:.2f} EFLOP over {ranks} ranks x {gpus_per_rank} GPU(s) "
              f"-> about {minutes:.0f} min at {sustained / 1e12:.0f} TFLOP/s per rank")


if __name__ == "__main__":
    main()
