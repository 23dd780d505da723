"""One process (or one torchrun rank) of tests/evals/test_lmeval_parallel.py.

    lmeval_worker.py MODEL_DIR TASK_DIR OUT_JSON TASK[,TASK...]

Runs `run_lm_eval` with `log_samples=True` on the model folder (joining torchrun's gloo
process group when launched by it); the process that gets the results (rank 0) writes the
results and every document's responses to OUT_JSON.
"""

import json
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

from ropelab.evals.distributed import Rank, init_process_group
from ropelab.evals.lmeval import run_lm_eval

model_dir, task_dir, out, tasks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
init_process_group(Rank.from_environment(), "gloo")
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
tokenizer = AutoTokenizer.from_pretrained(model_dir)
result = run_lm_eval(model, tokenizer, tasks, method="ntk:scale=2", include_path=task_dir, max_length=512,
                     log_samples=True)
if result is not None:
    samples = {task: sorted(({"doc_id": s["doc_id"], "resps": s["resps"], "filtered_resps": s["filtered_resps"]}
                             for s in result["samples"][task]), key=lambda s: s["doc_id"]) for task in tasks}
    with open(out, "w") as f:
        json.dump({"results": result["results"], "samples": samples}, f, default=str)
