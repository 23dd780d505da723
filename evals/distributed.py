"""Spreading one job list over the processes `torchrun` starts (torch.distributed's
environment contract: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; "torchrun (Elastic
Launch)" in the PyTorch docs). ropelab schedules nothing itself: torchrun starts, watches
and stops the ranks; this file only says which jobs and which devices are a rank's.

- `Rank.from_environment()`: who this process is (rank 0 of 1 when not launched).
- `assign(costs, world_size)`: a deterministic, cost-balanced split, longest processing
  time first (Graham 1969, "Bounds on multiprocessing timing anomalies"): jobs in order of
  decreasing cost, each to the rank with the least total so far, ties to the lower job index
  and the lower rank. A pure function of its arguments, so every rank computes the same
  split without talking. Ranks beyond the number of jobs get none (they exit 0).
- `job_cost(length, ...)`: the estimate it balances: a forward's FLOPs, n² attention plus
  n·(linear layers); with no model sizes given, n².
- `local_devices(...)`: the device of a rank from LOCAL_RANK. With `device="cuda"`, local
  rank r takes cuda:r. With a device map (`auto`, ...), the visible GPUs are split into
  LOCAL_WORLD_SIZE contiguous blocks of equal size (the remainder left idle) and rank r's
  map may use only its block (and 1/LOCAL_WORLD_SIZE of the host memory): accelerate places
  weights only on devices named in `max_memory`, which is how the split is enforced.
- `check_same_parameters(params)`: every rank checks that all ranks run the same sweep
  before any job runs, and all of them refuse if not.
- `share(pending, lengths, rank, agreement)`: what the job runner (`runner.py`) runs on this
  rank: the check above over the parameters and the pending jobs, then its part of the split.
  It splits only a store opened as a shard (`default_shard()`, which the CLI passes): a
  process group alone (tensor parallelism) splits nothing. Readers merge the shards
  (`results.py`).
- `from_rank0(produce)`: what one rank does for all (the lm-eval bridge's result store, a
  task file), its value or its error handed to every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch

_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def launched(self) -> bool:
        """True when the run has more than one process (a one-process torchrun is a plain run)."""
        return self.world_size > 1

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Rank:
        """Read torchrun's variables; none set means a single process."""
        env = os.environ if env is None else env
        if not any(v in env for v in _VARIABLES):
            return cls()
        values = {}
        for name in _VARIABLES:
            text = env.get(name)
            if text is None and name == "LOCAL_WORLD_SIZE":
                text = env.get("WORLD_SIZE")  # a launcher that does not set it: one node
            if text is None or not text.strip().isdigit():
                raise ValueError(f"{name}={text!r}: must be a non-negative integer (set by torchrun; "
                                 f"got {', '.join(f'{v}={env.get(v)!r}' for v in _VARIABLES)})")
            values[name] = int(text)
        rank = cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"])
        if not (0 <= rank.rank < rank.world_size and 0 <= rank.local_rank < rank.local_world_size <= rank.world_size):
            raise ValueError(f"RANK={rank.rank}, WORLD_SIZE={rank.world_size}, LOCAL_RANK={rank.local_rank}, "
                             f"LOCAL_WORLD_SIZE={rank.local_world_size}: need 0 <= RANK < WORLD_SIZE and "
                             "0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE")
        return rank


# -- the split ------------------------------------------------------------------------------


def job_cost(length: int, hidden_size: int | None = None, intermediate_size: int | None = None,
             kv_heads_fraction: float = 1.0) -> float:
    """FLOPs of one decoder layer over `length` tokens, up to a constant factor.

    Attention: QKᵀ and AV, 2·n²·h multiply-adds over all n² pairs (4·n²·h FLOPs; kernels
    that skip the masked half do half, which scales every job alike). Linear layers per
    token: q and o (2h²), k and v (2h²·kv_heads_fraction), gate, up and down (3·h·I), at
    2 FLOPs a multiply-add. Without sizes, n², which ranks lengths the same way at long range.
    """
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length={length!r}: must be an integer >= 1")
    if hidden_size is None:
        return float(length) ** 2
    intermediate = intermediate_size if intermediate_size is not None else 4 * hidden_size
    linear = 2 * (2 * hidden_size**2 * (1 + kv_heads_fraction) + 3 * hidden_size * intermediate)
    return 4.0 * length**2 * hidden_size + float(length) * linear


