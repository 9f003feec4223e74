"""The vae service's compute dtype: float32 unless the deployment's --dtype says otherwise, with matching tiles."""

import asyncio
import types

import pytest
import torch

import smartdiff.services.vae.__main__ as vae_main
import smartdiff.shared.serving as serving
from smartdiff.services.vae.tiling import TilingConfig
from smartdiff.shared.config import load_model_config
from smartdiff.shared.serving import SystemConfig


@pytest.mark.parametrize("flag, dtype", [(None, torch.float32), ("bfloat16", torch.bfloat16)])
def test_dtype_flag_reaches_the_engine_and_picks_its_tiles(monkeypatch, flag, dtype):
    started = {}

    async def fake_start_stage(name, add, servicer, address, max_queue, warmup=None):
        started["engine"] = servicer.engine
        return None, 0

    monkeypatch.setattr(serving, "start_stage", fake_start_stage)
    monkeypatch.setattr(vae_main, "stage_main", lambda stage, run, argv: started.setdefault("run", run))
    vae_main.main([])
    system = SystemConfig(torch.device("cpu"), torch.float32, low_mem_level=1)
    args = types.SimpleNamespace(dtype=flag)
    asyncio.run(started["run"](load_model_config("wan-tiny"), None, system, "127.0.0.1:0", args))
    engine = started["engine"]
    assert engine.dtype == dtype and next(engine.model.parameters()).dtype == dtype
    assert engine.tiling == TilingConfig.for_dtype(dtype)
