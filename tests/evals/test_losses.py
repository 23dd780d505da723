"""Chunked LM-head losses equal a direct computation from the model's full logits."""

import pytest
import torch
import torch.nn.functional as F

from ropelab.evals.losses import check_head, token_losses

from evals_helpers import make_llama


def direct_losses(model, ids):
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[1:], reduction="none")


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_per_position_losses_equal_full_logits(chunk):
    model = make_llama(97, seed=1)
    ids = torch.randint(0, 97, (50,), generator=torch.Generator().manual_seed(0))
    mine = token_losses(model, ids, chunk=chunk)
    assert mine.shape == (49,)
    # float32 losses of a few nats; the chunked head multiplies in other row blocks (~1e-7 each)
    torch.testing.assert_close(mine, direct_losses(model, ids), atol=1e-5, rtol=1e-5)


def test_chunked_equals_unchunked():
    # Equal up to float rounding: BLAS blocks a 5-row matmul differently from a 63-row one.
    model = make_llama(97, seed=2)
    ids = torch.randint(0, 97, (64,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(token_losses(model, ids, chunk=5), token_losses(model, ids, chunk=10_000),
                               atol=2e-6, rtol=0)


def test_final_logit_softcapping_is_applied():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=97, final_logit_softcapping=0.5,
                          sliding_window=16, max_position_embeddings=64)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # large weights so that the cap matters
        model.get_output_embeddings().weight.mul_(50)
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(2))
    # as above: float32 rounding of the chunked head, capped logits of magnitude ≤ the cap
    torch.testing.assert_close(token_losses(model, ids, chunk=8), direct_losses(model, ids), atol=1e-5, rtol=1e-5)
    check_head(model)


def test_check_head_catches_unknown_postprocessing(monkeypatch):
    import dataclasses

    from ropelab.patches import model_facts

    model = make_llama(97, seed=3)
    # a family fact that disagrees with the model (Llama's head applies no cap): a mismatch
    llama = dataclasses.replace(model_facts.FAMILIES["llama"], logits=model_facts.SOFTCAP)
    monkeypatch.setitem(model_facts.FAMILIES, "llama", llama)
    model.config.final_logit_softcapping = 0.1
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50)
    with pytest.raises(RuntimeError, match="differ from the model's logits"):
        check_head(model)


def test_bad_input_names_the_field():
    model = make_llama(97)
    with pytest.raises(ValueError, match="input_ids.shape"):
        token_losses(model, [1])
