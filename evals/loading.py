"""Load a model by name the way its users name it: an embedded default, a local folder, or a
hub id (`org/name` at a revision), in a chosen dtype, on a device or spread by a device map.

    >>> model, tokenizer, source = load_model("HuggingFaceTB/SmolLM2-135M", dtype="bfloat16", device="cuda")
    >>> source.commit, identity.model_identity(model, source)

Hub ids resolve as transformers resolves them (huggingface_hub's cache layout,
`models--org--name/{refs,snapshots}`): the local cache first (`HF_HUB_CACHE`, read at call
time); a download only when the environment allows one (`HF_HUB_OFFLINE=1` or
`TRANSFORMERS_OFFLINE=1` forbid it). A cached branch or tag is used as cached; pass a commit
hash, or fetch again, to move it. The weights are then loaded from the resolved snapshot
folder with `local_files_only=True`, so `source.commit` is exactly what was loaded.

Placement: `device` (cpu, cuda, cuda:N, mps) moves the whole model; `device_map` (auto,
balanced, sequential, with `max_memory`) lets accelerate split it over the GPUs, the CPU and
disk (a temporary offload folder is made when layers go to disk). Placement never changes
the numbers, so it is not part of the model identity the results record (`identity.py`,
built from `source`); dtype and attention implementation are.
Remote code runs only with `trust_remote_code=True`.

Memory: `memory_chunk=N` puts the loaded model in memory mode (ropelab.patches.memory: each
decoder layer's MLP and norms run over the sequence in slices of N tokens) before anything
patches it, so every forward of a long sequence needs O(N) activation memory there instead
of O(S). It is part of the model identity (`identity.py`): bit-equal on dense models at
slices of 8 rows or more (SmolLM2-135M at 16k, 30 layers: 0 difference), but on
mixture-of-experts models the slices change losses at float32 rounding (README, "Memory
mode"), so a run keeps the chunk it was started with.

Every argument is checked before anything is loaded or fetched; a bad one raises ValueError
naming the field, the value and the rule. `add_loading_arguments` / `loading_options` give
the command line the same flags and checks.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ropelab.spec import parse_int_with_suffix

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_MAPS = ("auto", "balanced", "sequential")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
DEFAULT_NAMES = ("smollm2-135m", "gemma3-270m")  # ropelab.patches.default_models(), without importing it
MAX_MEMORY_RULE = "KEY=SIZE[,KEY=SIZE...], KEY a GPU index, cpu, mps or disk, SIZE like 2GiB, 500MB or a byte count (e.g. 0=20GiB,cpu=64GiB)"
# What a hub snapshot needs for a causal LM and its tokenizer (remote code adds *.py).
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]

_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelSource:
    """What identifies the loaded weights, and where they were put."""

    kind: str  # "default" (embedded GGUF), "hub" or "local"
    name: str  # as given: a default's name, the hub id, or the folder
    path: str | None  # the folder the weights came from (hub: the snapshot), resolved; None for defaults
    revision: str | None  # hub: the revision asked for ("main" when none was)
    commit: str | None  # hub: the commit hash of the snapshot loaded
    dtype: str
    attn_implementation: str | None  # the one the loaded model uses (before any patch)
    placement: str  # "cpu", "cuda:0", "device_map=auto" ...: never part of the identity
    trust_remote_code: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


# -- argument checks (no loading) ------------------------------------------------------


def parse_max_memory(value) -> dict:
    """'0=2GiB,cpu=8GiB' (or a dict) -> {0: '2GiB', 'cpu': '8GiB'}; ValueError with the rule otherwise."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, str) and value.strip():
        items = []
        for part in value.split(","):
            key, eq, size = part.partition("=")
            if not eq:
                raise ValueError(f"max_memory={value!r}: {part.strip()!r} is not KEY=SIZE; the rule: {MAX_MEMORY_RULE}")
            items.append((key.strip(), size.strip()))
    else:
        raise ValueError(f"max_memory={value!r}: the rule: {MAX_MEMORY_RULE}")
    out: dict = {}
    for key, size in items:
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        if not ((isinstance(key, int) and not isinstance(key, bool) and key >= 0) or key in ("cpu", "mps", "disk")):
            raise ValueError(f"max_memory={value!r}: key {key!r} is not a GPU index, cpu, mps or disk; the rule: {MAX_MEMORY_RULE}")
        if isinstance(size, str) and size.isdigit():
            size = int(size)  # a byte count; accelerate takes it as an int only
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            pass
        elif not (isinstance(size, str) and _SIZE.match(size)):
            raise ValueError(f"max_memory={value!r}: size {size!r} for {key!r} is not a size; the rule: {MAX_MEMORY_RULE}")
        if key in out:
            raise ValueError(f"max_memory={value!r}: {key!r} is given twice; the rule: {MAX_MEMORY_RULE}")
        out[key] = size
    return out


