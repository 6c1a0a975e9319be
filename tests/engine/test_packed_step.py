"""The packed step: whatever its rows' lengths, cache phases and CFG copies, a step is one
forward, every row equals its run alone, and a cached row reads its keys and values in place."""

from __future__ import annotations

import torch

from server.engine.demo import demo_config
from server.engine.denoiser import generate_batch, standalone
from server.engine.events import GenerationDone
from server.engine.kv_cache import CacheWrites, bytes_per_token
from server.engine.models import layers
from server.engine.sampling_params import SamplingParams
from tests.engine.test_step_transactions import PROMPT, run_engine

MIXED = [
    (PROMPT, SamplingParams(gen_length=8, steps=8)),  # exact, three lengths
    (PROMPT[:4], SamplingParams(gen_length=12, block_length=12, steps=6)),
    (PROMPT[:6], SamplingParams(gen_length=16, block_length=8, steps=8, cfg_scale=1.0)),  # CFG
    # dual: a block start at steps 1, 3, 5, 7 and mid-block between; prefix mid-block from step 2 to 8
    (PROMPT, SamplingParams(gen_length=16, block_length=4, steps=8, cache="dual")),
    (PROMPT[:4], SamplingParams(gen_length=24, block_length=8, steps=24, cache="prefix")),
    (PROMPT[:6], SamplingParams(gen_length=16, block_length=8, steps=16, cache="dual", cfg_scale=1.0, threshold=0.2)),
]


def test_a_mixed_step_is_one_forward_and_every_row_equals_its_run_alone(tiny_model):
    finals, engine = run_engine(tiny_model, MIXED)
    assert all(isinstance(event, GenerationDone) for event in finals), finals
    steps = max(event.steps for event in finals)
    forwards = engine.metrics.registry.get_sample_value("llada_batch_rows_count")
    assert forwards == steps, (forwards, steps)  # every job stepped in every one of them
    rows = engine.metrics.registry.get_sample_value("llada_batch_rows_sum")
    assert rows == sum(params.rows * event.steps for (_, params), event in zip(MIXED, finals))
    for (prompt, params), event in zip(MIXED, finals):
        assert event.token_ids == generate_batch(tiny_model, [prompt], [params])[0], params


def test_a_cached_row_reads_its_keys_and_values_in_place(tiny_model, monkeypatch):
    params = SamplingParams(gen_length=16, block_length=8, steps=16, cache="dual")
    exact = SamplingParams(gen_length=8, steps=8)
    denoiser, jobs = standalone(tiny_model, [PROMPT, PROMPT[:5]], [params, exact])
    pool = denoiser.pool
    reads, writes = [], []
    attend = layers.attend

    def recording_attend(q, k, v):
        reads.append((q.shape[1], k[0], v[0]))
        return attend(q, k, v)

    monkeypatch.setattr(layers, "attend", recording_attend)
    denoiser.step(jobs)  # the dual job's block start: a full forward that fills its cache
    reads.clear()
    original = CacheWrites.write

    def recording_write(self, layer, k, v):
        writes.append(self.rows.numel())
        return original(self, layer, k, v)

    monkeypatch.setattr(CacheWrites, "write", recording_write)
    denoiser.step(jobs)  # mid-block: the dual row runs its block only, against its whole cache
    length = len(jobs[0].canvas)
    layers_count = tiny_model.config.n_layers
    cached = [(n, k, v) for n, k, v in reads if k.shape[0] == length and n == 8]
    assert len(cached) == layers_count
    for _, k, v in cached:
        # views of the pool's storage, not copies
        assert k.untyped_storage().data_ptr() == pool.keys.untyped_storage().data_ptr()
        assert v.untyped_storage().data_ptr() == pool.values.untyped_storage().data_ptr()
    assert writes == [8] * layers_count  # only the block's new keys and values are written


def test_a_grouped_query_cache_holds_only_the_real_kv_heads():
    # iLLaDA's 8 KV heads of 32: a quarter of what LLaDA-8B's layout keeps per token
    full = demo_config(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32)
    grouped = demo_config(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8)
    assert bytes_per_token(full, torch.bfloat16) == 32 * 2 * 32 * 128 * 2  # 0.5 MiB per token
    assert bytes_per_token(grouped, torch.bfloat16) * 4 == bytes_per_token(full, torch.bfloat16)
