"""The layout is the architecture: the HTTP front end never loads llama.cpp, and it reaches the
engine through one interface only."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

# The engine's one interface; the rest of the engine and the quantizer are off limits to http/.
ENGINE_INTERFACE = "wicore_cpp.engine.client"
OFF_LIMITS = ("wicore_cpp.engine", "wicore_cpp.quantize")


def _imports(path) -> set[str]:
    """Every module a file imports (`from a import b` counts as `a` and as `a.b`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _engine_internals(path) -> set[str]:
    return {m for m in _imports(path)
            if m.startswith(OFF_LIMITS)
            and not (m == ENGINE_INTERFACE or m.startswith(ENGINE_INTERFACE + "."))}


def test_http_reaches_the_engine_only_through_the_client():
    files = sorted((ROOT / "wicore_cpp" / "http").glob("*.py"))
    assert len(files) > 5
    outside = {path.name: bad for path in files if (bad := _engine_internals(path))}
    assert not outside, f"http/ imports engine internals: {outside}"
    assert any(ENGINE_INTERFACE in _imports(path) for path in files)


def test_layering_check_catches_engine_imports(tmp_path):
    """The check above is not vacuous: each way of importing an internal is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from wicore_cpp.engine.scheduler import Scheduler\n"
                   "import wicore_cpp.engine.queue\n"
                   "from wicore_cpp.engine import messages\n"
                   "from wicore_cpp.engine.client import EngineClient\n")
    assert _engine_internals(bad) == {
        "wicore_cpp.engine.scheduler", "wicore_cpp.engine.scheduler.Scheduler",
        "wicore_cpp.engine.queue", "wicore_cpp.engine", "wicore_cpp.engine.messages"}


def test_front_end_never_imports_llama_cpp():
    code = (
        "import sys\n"
        "import wicore_cpp.cli, wicore_cpp.server, wicore_cpp.http.app\n"
        "import wicore_cpp.engine.client, wicore_cpp.engine.scheduler\n"
        "import wicore_cpp.engine.tokenizer, wicore_cpp.gguf_file\n"
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
