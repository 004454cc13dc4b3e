"""load_config: file < WICORE_* env < flags, validation, served models, and the CLI flags (pure)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from wicore_cpp.config import (
    DEMO_MODEL_FILE,
    DEMO_MODEL_ID,
    REAL_MODEL_FILE,
    REAL_MODEL_ID,
    Config,
    ConfigError,
    load_config,
    resolve_host_cache_bytes,
)
from wicore_cpp.errors import ModelFileError


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def config_file(tmp_path) -> Path:
    return write_json(
        tmp_path / "wicore.json",
        {"port": 8100, "max_batch_size": 4, "workers": 2, "log_level": "DEBUG"},
    )


# -- precedence ------------------------------------------------------------------------------


def test_defaults_with_nothing_set():
    config = load_config(environ={})
    assert config == Config()
    assert config.port == 8000
    assert config.max_batch_size == 16
    assert config.max_concurrent_requests == 32
    assert config.rate_limit_per_minute == 100


def test_file_overrides_defaults(config_file):
    config = load_config(config_file, environ={})
    assert (config.port, config.max_batch_size, config.workers, config.log_level) == (
        8100, 4, 2, "DEBUG")
    assert config.host == "127.0.0.1"  # untouched default


def test_env_overrides_file(config_file):
    config = load_config(config_file, environ={"WICORE_PORT": "8200", "WICORE_WORKERS": "3"})
    assert config.port == 8200
    assert config.workers == 3
    assert config.max_batch_size == 4  # from the file, not overridden


def test_flags_override_env_and_file(config_file):
    config = load_config(
        config_file,
        environ={"WICORE_PORT": "8200", "WICORE_WORKERS": "3"},
        flags={"port": "8300", "workers": None},  # None: flag not given
    )
    assert config.port == 8300
    assert config.workers == 3  # env still wins over the file when the flag is absent
    assert config.max_batch_size == 4


def test_config_file_from_env(config_file):
    config = load_config(environ={"WICORE_CONFIG": str(config_file)})
    assert config.port == 8100


def test_explicit_file_wins_over_wicore_config_env(config_file, tmp_path):
    other = write_json(tmp_path / "other.json", {"port": 9999})
    config = load_config(config_file, environ={"WICORE_CONFIG": str(other)})
    assert config.port == 8100


def test_unrelated_env_is_ignored():
    config = load_config(environ={"PORT": "1", "WICORE": "x", "wicore_port": "2"})
    assert config.port == 8000


def test_env_values_are_typed():
    config = load_config(environ={
        "WICORE_REQUEST_TIMEOUT_S": "2.5", "WICORE_MAX_BATCH_SIZE": "8",
        "WICORE_HOST": "0.0.0.0",
    })
    assert config.request_timeout_s == 2.5
    assert config.max_batch_size == 8
    assert config.host == "0.0.0.0"


def test_json_typed_env():
    config = load_config(environ={"WICORE_MODELS": '{"a": "x.gguf"}', "WICORE_GPU_IDS": "[0,1]"})
    assert config.models == {"a": "x.gguf"}
    assert config.gpu_ids == [0, 1]


def test_json_typed_flags_from_strings():
    config = load_config(environ={}, flags={"models": '{"b": "y.gguf"}', "gpu_ids": "[2]"})
    assert config.models == {"b": "y.gguf"}
    assert config.gpu_ids == [2]


def test_json_typed_flags_as_python_values():
    config = load_config(environ={}, flags={"models": {"c": "z.gguf"}, "gpu_ids": [3, 4]})
    assert config.models == {"c": "z.gguf"}
    assert config.gpu_ids == [3, 4]


def test_config_is_frozen():
    config = load_config(environ={})
    with pytest.raises(ValidationError, match="frozen"):
        config.port = 1  # type: ignore[misc]


# -- invalid values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "environ, field",
    [
        ({"WICORE_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
        ({"WICORE_PORT": "70000"}, "port"),
        ({"WICORE_PORT": "-1"}, "port"),
        ({"WICORE_PORT": "eighty"}, "port"),
        ({"WICORE_LOG_LEVEL": "LOUD"}, "log_level"),
        ({"WICORE_WORKERS": "0"}, "workers"),
        ({"WICORE_REQUEST_TIMEOUT_S": "0"}, "request_timeout_s"),
        ({"WICORE_AGING_S": "-1"}, "aging_s"),
        ({"WICORE_GPU_IDS": "0,1"}, "gpu_ids"),
        ({"WICORE_MODELS": "a=x.gguf"}, "models"),
        ({"WICORE_GPU_IDS": '["a"]'}, "gpu_ids"),
    ],
)
def test_invalid_env_value_names_the_field(environ, field):
    with pytest.raises(ConfigError, match=field):
        load_config(environ=environ)


def test_invalid_flag_names_the_field():
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_config(environ={}, flags={"max_batch_size": "0"})


def test_batch_size_above_concurrency_is_rejected():
    with pytest.raises(ConfigError, match="max_batch_size cannot exceed max_concurrent_requests"):
        load_config(environ={}, flags={"max_batch_size": 16, "max_concurrent_requests": 8})
    # equal is fine
    config = load_config(environ={}, flags={"max_batch_size": 8, "max_concurrent_requests": 8})
    assert config.max_batch_size == 8


def test_prompt_cache_settings():
    config = load_config(environ={"WICORE_PROMPT_CACHE_SHARE": "0.25"})
    assert config.prompt_cache_share == 0.25
    assert config.num_seq_ids == 16 + 1 + 4  # decode slots, urgent slot, cached prefixes
    off = load_config(environ={}, flags={"prompt_cache_share": "0"})
    assert off.num_seq_ids == 17 and resolve_host_cache_bytes(off) == 0
    sized = load_config(environ={}, flags={"prompt_cache_host_mib": 64})
    assert resolve_host_cache_bytes(sized) == 64 << 20
    assert resolve_host_cache_bytes(load_config(environ={})) >= 0  # from this machine's RAM
    with pytest.raises(ConfigError, match="prompt_cache_share"):
        load_config(environ={}, flags={"prompt_cache_share": "1.5"})
    with pytest.raises(ConfigError, match="256"):
        load_config(environ={}, flags={"max_batch_size": 250, "max_concurrent_requests": 300,
                                       "prompt_cache_seqs": 8})


def test_log_level_any_case_accepted():
    assert load_config(environ={"WICORE_LOG_LEVEL": "debug"}).log_level == "debug"


def test_unknown_key_in_file_names_it(tmp_path):
    path = write_json(tmp_path / "c.json", {"port": 8001, "max_batch": 4})
    with pytest.raises(ConfigError, match="max_batch"):
        load_config(path, environ={})


def test_bad_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"port": 80', encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.json"):
        load_config(path, environ={})


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.json"):
        load_config(tmp_path / "missing.json", environ={})


def test_file_must_hold_an_object(tmp_path):
    path = write_json(tmp_path / "list.json", [1, 2])
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(path, environ={})


def test_invalid_value_in_file_names_the_field(tmp_path):
    path = write_json(tmp_path / "c.json", {"prefill_chunk": 4})
    with pytest.raises(ConfigError, match="prefill_chunk"):
        load_config(path, environ={})


# -- the API document's `logging` section ----------------------------------------------------


def test_the_documents_config_file_is_accepted_as_written(tmp_path):
    path = write_json(tmp_path / "doc.json", {"logging": {
        "level": "DEBUG", "enable_request_logging": True, "enable_performance_logging": True}})
    config = load_config(path, environ={})
    assert (config.log_level, config.log_requests, config.log_performance) == (
        "DEBUG", True, True)


def test_logging_section_maps_onto_flat_settings_and_env_still_wins(tmp_path):
    path = write_json(tmp_path / "c.json", {"port": 8100, "logging": {
        "level": "WARNING", "format": "json", "llama_level": "info",
        "performance_interval_s": 2.5}})
    config = load_config(path, environ={"WICORE_LOG_LEVEL": "ERROR"})
    assert config.port == 8100
    assert (config.log_level, config.log_format, config.llama_log_level) == (
        "ERROR", "json", "info")
    assert config.performance_log_interval_s == 2.5
    assert not config.log_requests and not config.log_performance  # the defaults


@pytest.mark.parametrize("data, problem", [
    ({"logging": {"levle": "DEBUG"}}, "logging.levle"),
    ({"logging": {"level": "LOUD"}}, "log_level"),
    ({"logging": {"enable_request_logging": "maybe"}}, "log_requests"),
    ({"logging": {"format": "xml"}}, "log_format"),
    ({"logging": "DEBUG"}, "logging"),
    ({"log_level": "INFO", "logging": {"level": "DEBUG"}}, "both set"),
])
def test_bad_logging_section_names_the_problem(tmp_path, data, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(write_json(tmp_path / "c.json", data), environ={})


def test_operations_settings_from_env_and_flags():
    config = load_config(environ={"WICORE_CORS_ORIGINS": '["https://a.example"]',
                                  "WICORE_LOG_REQUESTS": "true",
                                  "WICORE_API_KEYS": "/etc/wicore/keys.json"},
                         flags={"llama_log_level": "DEBUG", "data_dir": "/var/lib/wicore"})
    assert config.cors_origins == ["https://a.example"]
    assert config.log_requests is True and config.llama_log_level == "DEBUG"
    assert (config.api_keys, config.data_dir) == ("/etc/wicore/keys.json", "/var/lib/wicore")
    defaults = load_config(environ={})
    assert defaults.api_keys is None and defaults.cors_origins == []
    assert defaults.llama_log_level == "WARNING" and defaults.log_format == "text"
    with pytest.raises(ConfigError, match="llama_log_level"):
        load_config(environ={"WICORE_LLAMA_LOG_LEVEL": "chatty"})


# -- served models ---------------------------------------------------------------------------


def test_served_models_single_model_with_id():
    config = load_config(environ={}, flags={"model": "/m/some-model.Q8.gguf", "model_id": "mine"})
    models, note = config.served_models()
    assert models == {"mine": Path("/m/some-model.Q8.gguf")}
    assert note is None


def test_served_models_single_model_id_defaults_to_stem():
    config = load_config(environ={}, flags={"model": "/m/tiny-llama.gguf"})
    models, note = config.served_models()
    assert models == {"tiny-llama": Path("/m/tiny-llama.gguf")}
    assert note is None


def test_served_models_model_overrides_models_map():
    config = load_config(
        environ={"WICORE_MODELS": '{"a": "a.gguf"}'}, flags={"model": "b.gguf"})
    models, _ = config.served_models()
    assert models == {"b": Path("b.gguf")}


def test_served_models_from_models_map():
    config = load_config(environ={"WICORE_MODELS": '{"a": "x.gguf", "b": "/y/z.gguf"}'})
    models, note = config.served_models()
    assert models == {"a": Path("x.gguf"), "b": Path("/y/z.gguf")}
    assert note is None


def test_served_models_default_real_model_when_present(tmp_path):
    (tmp_path / REAL_MODEL_FILE).write_bytes(b"")
    config = load_config(environ={}, flags={"models_dir": str(tmp_path)})
    models, note = config.served_models()
    assert REAL_MODEL_ID == "gemma-3-27b-it"
    assert models == {REAL_MODEL_ID: tmp_path / REAL_MODEL_FILE}
    assert note is None


def test_served_models_demo_fallback_with_note(tmp_path):
    (tmp_path / DEMO_MODEL_FILE).write_bytes(b"")
    config = load_config(environ={}, flags={"models_dir": str(tmp_path)})
    models, note = config.served_models()
    assert models == {DEMO_MODEL_ID: tmp_path / DEMO_MODEL_FILE}
    assert note is not None
    # The note tells the operator where the real file belongs.
    assert str(tmp_path / REAL_MODEL_FILE) in note
    assert REAL_MODEL_ID in note


def test_served_models_neither_default_model_is_one_error(tmp_path, monkeypatch):
    """Not a note that the demo is served and then an error that it is missing: one error,
    with the absolute paths searched (relative to the working directory) and the ways out."""
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={})
    with pytest.raises(ModelFileError) as info:
        config.served_models()
    message = str(info.value)
    assert str(tmp_path / "models" / REAL_MODEL_FILE) in message
    assert str(tmp_path / "models" / DEMO_MODEL_FILE) in message
    assert "--model" in message and "make demo-model" in message


# -- CLI flags -------------------------------------------------------------------------------


def flags_from_args(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in Config.model_fields}


def test_config_flags_one_per_field():
    """The flag generation itself, on a bare parser (independent of the quantize subcommand)."""
    from wicore_cpp.cli import _add_config_flags

    parser = argparse.ArgumentParser()
    _add_config_flags(parser)
    options = {opt for action in parser._actions for opt in action.option_strings}
    for name in Config.model_fields:
        assert "--" + name.replace("_", "-") in options
    args = parser.parse_args(["--max-batch-size", "8", "--gpu-ids", "[0,1]", "--port", "0"])
    config = load_config(args.config, environ={}, flags=flags_from_args(args))
    assert config.max_batch_size == 8
    assert config.gpu_ids == [0, 1]
    assert config.port == 0
    assert config.workers == 1  # flags not given stay None and do not override


def test_build_parser_serve_flags():
    from wicore_cpp import cli

    parser = cli.build_parser()
    args = parser.parse_args(
        ["serve", "--max-batch-size", "8", "--max-concurrent-requests", "8",
         "--models", '{"m": "m.gguf"}', "--rate-limit-per-minute", "0"])
    assert args.command == "serve"
    assert args.max_batch_size == "8"
    assert args.model is None
    config = load_config(args.config, environ={"WICORE_MAX_BATCH_SIZE": "4"},
                         flags=flags_from_args(args))
    assert config.max_batch_size == 8  # the flag beats the env
    assert config.max_concurrent_requests == 8
    assert config.models == {"m": "m.gguf"}
    assert config.rate_limit_per_minute == 0


def test_unknown_flag_is_a_config_error():
    with pytest.raises(ConfigError, match="bogus"):
        load_config(environ={}, flags={"bogus": 1})
