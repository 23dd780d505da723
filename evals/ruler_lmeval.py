"""RULER-style tasks (evals/ruler.py) as local lm-evaluation-harness tasks, for the bridge in
evals/lmeval.py: `ropelab lm-eval --tasks ropelab_ruler_niah_single` writes them into
`OUT/tasks` at `--passkey-lengths` (as it does `ropelab_passkey`); from Python,
`write_ruler_tasks(DIR, ...)` then `lm_eval_run(..., include_path=DIR)`.

`write_ruler_tasks` writes, per task, `ropelab_ruler_<task>.yaml` and its data
(`.jsonl`: the generated prompts, their expected strings, length and depth) and one
`ropelab_ruler_utils.py` whose `process_results` scores with `ruler.score` (RULER's string
match), so the harness reports the same numbers as `ropelab ruler`. Prompts are generated
here, with the tokenizer's chat template applied or not as asked; the harness sends them
as text, so they run with no download.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from .ruler import TASKS, get_task, make_samples

PREFIX = "ropelab_ruler_"

_YAML = """\
# Written by ropelab.evals.ruler_lmeval.write_ruler_tasks; the data lies beside it.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answers | join(', ')}}}}"
process_results: !function ropelab_ruler_utils.process_results
generation_kwargs:
  until: []
  do_sample: false
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: string_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_UTILS = '''"""Written by ropelab.evals.ruler_lmeval: RULER's string match for the harness."""

from ropelab.evals.ruler import score


def process_results(doc, results):
    return {"string_match": score(results[0], doc["answers"], doc["metric"])}
'''


def task_name(task: str) -> str:
    return PREFIX + task.replace("-", "_")


def ruler_tasks_named(names) -> list[str]:
    """The RULER-style tasks (`ruler.TASKS`) behind the lm-eval task names among `names` that start
    with `ropelab_ruler_`; ValueError with a did-you-mean for such a name that is none of them."""
    known = {task_name(t): t for t in TASKS}
    tasks = []
    for name in names:
        if not name.startswith(PREFIX):
            continue
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"task={name!r}: no such RULER-style task; {hint}available: {', '.join(known)}")
        tasks.append(known[name])
    return tasks


def write_ruler_tasks(directory, tokenizer, tasks, lengths, depths=(0.5,), samples: int = 1, seed: int = 0,
                      chat_template: str = "off") -> list[str]:
    """Write the task files into `directory`; returns the lm-eval task names. All input checked first."""
    for t in tasks:
        get_task(t)
    generated = make_samples(tokenizer, tasks, lengths, depths, samples, seed, chat_template)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ropelab_ruler_utils.py").write_text(_UTILS)
    names = []
    for t in tasks:
        name = task_name(t)
        data = directory / f"{name}.jsonl"
        mine = [s for s in generated if s.task == t]
        with open(data, "w", encoding="utf-8") as f:
            for s in mine:
                f.write(json.dumps({"prompt": s.prompt, "answers": s.answers, "metric": s.metric, "length": s.length,
                                    "depth": s.depth, "index": s.index, "chat_template": s.chat_template}) + "\n")
        (directory / f"{name}.yaml").write_text(
            _YAML.format(task=name, data=json.dumps(str(data.resolve())), max_gen_toks=get_task(t).max_new_tokens))
        names.append(name)
    return names