def assign(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Job indices per rank: longest first, each to the least-loaded rank (ties: lower index, lower rank).
    Each rank's list is in the order it should run (longest first)."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: must be an integer >= 1")
    for i, c in enumerate(costs):
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not (c >= 0) or c == float("inf"):
            raise ValueError(f"costs[{i}]={c!r}: must be a finite number >= 0")
    loads = [0.0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shards[rank].append(job)
        loads[rank] += costs[job]
    return shards


def my_jobs(jobs: Sequence, costs: Sequence[float], rank: Rank) -> list:
    """The jobs of `rank` (possibly none), longest first."""
    if len(jobs) != len(costs):
        raise ValueError(f"costs: {len(costs)} given for {len(jobs)} jobs; give one per job")
    return [jobs[i] for i in assign(costs, rank.world_size)[rank.rank]]


# -- devices -----------------------------------------------------------------------------------


def split_gpus(local_rank: int, local_world_size: int, gpu_count: int) -> list[int]:
    """The GPU indices local rank `local_rank` owns: contiguous blocks of gpu_count // local_world_size."""
    per_rank = gpu_count // local_world_size
    if per_rank < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE={local_world_size}: more ranks on this node than its {gpu_count} "
                         "visible GPU(s); start at most one rank per GPU (torchrun --nproc-per-node)")
    return list(range(local_rank * per_rank, (local_rank + 1) * per_rank))


def local_devices(rank: Rank, device: str | None = None, device_map: str | None = None,
                  max_memory: dict | None = None, gpu_count: int | None = None,
                  available: dict | None = None) -> dict:
    """`load_model` keywords for this rank: {'device': ...} or {'device_map': ..., 'max_memory': ...}.

    `gpu_count` and `available` (accelerate's `get_max_memory()`: bytes free per device) are
    read from the machine when not given; passing them makes this a pure function.
    """
    gpu_count = torch.cuda.device_count() if gpu_count is None else gpu_count
    if device_map is None:
        if device is None or device == "cpu" or device == "mps" or rank.local_world_size == 1:
            return {"device": device}
        if device == "cuda":
            if rank.local_rank >= gpu_count:
                raise ValueError(f"device='cuda': LOCAL_RANK={rank.local_rank} has no GPU of its own "
                                 f"({gpu_count} visible); start at most one rank per GPU")
            return {"device": f"cuda:{rank.local_rank}"}
        raise ValueError(f"device={device!r}: with {rank.local_world_size} ranks on a node, give device='cuda' "
                         "(each rank takes cuda:LOCAL_RANK), not one fixed GPU for all")
    if rank.local_world_size == 1:
        return {"device_map": device_map, "max_memory": max_memory}
    gpus = split_gpus(rank.local_rank, rank.local_world_size, gpu_count)
    if available is None:
        from accelerate.utils import get_max_memory

        available = get_max_memory()
    budget = dict(max_memory) if max_memory else dict(available)
    own = {g: budget[g] for g in gpus if g in budget}
    for key in ("cpu", "disk"):  # the host is shared: each rank gets its share of what is free
        if key in budget:
            own[key] = budget[key] if max_memory else int(budget[key]) // rank.local_world_size
    return {"device_map": device_map, "max_memory": own}


# -- agreement between ranks --------------------------------------------------------------------


def fingerprint(params: Mapping) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def check_same_parameters(params: Mapping) -> None:
    """Refuse, on every rank, a run whose ranks were given different parameters.

    Needs an initialised process group (a no-op without one). All ranks gather every
    rank's parameters, so all of them see the same mismatch and raise the same ValueError.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, dict(params))
    if len({fingerprint(p) for p in everyone}) == 1:
        return
    keys = sorted({k for p in everyone for k in p}, key=str)
    differ = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True, default=str) for p in everyone}) > 1]
    first = differ[0]
    seen = ", ".join(f"rank {r}: {p.get(first)!r}" for r, p in enumerate(everyone))
    raise ValueError(f"{first}: the ranks of one run must run the same sweep, but they differ ({seen}); "
                     f"differing fields: {', '.join(map(str, differ))}")


def init_process_group(rank: Rank, backend: str | None = None, timeout: timedelta | None = None) -> bool:
    """Join torchrun's process group (env:// rendezvous) when launched; True if joined now.

    `timeout` bounds every collective, the last barrier included, where a rank that finished
    its share waits for the slowest: give it the length of the longest share (ropelab's CLI
    gives a day). A rank that dies is caught sooner: torchrun then stops the others.
    """
    import torch.distributed as dist

    if not rank.launched or dist.is_initialized():
        return False
    # Imported before the group exists, on purpose: its functions take `group=group.WORLD` as a
    # default argument, evaluated at import, so importing it later (transformers' from_pretrained
    # does) keeps the world group alive past destroy_process_group. Gloo's worker threads then
    # outlive it to interpreter shutdown, where they abort the process now and then
    # ("terminate called without an active exception", SIGABRT after all the work was written).
    import torch.distributed.nn.functional  # noqa: F401

    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"), **kwargs)
    return True


# -- the running sweep --------------------------------------------------------------------------


def current_rank() -> Rank:
    """This process's place in the initialised process group (rank 0 of 1 without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Rank()
    local = Rank.from_environment()
    return Rank(dist.get_rank(), dist.get_world_size(), local.local_rank, max(local.local_world_size, 1))


def default_shard(rank: Rank | None = None) -> str | None:
    """The shard a rank of a sharded run writes ('rank3'), or None for a single process."""
    rank = current_rank() if rank is None else rank
    return f"rank{rank.rank}" if rank.launched else None


def share(pending: Sequence, lengths: Sequence[int], rank: Rank, agreement: Mapping) -> list:
    """This rank's part of `pending` (jobs not yet done, in the same order on every rank).

    First every rank checks, with all the others, that they agree on `agreement` (the run's
    parameters) and on the pending list itself: each rank read what is done before any rank
    runs a job (the check is the synchronisation point), so the lists match unless the ranks
    were given different work, which is refused on every rank. Then the split: `assign` over
    `job_cost(length)`, longest first.
    """
    if not rank.launched:
        return list(pending)
    digest = hashlib.sha256(json.dumps([str(job) for job in pending]).encode()).hexdigest()
    check_same_parameters({**agreement, "pending jobs": digest})
    return my_jobs(list(pending), [job_cost(max(1, int(n))) for n in lengths], rank)


def barrier() -> None:
    """Wait for every rank (no-op in a single process): the results are then complete on disk."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def from_rank0(produce):
    """`produce()` run on rank 0 alone, its value given to every rank (a single process: just `produce()`).

    For what one rank must do for all, such as opening a result store or writing a file that
    all read. If it raises, every rank raises: rank 0 its own exception, the others a
    ValueError (RuntimeError for anything but a ValueError) with the same message, so bad input
    found there is refused on every rank alike. The value must pickle.
    """
    import torch.distributed as dist

    rank = current_rank()
    if not rank.launched:
        return produce()
    message: list = [None, None]
    failure = None
    if rank.rank == 0:
        try:
            message[0] = produce()
        except Exception as exc:
            failure, message[1] = exc, (isinstance(exc, ValueError), str(exc))
    dist.broadcast_object_list(message, src=0)
    if failure is not None:
        raise failure
    if message[1] is not None:
        is_value_error, text = message[1]
        raise (ValueError if is_value_error else RuntimeError)(text)
    return message[0]
