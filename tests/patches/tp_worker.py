"""One rank of tests/patches/test_tensor_parallel.py (started by torchrun): loads the tiny
model with transformers' tensor parallelism, patches it, records logits and head counts."""

import json
import os
import sys

import torch.distributed as dist

import ropelab.attention
from ropelab.patches import patch

folder, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import logits, tokens  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

try:
    from transformers import DistributedConfig

    tp = {"distributed_config": DistributedConfig(tp_plan="auto")}
except ImportError:  # transformers before DistributedConfig took the plan directly
    tp = {"tp_plan": "auto"}

rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", **tp).eval()
heads_seen = []
kernel = ropelab.attention.run_plan  # every attention-route call runs a plan (decode steps share one per step)


def recording(plan, *args, **kwargs):
    heads_seen.append(plan.query.shape[1])
    return kernel(plan, *args, **kwargs)


ropelab.attention.run_plan = recording
ids = tokens(48)
result = {"rank": rank, "unpatched": logits(model, ids).tolist(),
          "q_proj_local": list(model.model.layers[0].self_attn.q_proj.weight.to_local().shape)}
for spec in ("ntk:scale=2", "rerope:window=8"):
    heads_seen.clear()
    with patch(model, spec):
        result[spec] = logits(model, ids).tolist()
    result[spec + " heads"] = sorted(set(heads_seen))
result["undone"] = logits(model, ids).tolist()
dist.destroy_process_group()
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(result, f)
