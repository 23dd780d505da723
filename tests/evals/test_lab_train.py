"""The lab's training loop on micro models (seconds each): every position module learns,
saved models reload exactly, an interrupted run resumes into the same loss sequence, and
bad input is refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from lab_helpers import corpus, micro_config, read_losses, snapshot  # noqa: F401  (corpus: a fixture)

from ropelab.evals.lab import POSITIONS, TrainConfig, train


@pytest.mark.parametrize("position", POSITIONS)
def test_each_position_learns_and_reloads(position, corpus, tokenizer, tmp_path):
    kept = {}
    record = train(micro_config(position, corpus, tokens=4 * 16 * 24), tmp_path / "run", tokenizer=tokenizer,
                   progress=False, on_finish=lambda m: kept.setdefault("model", m))
    losses = read_losses(tmp_path / "run")
    assert len(losses) == 24
    # From ln(300) ≈ 5.7 nats at initialisation; 24 steps on a 300-token vocabulary take a
    # micro model well below it. The mean of the last 4 steps must fall by at least 1 nat.
    assert sum(losses[-4:]) / 4 < losses[0] - 1.0, losses
    assert record["summary"]["steps"] == 24 and (tmp_path / "run" / "loss_curve.png").exists()

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        want = kept["model"].eval()(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    # Same weights, same architecture and kernels: bit-identical (safetensors stores fp32 exactly).
    assert torch.equal(got, want)


def test_resume_repeats_the_uninterrupted_run(corpus, tokenizer, tmp_path):
    config = micro_config("rope", corpus, tokens=4 * 16 * 9)
    train(config, tmp_path / "whole", tokenizer=tokenizer, progress=False, save_every=2)
    first = train(config, tmp_path / "cut", tokenizer=tokenizer, progress=False, save_every=2, stop_after=5)
    assert "summary" not in first and len(read_losses(tmp_path / "cut")) == 5
    # steps 4 (computed, never checkpointed) is dropped from the log and computed again
    train(config, tmp_path / "cut", tokenizer=tokenizer, progress=False, save_every=2)
    whole, cut = read_losses(tmp_path / "whole"), read_losses(tmp_path / "cut")
    assert len(cut) == 9
    assert cut == whole  # same seed, same data order, optimizer and scheduler restored: exactly equal
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_through_the_patched_attention(corpus, tokenizer, tmp_path):
    """inverse-leaky trains through ropelab's attention; the checkpoint is saved unpatched and re-patched."""
    config = micro_config("inverse-leaky", corpus, tokens=4 * 16 * 5)
    train(config, tmp_path / "whole", tokenizer=tokenizer, progress=False, save_every=2)
    train(config, tmp_path / "cut", tokenizer=tokenizer, progress=False, save_every=2, stop_after=3)
    train(config, tmp_path / "cut", tokenizer=tokenizer, progress=False, save_every=2)
    assert read_losses(tmp_path / "cut") == read_losses(tmp_path / "whole")


def test_same_run_twice_is_a_no_op(corpus, tokenizer, tmp_path):
    config = micro_config("alibi", corpus, tokens=4 * 16 * 3)
    train(config, tmp_path / "run", tokenizer=tokenizer, progress=False)
    before = snapshot(tmp_path / "run")
    record = train(config, tmp_path / "run", tokenizer=tokenizer, progress=False)
    assert record["summary"]["steps"] == 3
    assert snapshot(tmp_path / "run", skip=("lab.json", "loss_curve.png")) == {
        k: v for k, v in before.items() if k not in ("lab.json", "loss_curve.png")}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(position="xpos"), "position='xpos': unknown position module"),
        (dict(position="ropee"), "did you mean 'rope'"),
        # the budget asks for one 200k-token sequence; the micro corpus has far fewer training tokens
        (dict(train_length=200_000, batch_size=1, tokens=200_000), "train_length=200000: above the corpus's"),
        (dict(size="30x2x4"), "hidden 30 must be divisible by heads 4"),
        (dict(size="4096x48x32"), "size='4096x48x32': training needs about"),
    ],
)
def test_bad_input_is_refused_before_writing(change, message, corpus, tokenizer, tmp_path):
    config = micro_config("rope", corpus, tokens=4 * 16 * 3)
    config = TrainConfig(**{**config.__dict__, **change})
    limit = None if "train_length" in change else 8 * 2**30  # the memory check is not what the corpus case tests
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(config, tmp_path / "run", tokenizer=tokenizer, progress=False, memory_limit=limit)
    assert not (tmp_path / "run").exists()


def test_bad_device_is_refused(corpus, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="device='tpu': must be cpu, cuda or cuda:N"):
        train(micro_config("rope", corpus), tmp_path / "run", tokenizer=tokenizer, device="tpu", progress=False)
    assert not (tmp_path / "run").exists()


