"""The layout is the architecture: the HTTP front end never loads llama.cpp."""

from __future__ import annotations

import subprocess
import sys


def test_front_end_never_imports_llama_cpp():
    code = (
        "import sys\n"
        "import wicore_cpp.cli, wicore_cpp.server, wicore_cpp.http.app\n"
        "import wicore_cpp.engine.scheduler, wicore_cpp.engine.tokenizer\n"
        "from wicore_cpp.cli import build_parser\n"
        "build_parser()\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'numpy'))\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"front end loaded: {out.stdout.strip()}"


def test_worker_side_modules_do_load_llama_cpp():
    """The check above would pass vacuously if the engine never loaded llama.cpp at all."""
    code = "import sys, wicore_cpp.engine.backend; print('llama_cpp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
