"""`ropelab lab train`: train a small decoder-only model with one position module
(positions.py), resumably, in a loop that runs on one CPU, a GPU (`device`), or data-parallel
under `torchrun` / `accelerate launch` (accelerate's `Accelerator`; gloo on CPU).

A run folder holds:
  lab.json              the run (everything that changes the numbers) and, when done, its summary
  tokens.pt             the training blocks, sampled from the whole training split (the
                        budget's worth, so a resume never re-tokenizes)
  checkpoint/           the last checkpoint: model/ (save_pretrained), optimizer.pt, scheduler.pt,
                        state.pt (step, RNG states); tensors and plain values only, loaded
                        with `weights_only=True` (a file naming other objects is refused)
  train_log.jsonl       one line per step: step, tokens, loss, lr, seconds
  model/                the trained model and its tokenizer (save_pretrained; `ropelab eval --model`)
  loss_curve.png        the training loss

Data: the budget's blocks of `train_length` tokens are drawn by a seeded permutation from
every block of the training split (corpus.py), so any budget samples the whole corpus.
Determinism: the batch of step t is a function of (seed, t) alone (the sampled blocks,
shuffled by a seeded permutation per pass over them; a step never straddles two passes, so
its rows are distinct and data-parallel ranks take disjoint ones), dropout is 0, and the
checkpoint holds the optimizer, scheduler and RNG states, so a resumed run computes the same
losses as an uninterrupted one on CPU. Models trained through ropelab's attention
(`rope-logn`, `inverse-leaky`) are patched for training and saved unpatched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import positions as pos
from ..data import check_source
from .corpus import check_every, sample_blocks, training_stream

RUN_FILE = "lab.json"
SAMPLING = "blocks of the whole training split, seeded"  # recorded: folders of the older in-order reading differ
SAMPLE_SEED = 2**40  # offset: the sample's permutation is not the first pass's (config_seed(seed, 0))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that changes a run's numbers (recorded in lab.json; a folder holds one run)."""

    position: str = "rope"
    size: str = "tiny"
    train_length: int = 128
    batch_size: int = 8
    tokens: int = 2_097_152  # budget: steps = tokens // (batch_size × train_length); README "The lab" for its cost
    lr: float = 2e-3
    warmup: float = 0.05  # fraction of the steps with a linear warm-up; then cosine to 10%
    weight_decay: float = 0.01
    seed: int = 0
    data: str = "stdlib"
    heldout_every: int = 20
    tokenizer: str = "corpus:4096"  # BPE trained on the training split; or a default model's name, a folder, 'given'
    logn_length: int | None = None  # rope-logn: L0 of the log-n scale (default train_length/4)
    inverse_window: int | None = None  # inverse-leaky: w (default train_length/4)
    inverse_scale: float | None = None  # inverse-leaky: the stretch s = 1/k (default 16)

    def resolved(self) -> TrainConfig:
        """This config with the position-specific defaults filled in."""
        window, scale = pos.default_inverse(self.train_length)
        return dataclasses.replace(
            self,
            logn_length=self.logn_length or pos.default_logn_length(self.train_length),
            inverse_window=self.inverse_window or window,
            inverse_scale=self.inverse_scale or scale,
        )

    @property
    def steps(self) -> int:
        return self.tokens // (self.batch_size * self.train_length)

    def training_method(self) -> str | None:
        c = self.resolved()
        spec = pos.training_method(c.position, c.train_length, c.logn_length, c.inverse_window, c.inverse_scale)
        if spec is None:
            return None
        import ropelab

        return ropelab.parse_method(spec).spec()  # the canonical text (validates window and scale)