def check_device(device: str | None) -> None:
    """cpu, cuda, cuda:N or mps, present on this machine."""
    if device is None or device == "cpu":
        return
    if not isinstance(device, str) or not re.fullmatch(r"cuda(:\d+)?|mps", device):
        raise ValueError(f"device={device!r}: must be cpu, cuda, cuda:N or mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available here (torch {torch.__version__}, "
                             f"built with CUDA {torch.version.cuda}); use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r}: MPS (Apple GPU) is not available here")


MEMORY_CHUNK_RULE = "an integer >= 1 (tokens per slice of the MLP and norms; absent: memory mode off)"


def check_memory_chunk(memory_chunk) -> None:
    """None (off) or a positive int."""
    if memory_chunk is None:
        return
    if not isinstance(memory_chunk, int) or isinstance(memory_chunk, bool) or memory_chunk < 1:
        raise ValueError(f"memory_chunk={memory_chunk!r}: must be {MEMORY_CHUNK_RULE}")


def check_options(*, dtype="float32", device=None, device_map=None, max_memory=None, attn_implementation=None,
                  trust_remote_code=False, revision=None, memory_chunk=None) -> dict | None:
    """Validate the loading options; returns max_memory parsed (or None). Loads nothing."""
    check_memory_chunk(memory_chunk)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
    check_device(device)
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise ValueError(f"device_map={device_map!r}: must be one of {', '.join(DEVICE_MAPS)}")
        if device is not None:
            raise ValueError(f"device_map={device_map!r} with device={device!r}: give one; a device map places "
                             "the model itself (limit it with max_memory)")
        if importlib.util.find_spec("accelerate") is None:
            raise ValueError(f"device_map={device_map!r}: needs accelerate: pip install accelerate")
    parsed = None
    if max_memory is not None:
        if device_map is None:
            raise ValueError(f"max_memory={max_memory!r}: only applies with a device_map (auto, balanced, sequential)")
        parsed = parse_max_memory(max_memory)
    if attn_implementation is not None:
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={attn_implementation!r}: must be one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        if attn_implementation == "flash_attention_2":
            if importlib.util.find_spec("flash_attn") is None:
                raise ValueError("attn_implementation='flash_attention_2': flash-attn is not installed "
                                 "(pip install -e .[cuda], on a CUDA machine)")
            if not torch.cuda.is_available():
                raise ValueError("attn_implementation='flash_attention_2': needs CUDA, which is not available here")
    if not isinstance(trust_remote_code, bool):
        raise ValueError(f"trust_remote_code={trust_remote_code!r}: must be True or False")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(f"revision={revision!r}: must be a branch, tag or commit hash")
    return parsed


