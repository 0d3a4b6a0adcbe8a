"""`vllm serve CKPT --quantization sab` answers an OpenAI chat request with an image."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from vllm_sab.calibrate import calibrate
from tiny_models import tiny_image

STARTUP_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_data_url() -> str:
    buf = io.BytesIO()
    tiny_image(0).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.vllm
def test_vllm_serve_answers_image_chat(tiny_vlm, tmp_path):
    """Start the OpenAI server on 127.0.0.1 with a sab checkpoint, ask about an image, stop it.

    The answer must be the one of an independent reference: transformers running the checkpoint's
    dequantized weights on the same chat turn and image (same prompt tokens, same greedy tokens,
    same text)."""
    import torch
    from openai import OpenAI
    from transformers import AutoProcessor

    from e2e_helpers import MAX_TOKENS, QUESTION, chat_prompt, hf_greedy
    from vllm_sab.calibrate.reference_model import load_dequantized

    ckpt = calibrate(tiny_vlm("qwen2_vl"), tmp_path / "sab", progress=False)
    reference = hf_greedy(load_dequantized(ckpt, torch.float32), ckpt)
    processor = AutoProcessor.from_pretrained(str(ckpt))
    reference_prompt = processor(text=[chat_prompt(ckpt)], images=[tiny_image(0)], return_tensors="pt")
    reference_text = processor.tokenizer.decode(reference, skip_special_tokens=True)
    assert reference and reference_text.strip()
    port = _free_port()
    # The `vllm` launcher that scripts/setup-cpu.sh installs next to this interpreter.
    vllm_cmd = str(Path(sys.executable).parent / "vllm")
    log_path = tmp_path / "server.log"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [vllm_cmd, "serve", str(ckpt), "--quantization", "sab", "--host", "127.0.0.1", "--port", str(port),
             "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
             "--kv-cache-memory-bytes", "64M", "--limit-mm-per-prompt", '{"image": 1}'],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:
            assert server.poll() is None, "server exited:\n" + log_path.read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, "server not healthy in time:\n" + log_path.read_text()[-3000:]
            time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120)
        reply = client.chat.completions.create(
            model=str(ckpt),
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _png_data_url()}},
                {"type": "text", "text": QUESTION},
            ]}],
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            extra_body={"return_token_ids": True},
        )
        choice = reply.choices[0]
        assert reply.prompt_token_ids == reference_prompt["input_ids"][0].tolist()  # image tokens expanded alike
        assert choice.token_ids == reference
        assert choice.message.content == reference_text
        assert choice.finish_reason == ("length" if len(reference) == MAX_TOKENS else "stop")
        assert "quantization=sab" in log_path.read_text()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