def validate(config: TrainConfig, vocab: int, memory_limit: int | None) -> pos.Size:
    """Raise ValueError (field, value, rule) for anything wrong before a byte is written."""
    pos.check_position(config.position)
    size = pos.parse_size(config.size)
    pos.check_size(size, config.position)
    for field in ("train_length", "batch_size", "tokens", "seed"):
        value = getattr(config, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if field == "seed" else 1):
            raise ValueError(f"{field}={value!r}: must be an integer >= {0 if field == 'seed' else 1}")
    if config.train_length < 8:
        raise ValueError(f"train_length={config.train_length}: must be at least 8")
    if config.steps < 1:
        raise ValueError(f"tokens={config.tokens}: less than one batch ({config.batch_size} × {config.train_length} "
                         "tokens); raise the budget")
    if not (0 < config.lr < 1) or not (0 <= config.warmup < 1):
        raise ValueError(f"lr={config.lr}, warmup={config.warmup}: need 0 < lr < 1 and 0 <= warmup < 1")
    check_every(config.heldout_every)
    c = config.resolved()
    if config.position == "rope-logn" and not 2 <= c.logn_length < config.train_length:
        raise ValueError(f"logn_length={c.logn_length}: must be in [2, train_length={config.train_length}) "
                         "(log-n is the identity below it)")
    if config.position == "inverse-leaky" and not 1 <= c.inverse_window < config.train_length:
        raise ValueError(f"inverse_window={c.inverse_window}: must be in [1, train_length={config.train_length})")
    c.training_method()  # validates the window and scale
    pos.check_fits(size, vocab, config.train_length, config.batch_size, config.position, memory_limit)
    return size


def _record(config: TrainConfig) -> dict:
    return {"kind": "lab-train", **dataclasses.asdict(config.resolved()), "training_method": config.training_method(),
            "sampling": SAMPLING}


def check_folder(out: Path, config: TrainConfig) -> bool:
    """True when `out` holds this run already (resume); raise if it holds anything else."""
    run_file = out / RUN_FILE
    if run_file.exists():
        mine = json.loads(run_file.read_text())["run"]
        theirs = _record(config)
        if mine != theirs:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f"out={str(out)!r}: holds a different run (differs in: {', '.join(changed)}); "
                             "use a new folder, or the same settings to resume")
        return True
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out={str(out)!r}: is not empty and holds no {RUN_FILE}; use a new folder")
    return False


def check_device(device: str) -> None:
    """Refuse a device that is not cpu, cuda or cuda:N, or CUDA where none is available (ValueError)."""
    if device == "cpu":
        return
    index = device[5:] if isinstance(device, str) and device.startswith("cuda:") else None
    if device != "cuda" and not (index and index.isdigit()):
        raise ValueError(f"device={device!r}: must be cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: no CUDA device is available here (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); use --device cpu")
    if index is not None and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA devices here")


