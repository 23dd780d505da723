"""Per-position losses on a model accelerate dispatched over CPU and disk (its weights sit on
the meta device between forwards): the inputs go to the hook's execution device, and the
losses equal the undispatched model's bit for bit (the same float32 arithmetic on the CPU)."""

from __future__ import annotations

import torch

from ropelab.evals.loading import load_model
from ropelab.evals.losses import check_head, token_losses


def test_losses_on_a_disk_offloaded_model(model_dir, model):
    # 20 kB of CPU for a ~100 kB model: accelerate sends the rest to disk
    dispatched, _, _ = load_model(str(model_dir), device_map="sequential", max_memory="cpu=20KB")
    assert "disk" in set(dispatched.hf_device_map.values())
    ids = torch.arange(3, 43) % 300
    check_head(dispatched)
    assert torch.equal(token_losses(dispatched, ids, chunk=7), token_losses(model, ids, chunk=7))


def test_passkey_answer_on_a_disk_offloaded_model(model_dir, model, tokenizer):
    from ropelab.evals.passkey import answer, make_prompt

    dispatched, _, _ = load_model(str(model_dir), device_map="sequential", max_memory="cpu=20KB")
    prompt = make_prompt(tokenizer, 256, 0.5).text
    assert answer(dispatched, tokenizer, prompt) == answer(model, tokenizer, prompt)
