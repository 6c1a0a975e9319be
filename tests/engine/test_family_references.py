"""Self-checks of the tiny family checkpoints (tests/family.py) and their plain references
(tests/reference/model.py for iLLaDA's GQA + tied head, tests/reference/llada_moe.py for LLaDA-MoE):
the folders hold the published layouts, the references run on them, the MoE router picks top-k,
and the existing samplers (exact, fast, likelihood) run on both unchanged."""

from __future__ import annotations

import json
import runpy

import pytest
import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerFast

from tests.family import (
    ILLADA_BOS_ID,
    ILLADA_EOS_ID,
    ILLADA_EOT_ID,
    ILLADA_MASK_ID,
    LLADA_MOE_BOS_ID,
    LLADA_MOE_EOS_ID,
    LLADA_MOE_EOT_ID,
    LLADA_MOE_MASK_ID,
    LLADA_MOE_SHAPE,
    WEIGHTS_FILE,
    load_checkpoint,
    remote_code_marker,
    write_illada_checkpoint,
    write_llada_moe_checkpoint,
)
from tests.reference import llada_moe
from tests.reference import model as llada
from tests.reference.fast_sampler import reference_fast_generate
from tests.reference.likelihood import reference_loglikelihood
from tests.reference.sampler import reference_generate

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer(folder) -> PreTrainedTokenizerFast:
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token=settings["bos_token"],
        eos_token=settings["eos_token"],
        pad_token=settings["pad_token"],
    )
    tok.chat_template = settings["chat_template"]
    return tok


def _tensor_names(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


@pytest.fixture(scope="module")
def illada(tmp_path_factory):
    folder = write_illada_checkpoint(tmp_path_factory.mktemp("illada") / "tiny-illada", seed=0)
    return folder, *load_checkpoint(folder)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    folder = write_llada_moe_checkpoint(tmp_path_factory.mktemp("moe") / "tiny-llada-moe", seed=0)
    return folder, *load_checkpoint(folder)


# ---------------------------------------------------------------------------------------------- iLLaDA


def test_illada_folder_is_llada_layout_with_gqa_and_tied_head(illada):
    folder, state, cfg = illada
    assert cfg["architectures"] == ["LLaDAModelLM"] and cfg["model_type"] == "llada"
    assert cfg["weight_tying"] is True and cfg["n_kv_heads"] < cfg["n_heads"]
    assert cfg["mask_token_id"] == ILLADA_MASK_ID == 5
    names = _tensor_names(folder)
    assert "model.transformer.ff_out.weight" not in names  # tied: the head is wte
    head_dim = cfg["d_model"] // cfg["n_heads"]
    assert head_dim >= 8 and head_dim % 2 == 0
    assert names["model.transformer.blocks.0.k_proj.weight"] == (cfg["n_kv_heads"] * head_dim, cfg["d_model"])
    assert names["model.transformer.blocks.0.ff_proj.weight"] == (cfg["mlp_hidden_size"], cfg["d_model"])
    assert names["model.transformer.wte.weight"] == (cfg["vocab_size"], cfg["d_model"])

    tok = _tokenizer(folder)
    assert (tok.bos_token_id, tok.eos_token_id) == (ILLADA_BOS_ID, ILLADA_EOS_ID) == (0, cfg["eos_token_id"])
    assert tok.convert_tokens_to_ids("<|mask|>") == ILLADA_MASK_ID
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == ILLADA_BOS_ID and ILLADA_EOT_ID in ids
    assert max(tok.get_vocab().values()) < cfg["vocab_size"]


def test_illada_reference_runs_tied_and_grouped(illada):
    _, state, cfg = illada
    ids = torch.tensor([[ILLADA_BOS_ID, 20, 30, 40, ILLADA_MASK_ID, ILLADA_MASK_ID]])
    logits = llada.reference_logits(state, cfg, ids)
    assert logits.shape == (1, 6, cfg["vocab_size"]) and torch.isfinite(logits).all()
    # tied head: the logits move with the embedding matrix's rows (and no ff_out is read)
    bumped = dict(state)
    wte = state["model.transformer.wte.weight"].clone()
    wte[100] += 1.0  # a row no input uses: only the head sees it
    bumped["model.transformer.wte.weight"] = wte
    changed = llada.reference_logits(bumped, cfg, ids)
    diff = (changed - logits).abs()
    assert diff[..., 100].min() > 0 and diff[..., :100].max() == 0


# ---------------------------------------------------------------------------------------------- LLaDA-MoE


def expected_moe_names(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    f = cfg["expert_intermediate_size"]
    names = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (d, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, d),
                p + "self_attn.q_norm.weight": (hd,),
                p + "self_attn.k_norm.weight": (hd,),
                p + "mlp.gate.weight": (cfg["num_experts"], d),
            }
        )
        for e in range(cfg["num_experts"]):
            names.update(
                {
                    f"{p}mlp.experts.{e}.gate_proj.weight": (f, d),
                    f"{p}mlp.experts.{e}.up_proj.weight": (f, d),
                    f"{p}mlp.experts.{e}.down_proj.weight": (d, f),
                }
            )
    return names


