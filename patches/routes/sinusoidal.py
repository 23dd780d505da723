"""The sinusoidal route: frequency maps applied to an additive sinusoidal position table
(Vaswani et al. 2017). The family's own file (model_facts `Family.module`; XGLM:
patches/xglm.py) builds the new table forward and its probe."""

from __future__ import annotations

import importlib

from torch import nn

from ...method import Method
from ..model_facts import Family, train_length
from .plan import Plan


def plan(model: nn.Module, method: Method, model_type: str, family: Family) -> Plan:
    table = importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.{family.module}")
    apply, check = table.plan(model, method)
    method = method.with_model(train_length(model.config), None, model.config.max_position_embeddings)
    return Plan("sinusoidal", model_type, method, apply, check, "sinusoidal position table recomputed")
