"""A thin bridge to lm-evaluation-harness (EleutherAI/lm-evaluation-harness, 0.4.x).

Any lm-eval task runs on a patched model: `HFLM(pretrained=model, tokenizer=tok,
max_length=...)` accepts an already-built model, and `simple_evaluate(...,
task_manager=TaskManager(include_path=DIR))` finds local tasks. The passkey test ships as
such a local task, written with its data by `write_passkey_task` (`dataset_path: json`,
`generate_until`, a regex filter for the 5 digits), so it runs with no download.

`lm_eval_run` runs tasks on the one runner (`runner.py`): a job is one task at one setting
(method, limit, max_length, include path), recorded in `lm_eval.jsonl` like every other eval
kind (resumable, locked). lm-eval is optional: `pip install 'ropelab[lmeval]'`.

Data-parallel (`torchrun --nproc-per-node N -m ropelab lm-eval ...`): in an initialised
torch.distributed process group of more than one rank, every rank loads and patches the
model and runs every job together, and lm-eval splits each task's requests over the ranks
and gathers the per-document metrics to rank 0 (its own data-parallel mode;
`lmeval_parallel.py`). Rank 0 alone opens the result store and writes the records; the
other ranks learn from it which jobs are done (`distributed.from_rank0`), so all run the
same jobs in the same order. A rank that fails inside a job stops the run (`RankFailed`):
the others wait inside lm-eval's collectives, so going on to the next job would leave the
ranks out of step; torchrun then stops them, and a rerun resumes from the jobs rank 0 wrote.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from .checks import as_list
from .distributed import check_same_parameters, current_rank, from_rank0
from .identity import display_name, identity_key, model_identity
from .models import default_apply_method, environment
from .passkey import make_prompt
from .results import ResultStore, check_out
from .runner import Job, canonical_methods, run_jobs

PASSKEY_TASK = "ropelab_passkey"


class RankFailed(BaseException):
    """A job failed on one rank of a data-parallel lm-eval run; the run stops.

    Not an `Exception`, so the job runner does not record it and go on to the next job (which
    it does in one process): the other ranks are waiting for this one inside lm-eval's
    collectives, and only stopping the run (torchrun then stops them) keeps them in step.
    """


class FollowerStore:
    """What the job runner writes to on ranks other than 0 of a data-parallel run: nothing.

    It knows rank 0's done jobs, so every rank runs the same pending jobs.
    """

    shard = None  # every rank runs every job (lm-eval splits inside each job), no share

    def __init__(self, done):
        self._done = set(done)

    def done(self) -> set[str]:
        return set(self._done)

    def append(self, record: dict) -> None:
        pass

    def merged(self) -> list[dict]:
        return []

_TASK_YAML = """\
# Written by ropelab.evals.lmeval.write_passkey_task; the data lies beside it.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: digits
    filter:
      - function: regex
        regex_pattern: "(\\\\d{{5}})"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "lm-eval is not installed: the lm-eval bridge needs `pip install 'ropelab[lmeval]'`"
        ) from None
    return lm_eval


