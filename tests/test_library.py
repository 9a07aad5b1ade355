"""The manager as a library: acquire a lease (loading the model), send requests through it, release it,
list models, unload with drain. Real llama-server, real demo model, no HTTP front-end."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from modelyard.errors import ErrorKind, ModelError
from modelyard.manager import ModelManager
from modelyard.scheduler import Status


async def test_lease_load_request_release_unload(models_dir: Path) -> None:
    manager = ModelManager.create(models_dir=models_dir, max_models=1, engine_args=["-c", "512"])
    await manager.start()
    try:
        async with manager.lease("smol") as lease:
            assert manager.status_of("smol") == Status.LOADED
            async with lease.child.request("POST", "/tokenize", body=b'{"content": "hello world"}') as reply:
                assert len(json.loads(await reply.read())["tokens"]) >= 2
        view = next(v for v in manager.models() if v.config.name == "smol")
        assert view.state.in_flight == 0 and "--ctx-size" in view.args

        async with manager.lease("gemma"):  # --models-max 1: smol is evicted
            assert manager.status_of("smol") in (Status.UNLOADED, Status.STOPPING)

        with pytest.raises(ModelError) as error:
            await manager.acquire("no-such-model")
        assert error.value.kind == ErrorKind.UNKNOWN_MODEL

        manager.unload("gemma")
        for _ in range(200):
            if manager.status_of("gemma") == Status.UNLOADED:
                break
            await asyncio.sleep(0.05)
        assert manager.status_of("gemma") == Status.UNLOADED
    finally:
        await manager.close()
