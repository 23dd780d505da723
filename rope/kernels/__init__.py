"""The attention kernels behind `ropelab.attention.rotary_attention`: a plan (plan.py),
the log-sum-exp merge (merge.py), rotation tables (tables.py) and one module per backend
(cpu.py, eager.py, flash_attn.py)."""