def load_tokenizer(name: str, config: TrainConfig | None = None, out: Path | None = None):
    """The tokenizer named by `name`: a default model's (offline, from its GGUF file), a folder,
    or `corpus:V` (byte-level BPE of V tokens trained on the run's training documents, saved in
    OUT/tokenizer on the first call so a resume uses the very same one)."""
    from transformers import AutoTokenizer

    if name.startswith("corpus:"):
        size = name.split(":", 1)[1]
        if not size.isdigit():
            raise ValueError(f"tokenizer={name!r}: write corpus:VOCABULARY, like corpus:8192")
        if out is not None and (out / "tokenizer").is_dir():
            return AutoTokenizer.from_pretrained(out / "tokenizer")
        from .corpus import train_tokenizer

        return train_tokenizer(config.data, int(size), config.heldout_every)
    if os.path.isdir(name):
        return AutoTokenizer.from_pretrained(name)
    from ropelab.patches.loading import gguf_path

    path = gguf_path(name)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def _schedule(config: TrainConfig):
    warm = max(1, int(config.warmup * config.steps))

    def factor(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, config.steps - warm)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batch_rows(step: int, batch_size: int, blocks: int, seed: int) -> torch.Tensor:
    """Block indices of step `step`'s batch: B distinct entries of the permutation of pass p.

    A pass is `blocks // B` whole steps (the permutation's last `blocks % B` entries wait for a
    later pass, which permutes anew), so no step mixes two passes: its B rows are distinct and
    the ranks of a data-parallel run, which split them, never share a block.
    """
    p, s = divmod(step, blocks // batch_size)
    perm = torch.randperm(blocks, generator=torch.Generator().manual_seed(config_seed(seed, p)))
    return perm[s * batch_size : (s + 1) * batch_size]


def config_seed(seed: int, data_pass: int) -> int:
    return seed * 1_000_003 + data_pass


def _build(config: TrainConfig, size: pos.Size, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    model_config = pos.build_config(config.position, size, len(tokenizer), config.train_length, tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(model_config)


def _save_checkpoint(out: Path, model, optimizer, scheduler, step: int) -> None:
    """Write checkpoint.tmp/ completely, then swap it in, so a kill leaves one whole checkpoint."""
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"step": step, "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_plain(path: Path):
    """A file `torch.save` wrote, loaded with `weights_only=True`: tensors, numbers, strings,
    lists, tuples and dicts only, so loading runs no code. Everything the lab saves (tokens,
    optimizer, scheduler and RNG states) is of these types. A file naming any other Python
    object (a crafted pickle would name a function to call) is refused with ValueError naming
    the file, before anything of the run is changed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        named = f"it names {found.group(1)}" if found else str(exc).strip().splitlines()[-1][:200]
        raise ValueError(f"checkpoint={str(path)!r}: refused: loading it would run Python code ({named}); a lab "
                         "checkpoint holds only tensors and plain values. Only resume run folders you made or "
                         "trust; to train this run from its start, use a new --out") from None


def _recover(out: Path) -> None:
    """A kill between the two renames of `_save_checkpoint` leaves checkpoint.old only."""
    if not (out / "checkpoint").exists() and (out / "checkpoint.old").exists():
        (out / "checkpoint.old").rename(out / "checkpoint")


def _read_log(out: Path, upto: int) -> list[dict]:
    path = out / "train_log.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if row["step"] < upto:
            rows.append(row)
    return rows


def train(config: TrainConfig, out, *, tokenizer=None, device: str = "cpu", progress: bool = True,
          save_every: int = 50, stop_after: int | None = None, memory_limit: int | None | str = "auto",
          on_finish=None) -> dict:
    """Train (or resume) the run `config` in folder `out`; return lab.json's content.

    tokenizer: a tokenizer object (recorded as `config.tokenizer`), else `load_tokenizer(config.tokenizer)`.
    device: 'cpu' (the default), 'cuda' (under torchrun: each process's local GPU) or 'cuda:N';
    CUDA asked for where none is available is a ValueError before anything is written. stop_after: stop after
    that many steps of this call, as an interruption would (tests, demos). memory_limit: bytes
    the training may use ('auto': MemAvailable; None: no check). on_finish: called with the
    trained model (unpatched, as saved) when training ends in this call.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(out)
    check_device(device)
    pos.check_position(config.position)  # the cheap checks before a tokenizer is loaded or trained
    pos.check_size(pos.parse_size(config.size), config.position)
    check_source(config.data)  # a missing corpus (or Parquet without pyarrow) before anything is read or written
    resuming = check_folder(out, config)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer, config, out)
    limit = pos.available_bytes() if memory_limit == "auto" else memory_limit
    size = validate(config, len(tokenizer), limit)
    if resuming:
        record = json.loads((out / RUN_FILE).read_text())
        if "summary" in record and (out / "model").is_dir():
            return record  # finished already
    method = config.training_method()

    if resuming and (out / "tokens.pt").exists():
        tokens = load_plain(out / "tokens.pt").view(-1, config.train_length)
    else:
        stream = training_stream(config.data, tokenizer, config.heldout_every)
        if len(stream) < config.train_length:
            raise ValueError(f"train_length={config.train_length}: above the corpus's {len(stream)} training tokens "
                             f"(data={config.data!r}, 1 in {config.heldout_every} documents held out)")
        tokens = sample_blocks(stream, config.train_length, config.tokens // config.train_length,
                               SAMPLE_SEED + config.seed)
        del stream
    blocks = len(tokens)
    if blocks < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size}: the corpus has only {blocks} blocks of {config.train_length} "
                         "training tokens")

    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))  # accelerate places a single process on the current device
    accelerator = Accelerator(cpu=device == "cpu")
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size}: must be divisible by the {world} processes")
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resuming:  # lab.json first: a folder killed after it resumes, and the rest is remade
            (out / RUN_FILE).write_text(json.dumps({"run": _record(config)}, indent=2))
        if config.tokenizer.startswith("corpus:") and not (out / "tokenizer").is_dir():
            tokenizer.save_pretrained(out / "tokenizer")
        if not (out / "tokens.pt").exists():
            torch.save(tokens.flatten(), out / "tokens.pt")
        _recover(out)
    accelerator.wait_for_everyone()

    ckpt = out / "checkpoint"
    start = 0
    if ckpt.exists():
        from transformers import AutoModelForCausalLM

        saved = {name: load_plain(ckpt / f"{name}.pt") for name in ("state", "optimizer", "scheduler")}
        model = AutoModelForCausalLM.from_pretrained(ckpt / "model", dtype=torch.float32)
        state = saved["state"]
        start = state["step"]
        torch.set_rng_state(state["torch_rng"])
    else:
        model = _build(config, size, tokenizer)
    model.train()
    handle = None
    if method is not None:
        import warnings

        import ropelab

        handle = ropelab.patch(model, method)
        # the exact eager path is the only one that records autograd; its warning says so once
        warnings.filterwarnings("ignore", message="rotary_attention: autograd")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    if ckpt.exists():
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    model, optimizer = accelerator.prepare(model, optimizer)

    log = _read_log(out, start) if main else []
    if main:
        (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    elapsed = log[-1]["seconds"] if log else 0.0
    per_rank = config.batch_size // world
    bar = tqdm(total=config.steps, initial=start, desc=f"lab train {config.position}", unit="step",
               disable=not (progress and main))
    began, step = time.perf_counter(), start
    stop = config.steps if stop_after is None else min(config.steps, start + stop_after)
    with open(out / "train_log.jsonl", "a") if main else open(os.devnull, "w") as log_file:
        while step < stop:
            rows = batch_rows(step, config.batch_size, blocks, config.seed)[rank * per_rank : (rank + 1) * per_rank]
            ids = tokens[rows].to(accelerator.device)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            mean = accelerator.reduce(loss.detach(), reduction="mean").item()
            step += 1
            row = {"step": step - 1, "tokens": step * config.batch_size * config.train_length, "loss": mean,
                   "lr": scheduler.get_last_lr()[0], "seconds": elapsed + time.perf_counter() - began}
            if main:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
            bar.update()
            bar.set_postfix(loss=f"{mean:.3f}")
            if step % save_every == 0 or step == config.steps:
                accelerator.wait_for_everyone()
                if main:
                    handle = _save(out, accelerator.unwrap_model(model), handle, lambda m: _save_checkpoint(
                        out, m, optimizer, scheduler, step))
    bar.close()
    accelerator.wait_for_everyone()
    if step < config.steps:
        return json.loads((out / RUN_FILE).read_text())  # stopped early: resume by running again
    summary = {}
    if main:
        model = accelerator.unwrap_model(model)
        handle = _save(out, model, handle,
                       lambda m: (m.save_pretrained(out / "model"), tokenizer.save_pretrained(out / "model")))
        summary = _summary(config, out, model, size, len(tokenizer))
        from .figures import loss_curve

        loss_curve(out)
    accelerator.wait_for_everyone()
    if handle is not None:
        handle.undo()
    if on_finish is not None and main:
        on_finish(accelerator.unwrap_model(model))
    return summary or json.loads((out / RUN_FILE).read_text())


def _save(out: Path, model, handle, write):
    """Write with the training patch lifted, so the saved files are the plain architecture;
    return the handle of the patch put back (None when training runs unpatched)."""
    if handle is None:
        write(model)
        return None
    handle.undo()
    try:
        write(model)
    finally:
        import ropelab

        handle = ropelab.patch(model, handle.method)
    return handle


def _summary(config: TrainConfig, out: Path, model, size: pos.Size, vocab: int) -> dict:
    log = _read_log(out, config.steps)
    tail = log[-max(1, len(log) // 20):]
    seconds = log[-1]["seconds"]
    record = json.loads((out / RUN_FILE).read_text())
    record["summary"] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "size": size.text(),
        "vocabulary": vocab,
        "steps": config.steps,
        "tokens_seen": config.steps * config.batch_size * config.train_length,
        "seconds": seconds,
        "tokens_per_second": config.steps * config.batch_size * config.train_length / seconds,
        "first_loss": log[0]["loss"],
        "final_loss": sum(r["loss"] for r in tail) / len(tail),  # mean of the last 5% of steps
        "threads": torch.get_num_threads(),
    }
    (out / RUN_FILE).write_text(json.dumps(record, indent=2))
    return record
