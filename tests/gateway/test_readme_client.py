"""The README's Python client example runs against a live gateway and writes a playable mp4."""

import asyncio
import re
from pathlib import Path

import torch

from smartdiff.services.gateway.embedded import EmbeddedDeployment
from smartdiff.services.vae.video import probe_mp4
from smartdiff.shared.config import load_model_config
from smartdiff.shared.serving import SystemConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_client(tmp_path, monkeypatch):
    code = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "GatewayServiceStub" in b)
    code = code.replace("width=832", "width=32").replace("height=480", "height=32").replace("frames=81", "frames=5")
    code = code.replace("asyncio.run(main())", "")
    monkeypatch.chdir(tmp_path)

    async def run():
        d = await EmbeddedDeployment.start(load_model_config("wan-tiny"), None,
                                           SystemConfig(torch.device("cpu"), torch.float32))
        try:
            namespace: dict = {}
            exec(compile(code, "README.md", "exec"), namespace)
            await namespace["main"](d.address)
        finally:
            await d.stop()

    asyncio.run(run())
    assert probe_mp4(tmp_path / "video.mp4")[:3] == (5, 32, 32)
