"""A thin bridge to lm-evaluation-harness (EleutherAI/lm-evaluation-harness, 0.4.x).

Any lm-eval task runs on a patched model: `HFLM(pretrained=model, tokenizer=tok,
max_length=...)` accepts an already-built model, and `simple_evaluate(...,
task_manager=TaskManager(include_path=DIR))` finds local tasks. The passkey test ships as
such a local task, written with its data by `write_passkey_task` (`dataset_path: json`,
`generate_until`, a regex filter for the 5 digits), so it runs with no download.

`lm_eval_run` runs tasks on the one runner (`runner.py`): a job is one task at one setting
(method, limit, max_length, include path), recorded in `lm_eval.jsonl` like every other eval
kind (resumable, locked). lm-eval is optional: `pip install 'ropelab[lmeval]'`.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from .checks import as_list
from .identity import display_name, identity_key, model_identity
from .models import default_apply_method, environment
from .passkey import make_prompt
from .results import ResultStore, check_out
from .runner import Job, canonical_methods, run_jobs

PASSKEY_TASK = "ropelab_passkey"

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
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
              device=str(probe_device(model)))
    with contextlib.ExitStack() as stack:
        if method is not None:
            stack.enter_context((apply_method or default_apply_method)(model, ropelab.parse_method(method)))
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=log_samples)


def lm_eval_run(model, tokenizer, tasks, methods=("rope",), *, out=None, model_id: str = "model",
                model_source: dict | None = None, include_path=None, limit=None, max_length=None,
                apply_method=None, progress: bool = True) -> list[dict]:
    """Run (or resume) every task × method on the runner; records go to `out/lm_eval.jsonl`."""
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

    def execute(method, job):
        task = job.fields["task"]
        result = run_lm_eval(model, tokenizer, [task], include_path=include_path, limit=limit, max_length=max_length)
        return {"results": json.loads(json.dumps(result["results"].get(task, {}), default=str))}

    with ResultStore(out, "lm-eval") as store:
        store.begin(header)
        return run_jobs(model, store, entries, lambda entry: [Job({"task": t, "length": max_length or 0}) for t in tasks],
                        execute, model_key=key, params=params,
                        base={"type": "lm-eval", "model": display_name(identity), "params": params},
                        apply_method=apply_method or default_apply_method, desc="lm-eval", progress=progress)
