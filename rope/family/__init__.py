"""The registered position methods: one small file each (see docs/methods.md)."""

from . import (  # noqa: F401  (importing registers)
    beta_base,
    dca,
    dynamic_ntk,
    inverse_leaky_rerope,
    leaky_rerope,
    lm_infinite,
    linear,
    llama3,
    longrope,
    ntk,
    ntk_old,
    rerope,
    rope,
    self_extend,
    sinks,
    sinusoidal,
    string,
    yarn,
)
