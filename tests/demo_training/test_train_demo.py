"""The demo model's training script: a few real steps on a small slice of the corpus, and the
file it writes loading as a full LLaDA model that behaves as if every vocabulary row had been
trained (the compact-vocabulary shortcut of training/train_demo.py changes nothing)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open

from server.engine.demo import load_demo, save_checkpoint, tokenizer_ids
from server.engine.loader import load_checkpoint
from server.engine.models.llada import LLaDAModel
from training.corpus import HELD_OUT_EVERY, chat_pairs, load_corpus
from training.quality import opening_sentence, question_sets, spread, word_f1
from training.train_demo import CompactVocab, grow, learning_rate, main, read_weights

SMALL = ["--threads", "0", "--init", "none", "--docs", "300", "--d-model", "32", "--layers", "2", "--heads", "2"]
SMALL += ["--mlp-hidden", "64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "demo.safetensors"
    args = [*SMALL, "--steps", "60", "--sft-steps", "10", "--batch", "8", "--sft-batch", "8", "--seq-len", "64"]
    args += ["--log-every", "10"]
    summary = main([*args, "--out", str(out)])
    return summary, out


def test_the_loss_goes_down(trained):
    summary, _ = trained
    pretrain = summary["history"]["pretrain"]
    # the SFT phase's 10 steps: every third stays pre-training (--sft-mix 3)
    assert len(pretrain) == 53 and len(summary["history"]["sft"]) == 7
    first, last = sum(pretrain[:10]) / 10, sum(pretrain[-10:]) / 10
    assert last < first - 1.0, (first, last)
    assert summary["held_out_loss"] < first


def test_the_written_model_is_a_full_llada_model_whose_untrained_rows_stay_equal(trained):
    _, out = trained
    loaded = load_demo(path=out)
    wte, head = loaded.model.model.transformer.wte.weight, loaded.model.model.transformer.ff_out.weight
    assert wte.shape == head.shape == (126464, 32)
    others = torch.ones(126464, dtype=torch.bool)
    others[tokenizer_ids()] = False
    assert torch.equal(head[others], head[others][:1].expand(int(others.sum()), -1))
    # The full model's softmax over LLaDA's 126464 ids is the compact model's, with the shared
    # row counted once per id it stands for.
    with safe_open(str(out), framework="pt") as weights:
        rows = weights.get_tensor("model.transformer.ff_out.weight")
    ids = torch.tensor([loaded.codec.encode_chat([{"role": "user", "content": "What does len do?"}]) + [126336] * 8])
    with torch.inference_mode():
        hidden = loaded.model.padded_hidden(ids)
        full = torch.log_softmax(loaded.model.logits(hidden), -1)
        normed = loaded.model.model.transformer.ln_f(hidden)
        compact = torch.log_softmax(normed @ rows.T + CompactVocab().logit_offset(), -1)
    torch.testing.assert_close(full[..., tokenizer_ids()], compact[..., :-1], rtol=1e-4, atol=1e-4)


def test_the_written_model_saves_and_loads_as_a_llada_folder(trained, tmp_path):
    _, out = trained
    loaded = load_demo(path=out)
    reloaded = load_checkpoint(save_checkpoint(loaded, tmp_path / "demo"), device="cpu", dtype="float32")
    ids = torch.tensor([loaded.codec.encode("import this") + [126336] * 4])
    with torch.inference_mode():
        assert torch.equal(loaded.model.full_logits(ids), reloaded.model.full_logits(ids))


def test_a_grown_model_computes_what_the_trained_one_did_until_it_trains(trained, tmp_path):
    _, out = trained
    state, config = read_weights(str(out))
    assert config.n_layers == 2
    grown = tmp_path / "grown.safetensors"
    summary = main(
        [*SMALL, "--init", str(out), "--layers", "3", "--steps", "0", "--sft-steps", "0", "--out", str(grown)]
    )
    assert summary["history"] == {"pretrain": [], "sft": []}
    small, big = load_demo(path=out), load_demo(path=grown)
    assert big.config.n_layers == 3 and big.config.d_model == config.d_model
    ids = torch.tensor([small.codec.encode("import this") + [126336] * 4])
    with torch.inference_mode():
        torch.testing.assert_close(small.model.full_logits(ids), big.model.full_logits(ids))
    compact = LLaDAModel(dataclasses.replace(config, n_layers=3, vocab_size=CompactVocab().rows))
    with pytest.raises(ValueError):
        grow(compact, state | {"unexpected": torch.zeros(1)}, 2, 3)


def test_a_run_resumed_from_its_checkpoint_ends_where_an_unbroken_run_does(tmp_path):
    args = [*SMALL, "--steps", "12", "--sft-steps", "8", "--batch", "4", "--sft-batch", "4", "--seq-len", "32"]
    unbroken = main([*args, "--out", str(tmp_path / "a.safetensors")])
    checkpoint = str(tmp_path / "state.pt")
    # the checkpoint a run of 12 steps leaves after step 8, inside SFT (with SFT batches drawn
    # ahead): what a run stopped there would leave
    main([*args, "--checkpoint", checkpoint, "--checkpoint-every", "8", "--out", str(tmp_path / "b.safetensors")])
    state = torch.load(checkpoint, weights_only=False)
    assert state["step"] == 8
    resumed = main([*args, "--checkpoint", checkpoint, "--resume", "--out", str(tmp_path / "c.safetensors")])
    assert resumed["history"] == unbroken["history"]
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as a, safe_open(
        str(tmp_path / "c.safetensors"), framework="pt"
    ) as c:
        assert all(torch.equal(a.get_tensor(name), c.get_tensor(name)) for name in a.keys())


def test_the_learning_rate_warms_up_decays_to_a_tenth_then_restarts_for_sft():
    steps, sft, peak, sft_peak = 1000, 400, 3e-3, 2e-3
    lr = [learning_rate(step, steps, sft, peak, sft_peak, warmup=100) for step in range(steps)]
    assert lr[0] == pytest.approx(peak / 100) and lr[99] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lr[99:600], lr[100:600]))  # the cosine only goes down
    assert lr[599] == pytest.approx(0.1 * peak, rel=0.01)
    assert lr[600] < sft_peak and max(lr[600:]) == pytest.approx(sft_peak)
    assert lr[799] == pytest.approx(sft_peak) and lr[-1] == pytest.approx(0.1 * sft_peak, rel=0.05)


def test_the_corpus_is_pythons_own_documentation_split_into_train_and_held_out():
    corpus = load_corpus()
    names = {doc.name for doc in corpus.train}
    assert "topic:assert" in names or "topic:assert" in {doc.name for doc in corpus.held_out}
    assert "json.dumps" in names | {doc.name for doc in corpus.held_out}
    assert len(corpus.held_out) == (len(corpus.train) + len(corpus.held_out)) // HELD_OUT_EVERY
    pairs = chat_pairs(corpus.train)
    assert len(pairs) > 1000
    assert all(answer.isascii() and len(answer) <= 100 for _, answer in pairs)


def test_the_answer_figures_compare_words_and_first_sentences():
    assert word_f1("Return the cat.", "Return a cat") == pytest.approx(2 / 3)
    assert word_f1("Serialize obj to a JSON formatted str.", "Serialize ``obj`` to a JSON formatted ``str``.") == 1.0
    assert word_f1("", "anything") == 0.0 and word_f1("nothing alike", "at all") == 0.0
    assert opening_sentence("Join two paths.  Then more.\nAnd more.") == "Join two paths."
    assert spread(list(range(10)), 5) == [0, 2, 4, 6, 8] and spread([1, 2], 5) == [1, 2]
    asked = question_sets(100)
    assert len(asked["train"]) == len(asked["held_out"]) == 100
    train_questions = {q for q, _ in chat_pairs(load_corpus().train)}
    assert all(q in train_questions for q, _ in asked["train"])
    assert not train_questions & {q for q, _ in asked["held_out"]}