# -- hub resolution ----------------------------------------------------------------------


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them at import)."""
    from huggingface_hub import constants

    return _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE")) or constants.HF_HUB_OFFLINE


def hub_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or constants.HF_HUB_CACHE


def is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def cached_snapshot(repo_id: str, revision: str, cache: str) -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision` (a branch, tag or commit), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache, revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def cached_refs(repo_id: str, cache: str) -> list[str]:
    """'main -> abc1234' for each ref of `repo_id` in the cache (for error messages)."""
    folder = Path(cache) / ("models--" + repo_id.replace("/", "--")) / "refs"
    if not folder.is_dir():
        return []
    return sorted(f"{p.relative_to(folder)} -> {p.read_text().strip()[:12]}" for p in folder.rglob("*") if p.is_file())


def fetch_hint(repo_id: str, revision: str) -> str:
    rev = "" if revision == "main" else f" --revision {revision}"
    return f"fetch it on a machine with network: `hf download {repo_id}{rev}` (huggingface-cli download in older hubs), then copy the cache"


def resolve_hub(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    """The local snapshot folder of `repo_id` at `revision`: from the cache, else downloaded
    where allowed. ValueError (one line) when it cannot be had."""
    revision = revision or "main"
    cache = hub_cache()
    snapshot = cached_snapshot(repo_id, revision, cache)
    if snapshot is not None:
        return snapshot
    refs = cached_refs(repo_id, cache)
    cached = f"; cached revisions: {', '.join(refs)}" if refs else ""
    if hub_offline():
        what = f"revision={revision!r} of model={repo_id!r}" if refs else f"model={repo_id!r}"
        raise ValueError(f"{what}: not in the hub cache {cache} and HF_HUB_OFFLINE=1 forbids a download{cached}; "
                         + fetch_hint(repo_id, revision))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                   allow_patterns=HUB_FILES + (["*.py"] if trust_remote_code else []))
    except RevisionNotFoundError:
        raise ValueError(f"revision={revision!r}: model={repo_id!r} has no such branch, tag or commit{cached}") from None
    except RepositoryNotFoundError:
        raise ValueError(f"model={repo_id!r}: no such model on the hub (or it is private or gated: "
                         "log in with `hf auth login`)") from None
    except Exception as e:  # connection refused, timeouts, hub errors: one line, with the way out
        raise ValueError(f"model={repo_id!r}: not in the hub cache {cache} and the hub could not be reached "
                         f"({type(e).__name__}){cached}; " + fetch_hint(repo_id, revision)) from None
    return Path(folder)


# -- loading ---------------------------------------------------------------------------------


def check_model_name(name, revision: str | None = None, device_map: str | None = None) -> str:
    """The kind of `name` ("default", "local" or "hub") without loading or fetching anything;
    ValueError naming the field when it can be none of them or the options do not fit it."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model={name!r}: give an embedded default ({', '.join(DEFAULT_NAMES)}), a folder or a hub id org/name")
    if name == "default" or name in DEFAULT_NAMES:
        name = DEFAULT_NAMES[0] if name == "default" else name
        if revision is not None:
            raise ValueError(f"revision={revision!r}: the embedded default {name!r} has no revisions")
        if device_map is not None:
            raise ValueError(f"device_map={device_map!r}: the embedded default {name!r} loads whole; use device instead")
        return "default"
    if os.path.isdir(name):
        if revision is not None:
            raise ValueError(f"revision={revision!r}: {name!r} is a local folder, which has no revisions")
        return "local"
    if is_hub_id(name):
        return "hub"
    raise ValueError(f"model={name!r}: not an embedded default ({', '.join(DEFAULT_NAMES)}), an existing "
                     "folder, or a hub id of the form org/name")


def load_model(name: str, dtype: str = "float32", *, revision: str | None = None, device: str | None = None,
               device_map: str | None = None, max_memory=None, attn_implementation: str | None = None,
               trust_remote_code: bool = False, memory_chunk: int | None = None):
    """(model, tokenizer, ModelSource) in eval mode. See the module docstring."""
    parsed_memory = check_options(dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                                  attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                                  revision=revision, memory_chunk=memory_chunk)
    model, tokenizer, source = _load(name, dtype, revision, device, device_map, parsed_memory, attn_implementation,
                                     trust_remote_code)
    if memory_chunk is not None:
        # Before any patch: a patch touches rotary and attention modules only, and its undo
        # leaves the chunked MLPs and norms in force (ropelab.patches.memory).
        from ropelab.patches.memory import memory_mode

        memory_mode(model, memory_chunk)
    return model, tokenizer, source


def _load(name, dtype, revision, device, device_map, parsed_memory, attn_implementation, trust_remote_code):
    kind = check_model_name(name, revision, device_map)
    placement = f"device_map={device_map}" if device_map else (device or "cpu")
    if kind == "default":
        name = DEFAULT_NAMES[0] if name == "default" else name
        from ropelab.patches import load_default_model

        model, tokenizer = load_default_model(name, dtype=DTYPES[dtype])
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        if device not in (None, "cpu"):
            model.to(device)
        return model.eval(), tokenizer, ModelSource("default", name, None, None, None, dtype,
                                                    model.config._attn_implementation, placement)
    if kind == "local":
        folder, commit = Path(name).resolve(), None
    else:
        folder = resolve_hub(name, revision, trust_remote_code)
        commit, revision = folder.name, revision or "main"
    model, tokenizer = _from_folder(folder, dtype, device, device_map, parsed_memory, attn_implementation, trust_remote_code)
    source = ModelSource(kind, name, str(folder), revision if kind == "hub" else None, commit, dtype,
                         model.config._attn_implementation, placement, trust_remote_code)
    return model, tokenizer, source