def test_llada_moe_folder_is_published_layout(moe):
    folder, state, cfg = moe
    assert cfg["architectures"] == ["LLaDAMoEModelLM"] and cfg["model_type"] == "llada"
    assert "mask_token_id" not in cfg  # the mask comes from the tokenizer
    assert cfg["qk_layernorm"] is True and cfg["tie_word_embeddings"] is False
    assert cfg["moe_router_score_function"] == "softmax" and not cfg["norm_topk_prob"]
    assert _tensor_names(folder) == expected_moe_names(cfg)

    tok = _tokenizer(folder)
    assert tok.convert_tokens_to_ids("<|mask|>") == LLADA_MOE_MASK_ID
    assert tok.eos_token_id == tok.pad_token_id == LLADA_MOE_EOS_ID == cfg["eos_token_id"]
    assert tok.bos_token_id == LLADA_MOE_BOS_ID
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>"
    assert LLADA_MOE_EOT_ID in tok.encode(text, add_special_tokens=False)


def test_llada_moe_reference_logits(moe):
    _, state, cfg = moe
    ids = torch.tensor([[LLADA_MOE_BOS_ID, 72, 105, LLADA_MOE_MASK_ID, LLADA_MOE_MASK_ID]])
    logits = llada_moe.reference_logits(state, cfg, ids)
    assert logits.shape == (1, 5, cfg["vocab_size"]) and torch.isfinite(logits).all()
    # model.py hands a LLaDA-MoE config.json to the MoE reference
    assert torch.equal(llada.reference_logits(state, cfg, ids), logits)


def test_llada_moe_router_picks_top_k_unrenormalised(moe):
    _, state, cfg = moe
    ids = torch.tensor([[LLADA_MOE_BOS_ID, *range(60, 80), LLADA_MOE_MASK_ID]])
    k = cfg["num_experts_per_tok"]
    choices = llada_moe.router_choices(state, cfg, ids)
    assert len(choices) == cfg["num_hidden_layers"]
    used = set()
    for experts, weights in choices:
        assert experts.shape == weights.shape == (ids.shape[1], k)
        for row in experts.tolist():
            assert len(set(row)) == k  # k distinct experts per token
        assert (weights[:, :-1] >= weights[:, 1:]).all()  # ranked by probability
        assert (weights > 0).all() and (weights.sum(-1) < 1).all()  # softmax over all experts, not renormalised
        used |= set(experts.flatten().tolist())
    assert len(used) > k  # routing depends on the token


