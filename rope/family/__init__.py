"""The registered position methods: one small file each (see docs/methods.md)."""

from . import (  # noqa: F401  (importing registers)
    beta_base,
    dynamic_ntk,
    inverse_leaky_rerope,
    leaky_rerope,
    linear,
    llama3,
    longrope,
    ntk,
    ntk_old,
    rerope,
    rope,
    self_extend,
    sinusoidal,
    yarn,
)