def _from_folder(folder: Path, dtype, device, device_map, max_memory, attn_implementation, trust_remote_code):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(dtype=DTYPES[dtype], local_files_only=True, trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    offload = None
    if device_map is not None:
        # A map may send layers to disk; accelerate then needs a folder. It lives as long as the model.
        offload = tempfile.mkdtemp(prefix="ropelab-offload-")
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload)
    elif device not in (None, "cpu"):
        kwargs["device_map"] = device  # straight onto the device, without a copy in host memory
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    except BaseException:
        if offload:
            shutil.rmtree(offload, ignore_errors=True)
        raise
    if offload:
        weakref.finalize(model, shutil.rmtree, offload, ignore_errors=True)
    return model.eval(), tokenizer


# -- command-line flags -------------------------------------------------------------------------


def add_loading_arguments(parser: argparse.ArgumentParser, dtype_default: str = "float32", forwards: bool = True) -> None:
    """Add --revision --dtype --device --device-map --max-memory --attn-implementation --trust-remote-code,
    and, for commands that run forwards (`forwards`), --memory-chunk."""
    group = parser.add_argument_group("model loading")
    group.add_argument("--revision", help="hub branch, tag or commit (hub ids only; default main)")
    group.add_argument("--dtype", default=dtype_default,
                       help=f"{'|'.join(DTYPES)} (default {dtype_default}; part of the model identity)")
    group.add_argument("--device", help="cpu|cuda|cuda:N|mps (default cpu); not with --device-map")
    group.add_argument("--device-map", help=f"{'|'.join(DEVICE_MAPS)}: let accelerate split the model over GPUs, CPU and disk")
    group.add_argument("--max-memory", help=f"with --device-map: {MAX_MEMORY_RULE}")
    group.add_argument("--attn-implementation", help=f"{'|'.join(ATTN_IMPLEMENTATIONS)}: the unpatched model's attention")
    group.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code (off unless given)")
    if forwards:
        group.add_argument("--memory-chunk", metavar="N",
                           help="memory mode: run each layer's MLP and norms over the sequence in slices of N "
                           "tokens (e.g. 4k), for forwards longer than memory allows; absent: off. Part of the "
                           "model identity (on mixture-of-experts models it changes losses at float32 "
                           "rounding), so a run resumes only with the chunk it was started with")


_FLAGS = {"revision": "--revision", "dtype": "--dtype", "device": "--device", "device_map": "--device-map",
          "max_memory": "--max-memory", "attn_implementation": "--attn-implementation",
          "trust_remote_code": "--trust-remote-code", "memory_chunk": "--memory-chunk"}


def loading_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of `load_model` from parsed flags, checked; ValueError names the flag, value and rule."""
    options = {field: getattr(args, field, None) for field in _FLAGS}
    options["dtype"] = options["dtype"] or "float32"
    options["trust_remote_code"] = bool(options["trust_remote_code"])
    if options["memory_chunk"] is None:
        del options["memory_chunk"]  # a command without the flag, or off: load_model's default
    elif isinstance(options["memory_chunk"], str):  # as typed: 2048, 4k
        text = options["memory_chunk"]
        try:
            options["memory_chunk"] = parse_int_with_suffix(text)
        except ValueError:
            options["memory_chunk"] = None
        if options["memory_chunk"] is None or options["memory_chunk"] < 1:
            raise ValueError(f"--memory-chunk {text!r}: must be {MEMORY_CHUNK_RULE}; forms: 2048, 4k")
    try:
        check_options(**options)
    except ValueError as e:
        text = str(e)
        field = text.split("=", 1)[0]
        raise ValueError(f"{_FLAGS[field]} {text.split('=', 1)[1]}" if field in _FLAGS else text) from None
    return options


def checked_model_options(args: argparse.Namespace) -> dict:
    """`loading_options(args)` plus the check of `--model` against them: what a model-running
    command verifies before loading (ValueError naming the flag, the value and the rule)."""
    options = loading_options(args)
    try:
        check_model_name(args.model, options["revision"], options["device_map"])
    except ValueError as exc:
        raise ValueError(f"--model: {exc}") from None
    return options
