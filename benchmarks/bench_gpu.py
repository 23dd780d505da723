"""Issue 9's GPU table: ropelab's attention and patched models against one plain causal
call and the unpatched model, bfloat16, batch 1, in one process, interleaved rounds.

    python benchmarks/bench_gpu.py --out gpu.json                      # CUDA: 16k..128k
    python benchmarks/bench_gpu.py --budget-s 240 --lengths 16k,32k --out gpu.json
    python benchmarks/bench_gpu.py --device cpu --lengths 256 --smoke --out smoke.json

Op level (Llama-3-8B attention shapes: 32 query heads, 8 KV heads, head dim 128):
`ropelab.attention.rotary_attention` for rerope, leaky-rerope, self-extend and dca (a
key-range method) on each backend present (`flex` always; `flash-attn` where flash_attn
imports) against one causal `scaled_dot_product_attention` call (and one `flash_attn_func`
causal call where flash-attn is present), and the unpatched model's attention (`rope+sdpa`:
RoPE applied in bfloat16 as transformers' Llama does, then the SDPA call). bfloat16 error at the smallest length: the
largest absolute difference from a float64 reference computed on the device in row chunks
(brute-force logits for the plain call and the relative methods, after the equations of
tests/rope/test_attention.py's `reference`; ropelab's exact eager backend in float64 for
dca), reported with its ratio to the plain call's error (issue 9's bar: ≤ 2×).

Model level: prefill time and peak, and per-token decode time against a cache of the
prefill's length, patched (`key_cache="kept"`, and "lean" with `--key-cache kept,lean`)
against the unpatched model (`sdpa`, and `flash_attention_2` where installed), for the
embedded SmolLM2-135M (ropelab.load_default_model; where its package is absent, a random
model of the same config, said so in the table) and a Llama config with Llama-3-8B shapes,
random weights and `--llama-layers` layers (default 4). KV cache bytes: keys and values
plus any rotated key forms kept (patches/key_cache.py), against the unpatched cache.

Timing: CUDA events on CUDA (perf_counter on CPU); each case is warmed up once per length
(FlexAttention compiles then: the warm-up's time is printed), then `--rounds` rounds visit
every case in turn; the table gives the median over rounds and the median (min-max) of the
per-round ratio to the plain call or unpatched model. Peak: `torch.cuda.max_memory_allocated`
after `reset_peak_memory_stats`, minus what was allocated before the call (the call's own
working memory); ratio against the baseline's. A case that runs out of memory, or a length
whose inputs do not fit, is reported as skipped with the reason, not crashed on; once
`--budget-s` seconds have passed no new case is started (those left are marked skipped).
`--smoke` shrinks every shape (2+1 heads, head dim 32, 2-layer models) so the plumbing runs
on a CPU in seconds; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

METHODS = ["rerope:window=4096", "leaky-rerope:window=2048,scale=16", "self-extend:window=1024,group=8",
           "dca:chunk_size=6144,local_window=1024"]
SMOKE_METHODS = ["rerope:window=64", "leaky-rerope:window=32,scale=16", "self-extend:window=32,group=4",
                 "dca:chunk_size=96,local_window=16"]
MODEL_METHODS = ["rerope:window=4096", "leaky-rerope:window=2048,scale=16", "self-extend:window=1024,group=8"]
SMOKE_MODEL_METHODS = ["rerope:window=64", "leaky-rerope:window=32,scale=16", "self-extend:window=32,group=4"]
# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json); layers set by --llama-layers.
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
# SmolLM2-135M's config (as transformers reads it from the embedded GGUF), for the random stand-in.
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               num_hidden_layers=30, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
               rms_norm_eps=1e-5, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            num_hidden_layers=2, vocab_size=256, rope_theta=10000.0, max_position_embeddings=128,
            rms_norm_eps=1e-5, tie_word_embeddings=False)


def parse_length(text: str) -> int:
    text = text.strip().lower()
    value = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    if value < 1:
        raise ValueError(f"--lengths: length={text!r}: must be >= 1")
    return value


class Clock:
    """Stops new cases after the budget; times calls with CUDA events (perf_counter on CPU)."""

    def __init__(self, device, budget_s):
        self.device, self.budget_s, self.start = device, budget_s, time.monotonic()

    def left(self) -> bool:
        return self.budget_s is None or time.monotonic() - self.start < self.budget_s

    def time(self, fn):
        """(result, seconds, extra peak bytes or None) of one call of fn."""
        import torch

        if self.device.type != "cuda":
            t0 = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t0, None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        stop.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(stop) / 1000, torch.cuda.max_memory_allocated() - before


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def failure(exc: BaseException) -> str:
    """The reason a case is skipped: out of memory, or the error (its traceback to stderr, the
    bench log: one failing case, e.g. a kernel that does not compile, must not end the run)."""
    if is_oom(exc):
        return f"out of memory: {str(exc).splitlines()[0][:160]}"
    traceback.print_exception(exc, file=sys.stderr)
    return f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summarise(rows: list[dict], base_case: str) -> None:
    """Per row: median seconds, and the per-round ratio to `base_case` (same length, level)."""
    for row in rows:
        if row.get("status") != "ok":
            continue
        base = next((r for r in rows if r["case"] == base_case and r["length"] == row["length"]
                     and r.get("status") == "ok" and r.get("model") == row.get("model")), None)
        for key in [k for k in ("seconds", "prefill_s", "decode_s") if k in row]:
            times = row[key]
            row[key + "_median"] = statistics.median(times) if times else None
            if base is not None and base[key] and times:
                ratios = sorted(a / b for a, b in zip(times, base[key]))
                row[key + "_ratio"] = [statistics.median(ratios), ratios[0], ratios[-1]]
        for key in ("peak_bytes", "prefill_peak_bytes"):
            if base is not None and row.get(key) and base.get(key):
                row[key.replace("bytes", "ratio")] = row[key] / base[key]
        if base is not None and row.get("kv_bytes") and base.get("kv_bytes"):  # rotated forms kept count too
            row["cache_ratio"] = (row["kv_bytes"] + row["key_form_bytes"]) / base["kv_bytes"]


# -- op level ----------------------------------------------------------------------------------


def float64_reference(q, k, v, method, inv_freq, rows: int):
    """Causal attention in float64, `rows` query rows at a time (no T×S matrix whole); with
    `method` None plain causal attention of unrotated q and k, else RoPE with the method's
    relative map (tests/rope/test_attention.py's `reference`, chunked)."""
    import torch

    from ropelab import apply_rotary, cos_sin

    B, H, T, D = q.shape
    g = H // k.shape[1]
    S = k.shape[2]
    dev = q.device
    kd, vd = k.double(), v.double()
    pos = torch.arange(S, device=dev)[None]
    freq = inv_freq.double().to(dev)
    rel = None if method is None else method.relative

    def rot(x, p, f):
        c, s = cos_sin(p, f, 1.0, "half", torch.float64)
        return apply_rotary(x, c[:, None], s[:, None], "half")

    if method is not None:
        k_near = rot(kd, pos, freq)
        if rel is not None:
            k_far = rot(kd, rel.far_key_position(pos), freq / rel.far_freq_divisor)
    out = torch.empty(B, H, T, v.shape[-1], dtype=torch.float64, device=dev)
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        qpos = pos[:, S - T + t0 : S - T + t1]
        qb = q[:, :, t0:t1].double()
        for kv in range(k.shape[1]):  # one KV head (its g query heads) at a time: memory g·rows·S
            qh = qb[:, kv * g : (kv + 1) * g]
            if method is None:
                logits = qh @ kd[:, kv : kv + 1].transpose(-1, -2)
            else:
                logits = rot(qh, qpos, freq) @ k_near[:, kv : kv + 1].transpose(-1, -2)
                if rel is not None:
                    r = qpos[0, :, None] - pos[0, None, :]
                    far = rot(qh, rel.far_query_position(qpos), freq / rel.far_freq_divisor) @ \
                        k_far[:, kv : kv + 1].transpose(-1, -2)
                    logits = torch.where(r >= rel.window, far, logits)
                    del far
            logits = logits * D**-0.5
            hide = torch.arange(S, device=dev)[None, :] > qpos[0, :, None]
            logits.masked_fill_(hide, -math.inf)
            out[:, kv * g : (kv + 1) * g, t0:t1] = torch.softmax(logits, -1) @ vd[:, kv : kv + 1]
            del logits
    return out


class plain_sdpa:
    """One causal SDPA call with grouped-query heads. On CUDA the math kernel (which forms the
    T×S scores) is excluded: flash first, else cuDNN / memory-efficient; where none takes
    `enable_gqa`, keys and values are expanded to every head once, outside the timed call."""

    def __init__(self, q, k, v, device):
        from torch.nn.attention import SDPBackend

        self.q, self.k, self.v, self.gqa = q, k, v, True
        self.kernels = None
        self.kernel = "default"
        if device.type != "cuda":
            return
        for kernels, name in (([SDPBackend.FLASH_ATTENTION], "flash"),
                              ([SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], "cudnn/efficient")):
            self.kernels, self.kernel = kernels, name
            for gqa in (True, False):
                self.gqa = gqa
                if not gqa:
                    g = q.shape[1] // k.shape[1]
                    self.k, self.v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
                    self.kernel = name + " (kv expanded outside the timed call)"
                try:
                    self()
                    return
                except RuntimeError as exc:
                    if is_oom(exc):
                        raise
                    self.k, self.v = k, v
        raise RuntimeError("no fused SDPA kernel takes these inputs")

    def __call__(self, q=None, k=None):
        """The call on the inputs it was built with, or on other (same-shaped) q and k."""
        import torch.nn.functional as F
        from torch.nn.attention import sdpa_kernel

        q = self.q if q is None else q
        if k is None:
            k = self.k
        elif not self.gqa:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        kw = dict(is_causal=True, enable_gqa=True) if self.gqa else dict(is_causal=True)
        if self.kernels is None:
            return F.scaled_dot_product_attention(q, k, self.v, **kw)
        with sdpa_kernel(self.kernels):
            return F.scaled_dot_product_attention(q, k, self.v, **kw)


def op_cases(args, backends, flash_fn):
    # rope+sdpa: the unpatched model's attention (RoPE applied in bfloat16, as transformers'
    # Llama does, then the plain call): its error is what a model's bf16 attention already has.
    cases = [("sdpa", "sdpa", None), ("rope+sdpa", "sdpa", "rope")]
    if flash_fn is not None:
        cases.append(("flash_attn_func", "flash_attn_func", None))
    for spec in args.methods:
        for backend in backends:
            cases.append((spec, backend, spec))
    return cases


def run_op_level(args, device, clock, backends, flash_fn, save) -> list[dict]:
    import torch

    import ropelab
    from ropelab import apply_rotary, cos_sin
    from ropelab.attention import rotary_attention

    H, Hkv, D = (2, 1, 32) if args.smoke else (32, 8, 128)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    dtype = torch.bfloat16
    cases = op_cases(args, backends, flash_fn)
    rows: list[dict] = []
    for n, length in enumerate(args.lengths):
        entries = {(c, b): {"level": "op", "length": length, "case": c, "backend": b, "status": "ok", "seconds": []}
                   for c, b, _ in cases}
        rows.extend(entries.values())

        def skip_all(reason, only=None):
            for key, e in entries.items():
                if (only is None or key in only) and e["status"] == "ok":
                    e.update(status="skipped", reason=reason)
                    e.pop("seconds", None)

        if not clock.left():
            skip_all("budget spent before this length started")
            continue
        try:
            g = torch.Generator(device=device).manual_seed(n)
            q = torch.randn(1, H, length, D, generator=g, device=device, dtype=dtype)
            k = torch.randn(1, Hkv, length, D, generator=g, device=device, dtype=dtype)
            v = torch.randn(1, Hkv, length, D, generator=g, device=device, dtype=dtype)
        except Exception as exc:  # the inputs themselves do not fit
            if not is_oom(exc):
                raise
            skip_all(f"inputs do not fit: {str(exc).splitlines()[0]}")
            free(device)
            continue
        methods = {spec: ropelab.parse_method(spec) for _, _, spec in cases if spec}
        try:
            sdpa = plain_sdpa(q, k, v, device)
            entries[("sdpa", "sdpa")]["sdpa_kernel"] = sdpa.kernel
        except Exception as exc:  # no fused kernel, or the expanded keys do not fit
            skip_all(failure(exc), only=[("sdpa", "sdpa"), ("rope+sdpa", "sdpa")])
            free(device)
        cos, sin = cos_sin(torch.arange(length, device=device), inv_freq.to(device), 1.0, "half", dtype)

        def call(case, backend, spec):
            if case == "sdpa":
                return sdpa()
            if case == "rope+sdpa":
                return sdpa(apply_rotary(q, cos, sin, "half"), apply_rotary(k, cos, sin, "half"))
            if case == "flash_attn_func":  # (B, S, H, D) layout
                return flash_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
            return rotary_attention(q, k, v, methods[spec], inv_freq, backend=backend)

        with torch.inference_mode():
            for round_ in range(args.rounds + 1):  # round 0: warm-up (compiles), not counted
                for c, b, spec in cases:
                    e = entries[(c, b)]
                    if e["status"] != "ok":
                        continue
                    if not clock.left():
                        if round_ == 0:
                            skip_all("budget spent", only=[(c, b)])
                        continue
                    try:
                        out, secs, peak = clock.time(lambda: call(c, b, spec))
                    except Exception as exc:
                        e.update(status="skipped", reason=failure(exc))
                        e.pop("seconds", None)
                        free(device)
                        continue
                    if round_ == 0:
                        e["warmup_s"] = secs
                        print(f"op {length} {c} [{b}]: warm-up {secs:.2f} s", file=sys.stderr, flush=True)
                        if n == 0 and args.error:
                            e["out"] = out  # kept for the error check below
                    else:
                        e["seconds"].append(secs)
                        e["peak_bytes"] = peak if e.get("peak_bytes") is None else max(e["peak_bytes"], peak)
                    del out
            if n == 0 and args.error:
                bf16_errors(entries, cases, q, k, v, methods, inv_freq, device)
        for e in entries.values():
            e.pop("out", None)
            if e["status"] == "ok" and not e["seconds"]:
                e.update(status="skipped", reason="budget spent before a timed round")
        del q, k, v
        free(device)
        summarise(rows, "sdpa")
        save(rows)  # a run killed later keeps the lengths finished
    return rows


def bf16_errors(entries, cases, q, k, v, methods, inv_freq, device) -> None:
    """Max |bf16 output - float64 reference| per case; ratio against the plain sdpa call's.
    Runs whatever the budget says (it is issue 9's accuracy bar, and seconds on a GPU)."""

    from ropelab.attention import rotary_attention

    rows = 1024 if device.type == "cuda" else 64  # float64 logits per chunk: 4 heads × 1024 × S (512 MB at 16k)
    refs = {}
    for c, b, spec in cases:
        e = entries[(c, b)]
        if e.get("out") is None:
            continue
        if spec not in refs:
            method = None if spec is None else methods[spec]
            try:
                if method is not None and method.key_range_parts:  # key-range method (dca): the exact eager path
                    ref = rotary_attention(q.double(), k.double(), v.double(), method, inv_freq, backend="eager")
                else:
                    ref = float64_reference(q, k, v, method, inv_freq, rows)
            except Exception as exc:
                e.pop("out")
                e["error_note"] = "float64 reference " + failure(exc)
                free(device)
                continue
            refs[spec] = ref
        diff = e.pop("out").double() - refs[spec]
        e["error_max"] = diff.abs().max().item()
        e["error_rms"] = diff.square().mean().sqrt().item()
        del diff
    base = entries[("sdpa", "sdpa")].get("error_max")
    flash = entries.get(("flash_attn_func", "flash_attn_func"), {}).get("error_max")
    base_rms = entries[("sdpa", "sdpa")].get("error_rms")
    rope = entries[("rope+sdpa", "sdpa")].get("error_max")
    for e in entries.values():
        if e.get("error_max") is not None and base:
            e["error_ratio_sdpa"] = e["error_max"] / base
            e["error_rms_ratio_sdpa"] = e["error_rms"] / base_rms
            if rope:
                e["error_ratio_rope"] = e["error_max"] / rope
            if flash:
                e["error_ratio_flash"] = e["error_max"] / flash
    refs.clear()
    free(device)


# -- model level -------------------------------------------------------------------------------


def build_models(args, device):
    """[(name, loader)]: each loader returns (model, note), the model in bfloat16 on device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import ropelab

    def random_model(shapes, layers=None, attn="sdpa"):
        config = LlamaConfig(**{**shapes, **({} if layers is None else {"num_hidden_layers": layers})},
                             attn_implementation=attn)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        return model.eval()

    def smollm2(attn):
        if args.smoke:
            return random_model(TINY, attn=attn), "smoke: tiny random Llama (2 layers)"
        try:
            model, _ = ropelab.load_default_model("smollm2-135m", dtype=torch.bfloat16)
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            return random_model(SMOLLM2, attn=attn), f"random weights, SmolLM2-135M config (GGUF absent: {exc})"
        model.set_attn_implementation(attn)
        return model.to(device).eval(), "embedded GGUF (ropelab.load_default_model)"

    def llama8b(attn):
        if args.smoke:
            return random_model(TINY, attn=attn), "smoke: tiny random Llama (2 layers)"
        return random_model(LLAMA3_8B, args.llama_layers, attn), \
            f"random weights, Llama-3-8B shapes, {args.llama_layers} layers"

    # Llama-3-8B shapes first: issue 9's bars are about such models, and the budget may end early.
    return [("llama3-8b-shapes", llama8b), ("smollm2-135m", smollm2)]


def cache_bytes(cache) -> tuple[int, int]:
    """(keys + values bytes, rotated-key-form bytes) over the cache's layers."""
    try:
        from ropelab.patches.key_cache import kept_forms
    except ImportError:  # the key cache's layout changed: count keys and values only
        kept_forms = None
    kv = forms = 0
    for layer in cache.layers:
        kv += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
        kept = kept_forms(layer) if kept_forms is not None else None
        if kept is not None:
            forms += kept.nbytes()
    return kv, forms


def run_model_level(args, device, clock, attns, save) -> list[dict]:
    import torch

    rows: list[dict] = []
    for name, loader in build_models(args, device):
        for attn in attns:
            cases = [("unpatched", None, None)] + [(f"{m} [{mode}]" if len(args.key_cache) > 1 else m, m, mode)
                                                    for m in args.model_methods for mode in args.key_cache]
            per_len = {L: {c: {"level": "model", "model": name, "attn": attn, "length": L, "case": c,
                               "status": "ok", "prefill_s": [], "decode_s": []} for c, _, _ in cases}
                       for L in args.model_lengths}
            for entries in per_len.values():
                rows.extend(entries.values())
            if not clock.left():
                for entries in per_len.values():
                    for e in entries.values():
                        e.update(status="skipped", reason="budget spent before this model was loaded")
                continue
            try:
                model, note = loader(attn)
            except Exception as exc:
                reason = "model did not load: " + failure(exc)
                for entries in per_len.values():
                    for e in entries.values():
                        e.update(status="skipped", reason=reason)
                free(device)
                continue
            for entries in per_len.values():
                for e in entries.values():
                    e["model_note"] = note
            vocab = model.config.vocab_size
            for L, entries in per_len.items():
                ids = torch.randint(0, vocab, (1, L + args.decode_steps + 1), device=device,
                                    generator=torch.Generator(device=device).manual_seed(L))
                for round_ in range(args.rounds + 1):  # round 0: warm-up
                    for c, method, mode in cases:
                        e = entries[c]
                        if e["status"] != "ok":
                            continue
                        if not clock.left():
                            if not e["prefill_s"]:
                                e.update(status="skipped", reason="budget spent")
                            continue
                        try:
                            one_model_case(model, method, mode, ids, L, args, clock, e, timed=round_ > 0)
                        except Exception as exc:
                            e.update(status="skipped", reason=failure(exc))
                            free(device)
                for e in entries.values():
                    if e["status"] == "ok" and not e["prefill_s"]:
                        e.update(status="skipped", reason="budget spent before a timed round")
                del ids
                free(device)
                summarise(rows, "unpatched")
                save(rows)
            del model
            free(device)
    summarise(rows, "unpatched")
    return rows


def one_model_case(model, method, mode, ids, L, args, clock, e, timed: bool) -> None:
    """Prefill L tokens (timed, peak), then decode_steps single tokens (each timed)."""
    import torch
    from transformers import DynamicCache

    import ropelab

    handle = None if method is None else ropelab.patch(model, method, key_cache=mode)
    try:
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            _, secs, peak = clock.time(lambda: model(ids[:, :L], past_key_values=cache, use_cache=True,
                                                     logits_to_keep=1))
            steps = []
            for t in range(L, L + args.decode_steps):
                _, s, _ = clock.time(lambda: model(ids[:, t : t + 1], past_key_values=cache, use_cache=True))
                steps.append(s)
            kv, forms = cache_bytes(cache)
            del cache
    finally:
        if handle is not None:
            handle.undo()
    if not timed:
        e["warmup_prefill_s"] = secs
        print(f"model {e['model']} {e['attn']} {L} {e['case']}: warm-up prefill {secs:.2f} s", file=sys.stderr,
              flush=True)
        return
    e["prefill_s"].append(secs)
    e["decode_s"].append(statistics.median(steps[1:] if len(steps) > 1 else steps))
    e["prefill_peak_bytes"] = peak if e.get("prefill_peak_bytes") is None else max(e["prefill_peak_bytes"], peak)
    e["kv_bytes"], e["key_form_bytes"] = kv, forms


# -- report ------------------------------------------------------------------------------------


def fmt(x, spec=".2f", scale=1.0):
    return "—" if x is None else format(x * scale, spec)


def ratio(r):
    return "—" if not r else f"{r[0]:.2f} ({r[1]:.2f}-{r[2]:.2f})"


def markdown(result: dict) -> str:
    lines = [f"device: {result['device_name']}; torch {result['torch']}; transformers {result['transformers']}; "
             f"backends: {', '.join(result['backends'])}; {result['rounds']} timed rounds"]
    lines += [f"note: {n}" for n in result["notes"]]
    lines += ["", "| length | case | backend | ms (median) | × sdpa (median, min-max) | extra peak MB | peak × sdpa "
              "| bf16 max err | err × sdpa | rms err × sdpa | err × rope+sdpa | err × flash |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["op"]:
        if r["status"] != "ok":
            lines.append(f"| {r['length']} | {r['case']} | {r['backend']} | skipped: {r['reason']} | | | | | | | | |")
            continue
        lines.append(f"| {r['length']} | {r['case']} | {r['backend']} | {fmt(r.get('seconds_median'), '.2f', 1e3)} "
                     f"| {ratio(r.get('seconds_ratio'))} | {fmt(r.get('peak_bytes'), '.0f', 2**-20)} "
                     f"| {fmt(r.get('peak_ratio'))} | {fmt(r.get('error_max'), '.2e')} "
                     f"| {fmt(r.get('error_ratio_sdpa'))} | {fmt(r.get('error_rms_ratio_sdpa'))} "
                     f"| {fmt(r.get('error_ratio_rope'))} | {fmt(r.get('error_ratio_flash'))} |")
    lines += ["", "| model | attn | length | case | prefill ms | prefill × unpatched | prefill peak MB | peak × "
              "unpatched | decode ms/token | decode × unpatched | KV MB | rotated keys MB | cache × unpatched |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["model"]:
        head = f"| {r['model']} | {r['attn']} | {r['length']} | {r['case']} "
        if r["status"] != "ok":
            lines.append(head + f"| skipped: {r['reason']} | | | | | | | | |")
            continue
        lines.append(head + f"| {fmt(r.get('prefill_s_median'), '.1f', 1e3)} | {ratio(r.get('prefill_s_ratio'))} "
                     f"| {fmt(r.get('prefill_peak_bytes'), '.0f', 2**-20)} | {fmt(r.get('prefill_peak_ratio'))} "
                     f"| {fmt(r.get('decode_s_median'), '.2f', 1e3)} | {ratio(r.get('decode_s_ratio'))} "
                     f"| {fmt(r.get('kv_bytes'), '.1f', 2**-20)} | {fmt(r.get('key_form_bytes'), '.1f', 2**-20)} "
                     f"| {fmt(r.get('cache_ratio'))} |")
    notes = sorted({f"{r['model']}: {r['model_note']}" for r in result["model"] if r.get("model_note")})
    lines += [""] + [f"model: {n}" for n in notes]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--lengths", default="16k,32k,64k,128k", help="op-level lengths")
    p.add_argument("--model-lengths", default=None, help="model-level lengths (default: --lengths)")
    p.add_argument("--methods", default=None, help="';'-separated op-level method specs")
    p.add_argument("--model-methods", default=None, help="';'-separated model-level method specs")
    p.add_argument("--key-cache", default="kept", help="'kept', 'lean' or 'kept,lean'")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=8, help="timed single-token steps per round (first dropped)")
    p.add_argument("--llama-layers", type=int, default=4)
    p.add_argument("--levels", default="op,model")
    p.add_argument("--no-error", dest="error", action="store_false", help="skip the float64 error check")
    p.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    p.add_argument("--op-share", type=float, default=0.4, help="share of --budget-s for the op level (both levels)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: plumbing only (CPU tests)")
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    try:
        args.lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
        args.model_lengths = ([parse_length(x) for x in args.model_lengths.split(",") if x.strip()]
                              if args.model_lengths else args.lengths)
    except ValueError as exc:
        p.error(str(exc))
    args.methods = [m for m in (args.methods or ";".join(SMOKE_METHODS if args.smoke else METHODS)).split(";") if m]
    args.model_methods = [m for m in (args.model_methods or ";".join(SMOKE_MODEL_METHODS if args.smoke
                                                                        else MODEL_METHODS)).split(";") if m]
    args.key_cache = [m for m in args.key_cache.split(",") if m]
    for mode in args.key_cache:
        if mode not in ("kept", "lean"):
            p.error(f"--key-cache={mode!r}: each mode must be 'kept' or 'lean'")
    args.levels = [x for x in args.levels.split(",") if x]
    for level in args.levels:
        if level not in ("op", "model"):
            p.error(f"--levels: level={level!r}: must be 'op' or 'model'")
    if args.budget_s is not None and args.budget_s < 0:
        p.error(f"--budget-s={args.budget_s}: must be >= 0")
    if not 0 < args.op_share < 1:
        p.error(f"--op-share={args.op_share}: must be between 0 and 1")
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds}: must be >= 1")
    if args.decode_steps < 1:
        p.error(f"--decode-steps={args.decode_steps}: must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    import ropelab

    for spec in args.methods + args.model_methods:
        ropelab.parse_method(spec)  # a bad spec fails here, before anything runs
    device = torch.device(args.device)
    notes = []
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device={args.device!r}: CUDA is not available here", file=sys.stderr)
        return 2
    if device.type == "cuda":
        # FlexAttention compiles per shape; the default recompile limit (8) would send later
        # lengths to the unfused path, which materialises T×S scores.
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):  # the newer name, then the older
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
                notes.append(f"torch._dynamo.config.{name} raised to >= 64")
                break
    backends = ["flex"]
    flash_fn = None
    try:
        from flash_attn import flash_attn_func

        flash_fn = flash_attn_func
        backends.append("flash-attn")
    except Exception as exc:
        notes.append(f"flash-attn not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:100]}): "
                     "flex backend only; the flash-attn rows stay owed")
    if device.type == "cpu":
        backends = ["cpu", "flex"]
        notes.append("CPU: times by perf_counter, no peak memory; flex runs eagerly")
    attns = ["sdpa"] + (["flash_attention_2"] if flash_fn is not None else [])
    start = time.monotonic()
    result = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "backends": backends,
              "attn_implementations": attns, "rounds": args.rounds, "smoke": args.smoke,
              "budget_s": args.budget_s, "notes": notes, "op": [], "model": [], "complete": False}
    both = len(args.levels) == 2 and args.budget_s is not None
    if "op" in args.levels:  # with both levels, the op level gets --op-share of the budget
        budget = args.budget_s * args.op_share if both else args.budget_s
        result["op"] = run_op_level(args, device, Clock(device, budget), backends, flash_fn,
                                    lambda rows: save(result, args, op=rows))
    if "model" in args.levels:
        budget = None if args.budget_s is None else max(0.0, args.budget_s - (time.monotonic() - start))
        result["model"] = run_model_level(args, device, Clock(device, budget), attns,
                                          lambda rows: save(result, args, model=rows))
    result["elapsed_s"] = time.monotonic() - start
    result["complete"] = True
    print(markdown(result))
    save(result, args)
    return 0


def save(result: dict, args, **rows) -> None:
    """Write the JSON (again): after every length, so a run stopped by a timeout keeps its rows."""
    result.update(rows)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    sys.exit(main())
