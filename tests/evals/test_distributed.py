"""ropelab.evals.distributed: the rank from torchrun's environment, the cost-balanced split
(against brute force on small cases), device choice per local rank, and a 2-process gloo run
on localhost where every rank computes the same split and refuses mismatched parameters."""

from __future__ import annotations

import itertools
import json
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from ropelab.evals.distributed import Rank, assign, job_cost, local_devices, my_jobs, split_gpus


def test_rank_from_environment():
    assert Rank.from_environment({}) == Rank(0, 1, 0, 1)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert Rank.from_environment(env) == Rank(3, 4, 1, 2)
    assert Rank.from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Rank(1, 2, 1, 2)
    with pytest.raises(ValueError, match=r"RANK=4, WORLD_SIZE=4.*need 0 <= RANK < WORLD_SIZE"):
        Rank.from_environment({**env, "RANK": "4"})
    with pytest.raises(ValueError, match=r"LOCAL_RANK='x': must be a non-negative integer"):
        Rank.from_environment({**env, "LOCAL_RANK": "x"})


def test_every_job_once_and_ties_deterministic():
    costs = [job_cost(n) for n in (4096, 16384, 8192, 4096, 16384, 2048, 8192)]
    shards = assign(costs, 3)
    assert sorted(j for s in shards for j in s) == list(range(len(costs)))
    # by hand, in units of 1024²: 256 (job 1) -> r0, 256 (4) -> r1, then 64, 64, 16, 16, 4 all fit r2 under 256
    assert shards == [[1], [4], [2, 6, 0, 3, 5]]
    assert assign(costs, 3) == shards


def test_lpt_is_within_graham_bound_of_the_best_split():
    """LPT's makespan ≤ (4/3 - 1/(3m))·optimum (Graham 1969); the optimum by brute force."""
    lengths = [1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384]
    costs = [job_cost(n, hidden_size=576, intermediate_size=1536) for n in lengths]
    for m in (2, 3):
        shards = assign(costs, m)
        lpt = max(sum(costs[j] for j in s) for s in shards)
        best = min(max(sum(c for c, r in zip(costs, who) if r == k) for k in range(m))
                   for who in itertools.product(range(m), repeat=len(costs)))
        assert best <= lpt <= (4 / 3 - 1 / (3 * m)) * best


def test_more_ranks_than_jobs_leaves_ranks_idle():
    shards = assign([5.0, 1.0], 4)
    assert shards == [[0], [1], [], []]
    assert my_jobs(["a", "b"], [5.0, 1.0], Rank(3, 4, 3, 4)) == []


def test_job_cost_orders_and_counts():
    assert job_cost(16384) == 16 * job_cost(4096)
    # 1 token of a layer with h=2, I=8, full kv: 4·1·2 attention + 2·(2·4·2 + 3·2·8) linear
    assert job_cost(1, hidden_size=2, intermediate_size=8) == 8 + 2 * (16 + 48)
    with pytest.raises(ValueError, match=r"length=0: must be an integer >= 1"):
        job_cost(0)
    with pytest.raises(ValueError, match=r"costs\[1\]=nan: must be a finite number >= 0"):
        assign([1.0, float("nan")], 2)
    with pytest.raises(ValueError, match=r"world_size=0: must be an integer >= 1"):
        assign([1.0], 0)


def test_devices_per_local_rank():
    two = Rank(1, 4, 1, 2)
    assert local_devices(two, "cuda", gpu_count=2) == {"device": "cuda:1"}
    assert local_devices(two, "cpu", gpu_count=0) == {"device": "cpu"}
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 has no GPU of its own \(1 visible\)"):
        local_devices(two, "cuda", gpu_count=1)
    with pytest.raises(ValueError, match=r"device='cuda:0': with 2 ranks on a node"):
        local_devices(two, "cuda:0", gpu_count=2)
    # device_map: 5 GPUs over 2 local ranks -> blocks [0,1] and [2,3]; GPU 4 idle; host memory halved
    free = {0: 80, 1: 80, 2: 80, 3: 80, 4: 80, "cpu": 1001}
    assert local_devices(two, device_map="auto", gpu_count=5, available=free) == {
        "device_map": "auto", "max_memory": {2: 80, 3: 80, "cpu": 500}}
    assert local_devices(Rank(0, 2, 0, 2), device_map="auto", max_memory={0: "20GiB", 2: "30GiB", "cpu": "8GiB"},
                         gpu_count=4) == {"device_map": "auto", "max_memory": {0: "20GiB", "cpu": "8GiB"}}
    assert split_gpus(0, 1, 8) == list(range(8))
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE=3: more ranks on this node than its 2 visible GPU"):
        split_gpus(0, 3, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_environment(rank: int, world: int, port: int) -> None:
    """Set what torchrun would set for `rank` of `world` processes on localhost."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from ropelab.evals.distributed import check_same_parameters, init_process_group

    torchrun_environment(rank, world, port)
    me = Rank.from_environment()
    assert init_process_group(me, backend="gloo")
    jobs = [f"{m}@{n}" for m in ("rope", "ntk", "yarn") for n in (1024, 4096, 2048)]
    costs = [job_cost(int(j.split("@")[1])) for j in jobs]
    mine = my_jobs(jobs, costs, me)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"assignment": assign(costs, world), "mine": mine})
    check_same_parameters({"methods": ["rope", "ntk"], "lengths": [1024]})
    try:  # rank 1 was given other lengths: every rank must refuse
        check_same_parameters({"methods": ["rope", "ntk"], "lengths": [1024, 2048 * (rank + 1)]})
        refused = None
    except ValueError as e:
        refused = str(e)
    dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"gathered": gathered, "refused": refused, "jobs": jobs}, f)


def test_two_gloo_ranks_split_the_same_way_and_refuse_mismatches(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assignments = [g["assignment"] for g in r["gathered"]]
        assert assignments[0] == assignments[1]  # identical on every rank
        mine = [g["mine"] for g in r["gathered"]]
        assert sorted(mine[0] + mine[1]) == sorted(r["jobs"])  # every job exactly once
        assert r["refused"] == ("lengths: the ranks of one run must run the same sweep, but they differ "
                                "(rank 0: [1024, 2048], rank 1: [1024, 4096]); differing fields: lengths")
    assert results[0]["gathered"] == results[1]["gathered"]


def gloo_threads() -> list[str]:
    """Names of this process's native threads that belong to gloo (Linux: /proc/self/task)."""
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        try:
            names.append(comm.read_text().strip())
        except OSError:  # a thread that ended between listing and reading: it has no name to report
            continue
    return sorted(n for n in names if "gloo" in n)


def release_worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from ropelab.evals.distributed import init_process_group

    torchrun_environment(rank, world, port)
    assert init_process_group(Rank.from_environment(), backend="gloo")
    AutoModelForCausalLM.from_pretrained(model_dir)  # imports torch.distributed.nn.functional, as the CLI's load does
    dist.barrier()
    before = gloo_threads()
    dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"before": before, "after": gloo_threads()}, f)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux's /proc")
def test_leaving_the_group_ends_gloos_threads_after_a_model_load(model_dir, tmp_path):
    """destroy_process_group must free the group, or gloo's threads live on to interpreter
    shutdown, where they abort a finished rank now and then (SIGABRT, a failed torchrun run)."""
    mp.spawn(release_worker, args=(2, free_port(), str(model_dir), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        threads = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert threads["before"], "no gloo thread seen while in the group: the check would prove nothing"
        assert threads["after"] == [], threads
