"""Loading LLaDA checkpoint folders: round trips of real (tiny) demo checkpoints, sharding, dtypes,
folders that carry remote code, and every error a user can meet, each naming the problem."""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.engine.demo import build_demo, demo_config, save_checkpoint
from server.engine.devices import resolve_device, resolve_dtype, set_batch_invariance
from server.engine.errors import CheckpointError, DeviceError
from server.engine.loader import INDEX_FILE, SINGLE_FILE, load_checkpoint

TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "mlp_hidden_size": 64}
# The tiny model's tensors: wte and the LM head are 16 MB each in float32, the rest is small, so
# a 4 MB shard limit gives three shards (wte | the block and ln_f | the LM head).
SHARD_BYTES = 4_000_000
TEXTS = ["Hello, world!", "héllo wörld — 日本語 🙂", "  spaces\tand\nnewlines  "]


def probe_ids(loaded) -> torch.Tensor:
    chat = loaded.codec.encode_chat([{"role": "user", "content": "What is 2+2?"}])
    ids = chat + [loaded.special.mask] * 6
    return torch.tensor([ids], dtype=torch.long)


def logits_of(loaded, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model.full_logits(ids.to(loaded.device))


@pytest.fixture(scope="module")
def demo():
    return build_demo(demo_config(**TINY), seed=3)


@pytest.fixture(scope="module")
def saved(demo, tmp_path_factory) -> Path:
    return save_checkpoint(demo, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def sharded(demo, tmp_path_factory) -> Path:
    return save_checkpoint(demo, tmp_path_factory.mktemp("ckpt") / "sharded", max_shard_bytes=SHARD_BYTES)


@pytest.fixture
def copy(saved, tmp_path):
    """A private copy of the single-file checkpoint, to break."""

    def make(source: Path = saved) -> Path:
        return Path(shutil.copytree(source, tmp_path / "model"))

    return make


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_weights(folder: Path, change) -> None:
    path = folder / SINGLE_FILE
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# --- round trips -------------------------------------------------------------------------------


def test_round_trip_gives_identical_logits_and_tokenizer(demo, saved):
    assert (saved / "config.json").is_file() and (saved / SINGLE_FILE).is_file()
    assert not (saved / INDEX_FILE).exists()
    loaded = load_checkpoint(saved, device="cpu", dtype="float32")
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())  # nothing left on meta
    assert loaded.config == demo.config
    assert loaded.special == demo.special
    assert loaded.name == "tiny"
    ids = probe_ids(demo)
    assert torch.equal(logits_of(loaded, ids), logits_of(demo, ids))
    for text in TEXTS:
        assert loaded.codec.encode(text) == demo.codec.encode(text)
        assert loaded.codec.decode(loaded.codec.encode(text)) == text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert loaded.codec.chat_text(chat) == demo.codec.chat_text(chat)
    assert loaded.codec.encode_chat(chat) == demo.codec.encode_chat(chat)


def test_sharded_round_trip(demo, sharded):
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert not (sharded / SINGLE_FILE).exists()
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert set(index["weight_map"]) == set(demo.model.state_dict())
    loaded = load_checkpoint(sharded, device="cpu", dtype="float32")
    ids = probe_ids(demo)
    assert torch.equal(logits_of(loaded, ids), logits_of(demo, ids))


def test_sharded_load_logs_one_line_per_shard(sharded, caplog):
    caplog.set_level(logging.INFO, logger="llada.engine")
    load_checkpoint(sharded, device="cpu", dtype="float32")
    n = len(list(sharded.glob("model-*.safetensors")))
    lines = [r.getMessage() for r in caplog.records if r.name == "llada.engine" and "loaded shard" in r.getMessage()]
    assert len(lines) == n
    for i, line in enumerate(lines, 1):
        assert f"loaded shard {i}/{n}" in line


def test_bfloat16_checkpoint_loads_as_bfloat16(demo, tmp_path):
    folder = save_checkpoint(demo, tmp_path / "bf16", dtype=torch.bfloat16)
    stored = load_file(str(folder / SINGLE_FILE))
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    loaded = load_checkpoint(folder, device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    # The same weights cast to bf16 in memory give the same logits as the bf16 file.
    reference = build_demo(demo_config(**TINY), seed=3, dtype=torch.bfloat16)
    ids = probe_ids(demo)
    out = logits_of(loaded, ids)
    assert torch.isfinite(out).all()
    assert torch.equal(out, logits_of(reference, ids))
    # A bf16 file can also be widened to float32 at load time.
    widened = load_checkpoint(folder, device="cpu", dtype="float32")
    assert widened.dtype == torch.float32
    for name, tensor in widened.model.state_dict().items():
        assert torch.equal(tensor, stored[name].float()), name


def test_remote_code_is_never_imported_and_stdin_never_read(copy, tmp_path, monkeypatch):
    folder = copy()
    marker = tmp_path / "IMPORTED"
    code = f"open({str(marker)!r}, 'w').write('imported')\nraise SystemExit('remote code was executed')\n"
    (folder / "modeling_llada.py").write_text(code)
    (folder / "configuration_llada.py").write_text(code)
    (folder / "tokenization_llada.py").write_text(code)
    edit_json(
        folder / "config.json",
        auto_map={
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
    )
    edit_json(folder / "tokenizer_config.json", auto_map={"AutoTokenizer": ["tokenization_llada.LLaDATokenizer", None]})

    def no_input(*args, **kwargs):
        raise AssertionError("the loader asked on stdin")

    class ClosedStdin(io.StringIO):
        def read(self, *args):
            raise AssertionError("the loader read stdin")

        readline = read

    monkeypatch.setattr(builtins, "input", no_input)
    monkeypatch.setattr(sys, "stdin", ClosedStdin())
    loaded = load_checkpoint(folder, device="cpu", dtype="float32")
    assert not marker.exists()
    assert "modeling_llada" not in sys.modules and "tokenization_llada" not in sys.modules
    assert loaded.special.mask == 126336


# --- checkpoint errors -------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere", device="cpu", dtype="float32")


def test_path_is_a_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a folder")
    with pytest.raises(CheckpointError, match="not a folder"):
        load_checkpoint(path, device="cpu", dtype="float32")


def test_missing_config(copy):
    folder = copy()
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(folder, device="cpu", dtype="float32")


def test_invalid_json_config(copy):
    folder = copy()
    (folder / "config.json").write_text('{"model_type": "llada", ')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_checkpoint(folder, device="cpu", dtype="float32")


def test_unsupported_model_type(copy):
    folder = copy()
    edit_json(folder / "config.json", model_type="llama")
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
        load_checkpoint(folder, device="cpu", dtype="float32")


def test_missing_tokenizer_json(copy):
    folder = copy()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json"):
        load_checkpoint(folder, device="cpu", dtype="float32")


def test_missing_tokenizer_config(copy):
    folder = copy()
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer_config\.json"):
        load_checkpoint(folder, device="cpu", dtype="float32")


def test_no_weights_file(copy):
    folder = copy()
    (folder / SINGLE_FILE).unlink()
    with pytest.raises(CheckpointError, match="no weights to load"):
        load_checkpoint(folder, device="cpu", dtype="float32")


def test_index_listing_a_missing_shard(copy, sharded):
    folder = copy(sharded)
    gone = sorted(folder.glob("model-*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(CheckpointError, match=f"lists shards that are not in .*{gone.name}"):
        load_checkpoint(folder, device="cpu", dtype="float32")


def test_missing_tensor_is_named(copy):
    folder = copy()
    edit_weights(folder, lambda t: t.pop("model.transformer.blocks.0.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks tensors: model\.transformer\.blocks\.0\.up_proj\.weight"):
        load_checkpoint(folder, device="cpu", dtype="float32")


def test_unexpected_tensor_is_named(copy):
    folder = copy()
    edit_weights(folder, lambda t: t.update({"model.transformer.blocks.0.q_proj.bias": torch.zeros(32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.transformer\.blocks\.0\.q_proj\.bias'"):
        load_checkpoint(folder, device="cpu", dtype="float32")


def test_misshaped_tensor_is_named_with_shapes(copy):
    folder = copy()
    edit_weights(folder, lambda t: t.update({"model.transformer.blocks.0.k_proj.weight": torch.zeros(32, 32)}))
    with pytest.raises(
        CheckpointError,
        match=r"'model\.transformer\.blocks\.0\.k_proj\.weight' has shape \[32, 32\].*\[16, 32\]",
    ):
        load_checkpoint(folder, device="cpu", dtype="float32")


def test_tokenizer_and_config_disagree_on_mask_id(copy):
    folder = copy()
    edit_json(folder / "config.json", mask_token_id=126000)
    with pytest.raises(
        CheckpointError, match=r"<\|mdm_mask\|> at id 126336 but config\.json says mask_token_id 126000"
    ):
        load_checkpoint(folder, device="cpu", dtype="float32")


def test_tokenizer_and_config_disagree_on_eos_id(copy):
    folder = copy()
    edit_json(folder / "config.json", eos_token_id=126348)
    with pytest.raises(CheckpointError, match=r"eos_token has id 126081 but config\.json says eos_token_id 126348"):
        load_checkpoint(folder, device="cpu", dtype="float32")


def test_tokenizer_vocab_larger_than_config_vocab(copy):
    folder = copy()
    # Still holds the mask (126336) and EOS ids, but not the tokenizer's header/eot ids (126346-8).
    edit_json(folder / "config.json", vocab_size=126340, embedding_size=126340)
    with pytest.raises(CheckpointError, match="token id 126348 but config.json's vocab_size is 126340"):
        load_checkpoint(folder, device="cpu", dtype="float32")


def _truncate_weights(folder: Path) -> None:
    path = folder / SINGLE_FILE
    path.write_bytes(path.read_bytes()[:1_000_000])  # an interrupted download


def _config_not_an_object(folder: Path) -> None:
    (folder / "config.json").write_text("[]")


def _tokenizer_config_not_an_object(folder: Path) -> None:
    (folder / "tokenizer_config.json").write_text("[]")


def _zero_heads(folder: Path) -> None:
    edit_json(folder / "config.json", n_heads=0)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (_truncate_weights, SINGLE_FILE),
        (_config_not_an_object, "config.json"),
        (_tokenizer_config_not_an_object, "tokenizer_config.json"),
        (_zero_heads, "n_heads"),
    ],
)
def test_malformed_files_are_checkpoint_errors(copy, breakage, message):
    folder = copy()
    breakage(folder)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder, device="cpu", dtype="float32")


# --- devices and dtypes ------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_device_error(saved):
    with pytest.raises(DeviceError, match="no CUDA device is available"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="no CUDA device is available"):
        resolve_device("cuda:1")
    with pytest.raises(DeviceError, match="no CUDA device is available"):
        load_checkpoint(saved, device="cuda", dtype="auto")


def test_batch_invariance_on_cuda_turns_off_the_cublas_split_k_workspace(monkeypatch):
    # Without it a row's numbers on CUDA depend on how many rows share the forward.
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    set_batch_invariance(torch.device("cpu"), True)  # CPU is batch-invariant as it is
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    set_batch_invariance(torch.device("cuda"), False)  # --no-batch-invariant: cuBLAS as it comes
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    set_batch_invariance(torch.device("cuda"), True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":0:0"
    # cuDNN's attention builds a graph for every new length: never on
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # the user's own setting stays
    set_batch_invariance(torch.device("cuda", 0), True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_unknown_device_and_dtype(saved):
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(DeviceError, match="unknown dtype 'fp64'"):
        load_checkpoint(saved, device="cpu", dtype="fp64")


def test_auto_device_and_dtype():
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_device("cpu") == torch.device("cpu")


def test_device_errors_that_poison_the_context_are_fatal_and_out_of_memory_is_not():
    from server.engine.devices import DeviceFailure, is_fatal

    assert is_fatal(DeviceFailure("injected"))
    assert is_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_fatal(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_fatal(RuntimeError("shape mismatch"))