def write_passkey_task(directory, tokenizer, lengths, depths=(0.1, 0.5, 0.9), trials: int = 1, seed: int = 0,
                       task: str = PASSKEY_TASK, max_gen_toks: int = 8) -> Path:
    """Write `<task>.yaml` and `<task>.jsonl` (prompts from `passkey.make_prompt`) into `directory`."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", task):
        raise ValueError(f"task={task!r}: use letters, digits and underscores")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{task}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for n in lengths:
            for d in depths:
                for t in range(trials):
                    p = make_prompt(tokenizer, n, d, t, seed)
                    f.write(json.dumps({"prompt": p.text, "answer": p.key, "length": n, "depth": d, "trial": t}) + "\n")
    (directory / f"{task}.yaml").write_text(
        _TASK_YAML.format(task=task, data=json.dumps(str(data.resolve())), max_gen_toks=max_gen_toks)
    )
    return directory


def _local_tasks(include_path) -> set[str]:
    names = set()
    for f in Path(include_path).rglob("*.y*ml") if include_path else []:
        names.update(re.findall(r"^task:\s*(\S+)", f.read_text(encoding="utf-8"), flags=re.M))
    return names


def run_lm_eval(model, tokenizer, tasks, *, method=None, include_path=None, limit=None, max_length=None,
                batch_size: int = 1, apply_method=None, log_samples: bool = False) -> dict:
    """`lm_eval.simple_evaluate` on `model` with `method` applied (None: as it is); returns its results dict.

    In a process group of several ranks, lm-eval's data-parallel mode (module docstring):
    call it on every rank; rank 0 returns the whole results, the others None.

    Built-in tasks are indexed only when some task is not found under `include_path`
    (indexing them all takes seconds).
    """
    require_lm_eval()
    import ropelab
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ropelab.patches.handle import probe_device

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    defaults = not set(tasks) <= _local_tasks(include_path)
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=defaults)
    if current_rank().launched:  # lm-eval splits the requests over the ranks
        from .lmeval_parallel import DataParallelHFLM

        HFLM = DataParallelHFLM  # noqa: N806
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
              device=str(probe_device(model)))
    with contextlib.ExitStack() as stack:
        if method is not None:
            stack.enter_context((apply_method or default_apply_method)(model, ropelab.parse_method(method)))
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=log_samples)


def lm_eval_run(model, tokenizer, tasks, methods=("rope",), *, out=None, model_id: str = "model",
                model_source: dict | None = None, include_path=None, limit=None, max_length=None,
                apply_method=None, progress: bool = True) -> list[dict]:
    """Run (or resume) every task × method on the runner; records go to `out/lm_eval.jsonl`.

    In a process group of several ranks (torchrun), call it on every rank: data-parallel
    (module docstring); every rank returns rank 0's records.
    """
    tasks = [t for t in as_list(tasks, "tasks", (str,)) if isinstance(t, str) and t.strip()]
    if not tasks:
        raise ValueError("tasks=[]: give at least one lm-eval task name")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ValueError(f"limit={limit!r}: must be a number > 0 (>= 1: examples per task; < 1: a fraction)")
    entries = canonical_methods(methods)
    if out is not None:
        check_out(out)
    require_lm_eval()
    identity = model_identity(model, model_source or model_id)
    key = identity_key(identity)
    params = {"protocol": "lm-eval", "limit": limit, "max_length": max_length,
              "include_path": str(Path(include_path).resolve()) if include_path else None}
    header = {"kind": "lm-eval", "model": display_name(identity), "model_identity": identity, "model_key": key,
              **params, "environment": environment()}

    rank = current_rank()

    def execute(method, job):
        task = job.fields["task"]
        try:
            result = run_lm_eval(model, tokenizer, [task], include_path=include_path, limit=limit,
                                 max_length=max_length)
        except Exception as exc:
            if rank.launched:
                raise RankFailed(f"rank {rank.rank}: task {task}: {type(exc).__name__}: {exc}") from exc
            raise
        if result is None:  # a rank other than 0 of a data-parallel run: rank 0 has the results
            return {}
        return {"results": json.loads(json.dumps(result["results"].get(task, {}), default=str))}

    def run(store):
        return run_jobs(model, store, entries, lambda entry: [Job({"task": t, "length": max_length or 0}) for t in tasks],
                        execute, model_key=key, params=params,
                        base={"type": "lm-eval", "model": display_name(identity), "params": params},
                        apply_method=apply_method or default_apply_method, desc="lm-eval",
                        progress=progress and rank.rank == 0)

    if not rank.launched:
        with ResultStore(out, "lm-eval") as store:
            store.begin(header)
            return run(store)
    # data-parallel: the same run on every rank (refused on all if not), rank 0 the only writer
    check_same_parameters({"model_key": key, "params": params, "tasks": tasks, "methods": [e.spec for e in entries]})
    with contextlib.ExitStack() as stack:

        def open_store():
            store = stack.enter_context(ResultStore(out, "lm-eval"))
            store.begin(header)
            opened.append(store)
            return sorted(store.done())

        opened: list = []
        done = from_rank0(open_store)
        records = run(opened[0] if opened else FollowerStore(done))
        return from_rank0(lambda: records)