def test_llada_moe_output_follows_the_chosen_experts(moe):
    _, state, cfg = moe
    ids = torch.tensor([[LLADA_MOE_BOS_ID, 72, 105]])
    base = llada_moe.reference_logits(state, cfg, ids)
    last = cfg["num_hidden_layers"] - 1
    experts, _ = llada_moe.router_choices(state, cfg, ids)[last]
    chosen = set(experts.flatten().tolist())
    unused = sorted(set(range(cfg["num_experts"])) - chosen)
    assert unused, "three tokens x top-2 leave some of the 8 experts unused"

    def with_bumped_expert(e: int) -> torch.Tensor:
        bumped = dict(state)
        name = f"model.layers.{last}.mlp.experts.{e}.down_proj.weight"
        bumped[name] = state[name] + 0.5
        return llada_moe.reference_logits(bumped, cfg, ids)

    # an expert token 0 uses: token 0's logits move; an expert nobody uses in the last layer: nothing moves
    assert (with_bumped_expert(int(experts[0, 0]))[0, 0] - base[0, 0]).abs().max() > 1e-3
    assert torch.equal(with_bumped_expert(unused[0]), base)


# ---------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("which", ["illada", "moe"])
def test_reference_samplers_run_on_the_family(which, request):
    folder, state, cfg = request.getfixturevalue(which)
    if which == "illada":
        mask, eos, eot, prompt = ILLADA_MASK_ID, ILLADA_EOS_ID, ILLADA_EOT_ID, [ILLADA_BOS_ID, 20, 30, 40]
    else:
        mask, eos, eot, prompt = LLADA_MOE_MASK_ID, LLADA_MOE_EOS_ID, LLADA_MOE_EOT_ID, [LLADA_MOE_BOS_ID, 72, 105]

    def logits_fn(x):
        return llada.reference_logits(state, cfg, x)

    common = dict(gen_length=8, steps=8, block_length=4, mask_id=mask, eos_id=eos, eot_id=eot)
    exact = reference_generate(logits_fn, prompt, **common)
    assert len(exact) == 8 and mask not in exact and all(0 <= t < cfg["vocab_size"] for t in exact)
    # the fast reference with no cache and the fixed schedule is the exact sampler
    assert reference_fast_generate(state, cfg, prompt, **common)[0] == exact
    for fast in (dict(cache="prefix", threshold=0.9), dict(cache="dual", factor=1.0), dict(cache="dual")):
        tokens, nfe = reference_fast_generate(state, cfg, prompt, **common, **fast)
        assert len(tokens) == 8 and mask not in tokens and 1 <= nfe <= 8

    ll = reference_loglikelihood(
        logits_fn,
        prompt,
        exact[:3],
        mc_num=2,
        batch_size=2,
        cfg_scale=0.0,
        mask_id=mask,
        generator=torch.Generator().manual_seed(0),
    )
    assert ll < 0 and torch.isfinite(torch.tensor(ll))


# ---------------------------------------------------------------------------------------------- remote code


@pytest.mark.parametrize("write", [write_illada_checkpoint, write_llada_moe_checkpoint])
def test_remote_code_flag_writes_auto_map_and_a_tripwire(write, tmp_path):
    folder = write(tmp_path / "ckpt", with_remote_code=True)
    cfg = json.loads((folder / "config.json").read_text())
    modules = {ref.split(".")[0] for ref in cfg["auto_map"].values()}
    assert all((folder / f"{m}.py").is_file() for m in modules)
    marker = remote_code_marker(folder)
    assert not marker.exists()
    with pytest.raises(RuntimeError):
        runpy.run_path(str(folder / f"{sorted(modules)[0]}.py"))
    assert marker.exists()  # the tripwire works, so a test can assert the server never trips it
    plain = write(tmp_path / "plain")
    assert "auto_map" not in json.loads((plain / "config.json").read_text())
    assert not list(plain.glob("*.py"))


def test_moe_shape_constants_match_config(moe):
    _, _, cfg = moe
    for key, value in LLADA_MOE_SHAPE.items():
        assert cfg[key] == value
