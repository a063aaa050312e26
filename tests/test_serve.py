"""`lvgg serve`: vLLM's OpenAI server with lvgg's experts, over HTTP on 127.0.0.1."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from gguf import GGMLQuantizationType as Q

from lvgg.convert.hf_to_gguf import convert_hf
from lvgg.models import PROJECTIONS
from lvgg.testing.tiny_models import make_tiny_model

PROMPTS = ["The experts of a mixture", "Each token picks a few", "Quantized weights are read", "from RAM at"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, key="test-key"):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json",
                                                                  "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("serve"), seed=12, dtype="float32")
    convert_hf(str(folder), folder / "experts.gguf", {p: Q.Q8_0 for p in PROJECTIONS}, threads=2, quiet=True)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    # --experts omitted: the one experts file in the model folder is found
    proc = subprocess.Popen([sys.executable, "-m", "lvgg.cli", "serve", str(folder), "--port", str(port),
                             "--cpu-threads", "1", "--api-key", "test-key", "--dtype", "float32",
                             "--max-model-len", "512", "--max-num-seqs", "8", "--enforce-eager"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited early:\n{proc.stdout.read()[-4000:]}")
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("server did not become healthy in 300 s")
    yield base, proc, str(folder)
    if proc.poll() is None:
        proc.kill()


def complete(base, model, prompt, stream=False):
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "stream": stream}
    raw = post(base + "/v1/completions", body)
    if not stream:
        return json.loads(raw)["choices"][0]["text"]
    chunks = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    return "".join(c["choices"][0]["text"] for c in chunks)


def test_completions_streaming_and_not_agree(server):
    base, _, model = server
    for prompt in PROMPTS:
        text = complete(base, model, prompt)
        assert text and complete(base, model, prompt, stream=True) == text


def test_chat_completions(server):
    base, _, model = server
    body = {"model": model, "messages": [{"role": "user", "content": "hello experts"}], "max_tokens": 8,
            "temperature": 0.0}
    reply = json.loads(post(base + "/v1/chat/completions", body))
    assert reply["choices"][0]["message"]["content"] is not None
    streamed = post(base + "/v1/chat/completions", {**body, "stream": True})
    assert "data: [DONE]" in streamed


def test_api_key_is_required(server):
    base, _, model = server
    with pytest.raises(urllib.error.HTTPError) as e:
        post(base + "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1}, key="wrong")
    assert e.value.code == 401


def test_concurrent_clients_get_the_single_client_answers(server):
    base, _, model = server
    single = {p: complete(base, model, p) for p in PROMPTS}
    jobs = [PROMPTS[(c + i) % len(PROMPTS)] for c in range(8) for i in range(20)]  # 8 clients x 20 requests
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: (p, complete(base, model, p)), jobs))
    assert len(answers) == 160
    assert all(text == single[p] for p, text in answers)


def test_stopping_the_server_by_pid_leaves_no_process(server):
    _, proc, _ = server
    children = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


def test_missing_experts_file_fails_before_vllm_starts(tmp_path):
    folder = make_tiny_model("qwen3_moe", tmp_path / "m", seed=1)
    done = subprocess.run([sys.executable, "-m", "lvgg.cli", "serve", str(folder), "--experts",
                           str(tmp_path / "nope.gguf")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "experts file not found" in done.stderr
