"""Gemma-3-27B's real shape served on this machine with the settings the start-up plan fits,
and the plan held to what llama.cpp then really allocates.

This takes what the 27B model takes: on the CPU llama.cpp repacks 11.4 GiB of its weights, and
the KV cache comes on top. So it runs apart from the rest of the suite (marker `big`):
`make test` runs it alone after the others, and it takes a machine-wide lock so that two
checkouts on one machine never load the model at once; it skips when another run holds the lock.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from tests.conftest import ROOT, free_port, load_make_model
from wicore_cpp.engine.memory_plan import GiB
from wicore_cpp.engine.memory_probe import parse_log

pytestmark = [pytest.mark.big, pytest.mark.e2e]
LOCK = Path("/tmp/wicore-big-model-test.lock")


@pytest.fixture(scope="module")
def machine_lock():
    with LOCK.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pytest.skip("another checkout is running the big-model test on this machine")
        yield


def _get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, orjson.loads(r.read())


# The plan may take this much of the machine: enough for the weights (15.4 GiB) and a KV
# cache for fewer sequences, and it leaves the rest of a shared 24 GiB machine to others.
BUDGET_GIB = 18


def test_gemma_3_27b_serves_with_the_planned_settings(machine_lock, tmp_path):
    import psutil

    available = psutil.virtual_memory().available
    if available < (BUDGET_GIB + 1) * GiB:
        pytest.skip(f"{available / GiB:.1f} GiB of RAM available now; this test needs "
                    f"{BUDGET_GIB + 1} GiB")
    model = load_make_model().write_sparse_model(tmp_path / "gemma-3-27b-it-Q4_K_M.gguf")
    # A token of a 27B model takes seconds on 2 cores: no 30 s deadline for this request.
    common = ["--model", str(model), "--model-id", "gemma-3-27b-it", "--threads", "2",
              "--memory-budget", f"{BUDGET_GIB}GiB", "--request-timeout-s", "1200"]
    dry = subprocess.run([sys.executable, "-m", "wicore_cpp", "serve", *common, "--dry-run",
                          "--json"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    plan = orjson.loads(dry.stdout)
    host = plan["devices"][0]
    assert host["need_bytes"] <= host["usable_bytes"]
    # 17 GiB usable: the prompt cache's own sequence ids go first; then, after the weights, not
    # even 4,096 cells for 17 sequences fit, so the fit gives up sequences too, each step a
    # line in the server's log.
    assert [s["setting"] for s in plan["fit_steps"]] == ["prompt_cache_seqs", "ctx_size",
                                                         "max_batch_size"]
    assert plan["settings"]["prompt_cache_seqs"] == 0

    port = free_port()
    log_path = tmp_path / "server.log"
    # llama.cpp logs its own buffer sizes at INFO (its lines have their own level setting).
    proc = subprocess.Popen(
        [sys.executable, "-m", "wicore_cpp", "serve", *common, "--port", str(port),
         "--llama-log-level", "INFO"],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # reading 15 GiB and repacking 11 GiB on 2 cores
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")[-5000:]
            try:
                if _get(url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not healthy in time"
            time.sleep(1)
        request = urllib.request.Request(
            url + "/v1/chat/completions", method="POST", headers={"Content-Type":
                                                                 "application/json"},
            data=orjson.dumps({"messages": [{"role": "user", "content": "Hello"}],
                               "max_tokens": 2, "temperature": 0}))
        with urllib.request.urlopen(request, timeout=1200) as r:
            body = orjson.loads(r.read())
        assert r.status == 200 and body["model"] == "gemma-3-27b-it"
        assert body["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(120)

    log = log_path.read_text(errors="replace")
    planned = plan["settings"]["ctx_size"]
    assert f"n_ctx={planned}," in log
    assert "memory fit: prompt_cache_seqs 4 -> 0: " in log
    assert "memory fit: ctx_size 32768 -> " in log and "memory fit: max_batch_size 16 -> " in log
    real = parse_log([line.split("wicore.llama: ", 1)[-1] for line in log.splitlines()
                      if "worker-" in line])
    need = host["need"]

    def close(ours: int, theirs: int) -> bool:
        return abs(ours - theirs) <= 0.02 * theirs

    assert close(need["repacked"], real.model_buffers["CPU_REPACK"])
    assert round(real.model_buffers["CPU_REPACK"] / GiB, 1) == 11.4
    assert close(need["weights"] + need["repacked"], real.model_buffers["CPU_Mapped"])
    (_, _, fk, fv), (_, _, sk, sv) = real.kv
    assert close(need["kv_full"], fk + fv) and close(need["kv_swa"], sk + sv)
    assert close(need["compute"], sum(real.compute.values()))