def test_odd_head_dimension_is_refused_for_rotary(corpus, tokenizer, tmp_path):
    config = TrainConfig(**{**micro_config("rope", corpus).__dict__, "size": "12x2x4"})  # head dim 3
    with pytest.raises(ValueError, match="head dimension 3 must be even"):
        train(config, tmp_path / "run", tokenizer=tokenizer, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_folder_holding_another_run_is_refused_untouched(corpus, tokenizer, tmp_path):
    config = micro_config("rope", corpus, tokens=4 * 16 * 3)
    train(config, tmp_path / "run", tokenizer=tokenizer, progress=False)
    before = snapshot(tmp_path / "run")
    other = TrainConfig(**{**config.__dict__, "seed": 1})
    with pytest.raises(ValueError, match=r"holds a different run \(differs in: seed\)"):
        train(other, tmp_path / "run", tokenizer=tokenizer, progress=False)
    assert snapshot(tmp_path / "run") == before
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no lab.json"):
        train(config, tmp_path / "stranger", tokenizer=tokenizer, progress=False)
    assert [p.name for p in (tmp_path / "stranger").iterdir()] == ["notes.txt"]


def test_cli_exit_codes(corpus, tmp_path, capsys):
    from ropelab.evals.lab.cli import main

    assert main(["train", "--position", "bogus", "--out", str(tmp_path / "r"), "--data", str(corpus)]) == 2
    assert "position='bogus': unknown position module" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_run_record_names_tokenizer_and_method(corpus, tokenizer, tmp_path):
    train(micro_config("rope-logn", corpus, tokens=4 * 16 * 2), tmp_path / "run", tokenizer=tokenizer,
          progress=False)
    run = json.loads((tmp_path / "run" / "lab.json").read_text())["run"]
    assert run["training_method"] == "rope:train_length=4,logn=true"  # the canonical spec text
    assert run["logn_length"] == 4 and run["tokenizer"] == "micro-bpe"


def test_corpus_tokenizer_is_trained_once_and_reused_on_resume(corpus, tmp_path):
    config = micro_config("rope", corpus, tokens=4 * 16 * 4, tokenizer="corpus:320")
    train(config, tmp_path / "whole", progress=False, save_every=2)
    train(config, tmp_path / "cut", progress=False, save_every=2, stop_after=3)
    saved = snapshot(tmp_path / "cut" / "tokenizer")
    train(config, tmp_path / "cut", progress=False, save_every=2)
    assert snapshot(tmp_path / "cut" / "tokenizer") == saved
    assert read_losses(tmp_path / "cut") == read_losses(tmp_path / "whole")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "whole" / "model")
    assert len(tok) == 320 and tok.eos_token == "<|endoftext|>"
    # trained on training documents only: the held-out split is the corpus's, not the tokenizer's
    assert json.loads((tmp_path / "whole" / "lab.json").read_text())["run"]["tokenizer"] == "corpus:320"


def test_training_blocks_are_drawn_from_the_whole_training_split(corpus, tokenizer, tmp_path):
    """tokens.pt holds distinct whole blocks of the training stream, spread over all of it, and
    the stream is the training documents alone (held-out documents never enter it)."""
    from ropelab.evals.data import iter_documents
    from ropelab.evals.lab.corpus import is_heldout, training_stream

    config = micro_config("rope", corpus, tokens=4 * 16 * 6)  # 24 blocks of 16 tokens
    train(config, tmp_path / "run", tokenizer=tokenizer, progress=False, stop_after=1)
    stream = training_stream(str(corpus), tokenizer, 4)
    docs = [d for d in iter_documents(str(corpus)) if d.text.strip()]
    training = [d for d in docs if not is_heldout(d.id, 4)]
    assert 0 < len(training) < len(docs)  # the corpus fixture holds both kinds
    eos = tokenizer.eos_token_id
    want = [t for d in training for t in tokenizer(d.text, add_special_tokens=False)["input_ids"] + [eos]]
    assert stream.tolist() == want
    blocks = stream[: len(stream) // 16 * 16].view(-1, 16)
    rows = torch.load(tmp_path / "run" / "tokens.pt").view(-1, 16)
    assert len(rows) == 24 and len(blocks) > 4 * len(rows)  # a sample, not the whole split
    index = {tuple(b): i for i, b in enumerate(blocks.tolist())}
    picked = [index[tuple(r)] for r in rows.tolist()]  # KeyError: a row that is not a whole block
    assert len(set(picked)) == 24
    # Reading in order would take blocks 0..23; a uniform sample of 24 of them reaches the last
    # quarter of the split and the first quarter (a miss has probability < 1e-3 per quarter).
    assert min(picked) < len(blocks) // 4 and max(picked) >= 3 * len(blocks) // 4, picked


def test_the_sample_is_a_function_of_the_seed(corpus, tokenizer):
    from ropelab.evals.lab.corpus import sample_blocks, training_stream

    stream = training_stream(str(corpus), tokenizer, 4)
    a, b, c = (sample_blocks(stream, 16, 20, seed) for seed in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    everything = sample_blocks(stream, 16, 10**9, 7)  # a budget above the split: every block once
    assert len(everything) == len(stream) // 16 and len({tuple(r) for r in everything.tolist()}) == len(everything)


@pytest.mark.parametrize("blocks, batch", [(10, 4), (24, 4), (7, 2)])
def test_no_step_repeats_a_block(blocks, batch):
    """Each step's B rows are distinct, so data-parallel ranks (which split them) never share a
    block, also where a pass over the blocks ends inside what would be a step; every pass uses
    distinct blocks; the rows are a function of (seed, step)."""
    from ropelab.evals.lab.train import batch_rows

    per_pass = blocks // batch
    for p in range(3):
        seen = []
        for step in range(p * per_pass, (p + 1) * per_pass):
            rows = batch_rows(step, batch, blocks, seed=3).tolist()
            assert len(rows) == batch and len(set(rows)) == batch and all(0 <= r < blocks for r in rows)
            assert rows == batch_rows(step, batch, blocks, seed=3).tolist()
            seen += rows
        assert len(set(seen)) == len(seen) == per_pass * batch


def test_cuda_asked_where_absent_is_exit_2(corpus, tmp_path, capsys, monkeypatch):
    """On a machine without CUDA (forced here, so the test means the same on a GPU machine)."""
    from ropelab.evals.lab.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["train", "--position", "rope", "--size", "micro", "--data", str(corpus), "--out", str(tmp_path / "r")]
    assert main([*args, "--device", "cuda"]) == 2
    assert "device='cuda': no CUDA device is available here" in capsys.readouterr().err
    assert main([*args, "--device", "gpu"]) == 2
    assert "device='gpu': must be cpu, cuda or cuda:N" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
