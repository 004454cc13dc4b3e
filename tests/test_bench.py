"""tools/bench.py: statistics, SSE parsing and result bookkeeping (pure, no server)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_bench():
    """tools/bench.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("wicore_bench_tool", ROOT / "tools" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["wicore_bench_tool"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def chunk(delta: dict | None = None, finish: str | None = None, **extra) -> str:
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [] if delta is None else [
            {"index": 0, "delta": delta, "finish_reason": finish}
        ],
        **extra,
    }
    return json.dumps(payload)


def sse(*datas: str, sep: str = "\n") -> bytes:
    return "".join(f"data: {d}{sep}{sep}" for d in datas).encode()


# --------------------------------------------------------------------------- percentile


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, None),
        ([7.0], 95, 7.0),
        ([1, 2, 3, 4], 50, 2.5),
        ([4, 1, 3, 2], 0, 1.0),
        ([4, 1, 3, 2], 100, 4.0),
        (list(range(1, 101)), 95, 95.05),
        ([10, 20], 25, 12.5),
    ],
)
def test_percentile_interpolates_between_ranks(values, q, expected):
    result = bench.percentile(values, q)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


def test_percentile_rejects_out_of_range_q():
    with pytest.raises(ValueError):
        bench.percentile([1.0], 101)


# --------------------------------------------------------------------------- SSE parser


def test_sse_parser_handles_any_split_of_the_byte_stream():
    stream = sse(chunk({"role": "assistant"}), chunk({"content": "héllo 世界"}), "[DONE]")
    expected = [e.data for e in bench.SSEParser().feed(stream)]
    assert expected[-1] == "[DONE]" and len(expected) == 3
    for size in (1, 2, 3, 7, 64):
        parser = bench.SSEParser()
        got = []
        for i in range(0, len(stream), size):
            got += [e.data for e in parser.feed(stream[i : i + size])]
        assert got == expected, size


@pytest.mark.parametrize("sep", ["\n", "\r\n", "\r"])
def test_sse_parser_accepts_every_line_ending(sep):
    parser = bench.SSEParser()
    events = parser.feed(sse("a", "[DONE]", sep=sep)) + parser.close()
    assert [e.data for e in events] == ["a", "[DONE]"]
    assert parser.close() == []


def test_sse_parser_cr_at_buffer_end_waits_for_a_possible_lf():
    parser = bench.SSEParser()
    assert parser.feed(b"data: x\r") == []
    assert [e.data for e in parser.feed(b"\n\r\n")] == ["x"]


def test_sse_parser_comments_fields_and_multiline_data():
    parser = bench.SSEParser()
    raw = (
        b": ping - 2024-01-01\r\n\r\n"
        b"event: error\ndata: line one\ndata:line two\nid: 5\nretry: 10\n\n"
        b"data\n\n"
    )
    events = parser.feed(raw)
    assert events == [
        bench.SSEEvent(data="line one\nline two", event="error"),
        bench.SSEEvent(data="", event="message"),
    ]


def test_sse_parser_close_flushes_an_unterminated_event():
    parser = bench.SSEParser()
    assert parser.feed(b"data: [DONE]") == []
    assert [e.data for e in parser.close()] == ["[DONE]"]


# --------------------------------------------------------------------------- stream tracking


def track(events: list[tuple[float, str]], event_type: str = "message"):
    result = bench.RequestResult(index=0, start=1.0)
    first = []
    tracker = bench.StreamTracker(result, lambda: first.append(True))
    for now, data in events:
        tracker.on_event(bench.SSEEvent(data=data, event=event_type), now)
    return result, tracker, first


def test_tracker_times_content_chunks_only():
    result, tracker, first = track([
        (1.1, chunk({"role": "assistant"})),
        (1.5, chunk({"content": "a"})),
        (1.6, chunk({"content": ""})),
        (1.7, chunk({"content": "b"})),
        (2.0, chunk({"content": "c"})),
        (2.1, chunk({}, finish="length")),
        (2.2, chunk(None, usage={"prompt_tokens": 3, "completion_tokens": 4})),
        (2.3, "[DONE]"),
    ])
    assert tracker.done and result.ok
    assert first == [True]
    assert result.num_chunks == 3
    assert result.ttft == pytest.approx(0.5)
    assert result.gaps == pytest.approx([0.2, 0.3])
    assert result.finish_reason == "length"
    assert result.usage_tokens == 4


def test_tracker_records_error_payloads_and_bad_json():
    result, _, _ = track([(1.2, json.dumps({"error": {"message": "boom"}}))])
    assert not result.ok and "boom" in result.error

    result, _, _ = track([(1.2, json.dumps({"detail": "x"}))], event_type="error")
    assert not result.ok

    result, _, _ = track([(1.2, "{not json")])
    assert not result.ok and "bad JSON" in result.error


# --------------------------------------------------------------------------- requests and runs


def test_chat_body_is_reproducible_and_carries_priority():
    a = bench.chat_body("m", 3, 64, None, None, True)
    assert a == bench.chat_body("m", 3, 64, None, None, True)
    assert a["stream"] is True and a["temperature"] == 0.7 and a["max_tokens"] == 64
    assert a["seed"] != bench.chat_body("m", 4, 64, None, None, True)["seed"]
    assert a["stream_options"] == {"include_usage": True}
    assert "priority" not in a
    b = bench.chat_body("m", 3, 8, "hi", "urgent", False)
    assert b["priority"] == "urgent" and "stream_options" not in b
    assert b["messages"] == [{"role": "user", "content": "hi"}]


def test_staggered_lengths_vary_around_the_mean():
    lengths = [bench.staggered(64, i) for i in range(200)]
    assert min(lengths) >= 32 and max(lengths) < 96
    assert len(set(lengths)) > 30
    assert sum(lengths) / len(lengths) == pytest.approx(64, abs=4)


def _result(index, ttft, gaps, chunks, error=None, usage=None):
    return bench.RequestResult(
        index=index, start=0.0, end=1.0, status=200, ttft=ttft, gaps=gaps,
        num_chunks=chunks, usage_tokens=usage, finish_reason=None if error else "length",
        error=error,
    )


def test_summarize_aggregates_tokens_latencies_and_errors():
    cfg = bench.RunConfig(url="u", model="m", concurrency=2, requests=3, max_tokens=4)
    results = [
        _result(0, 0.1, [0.01, 0.03], 3, usage=4),
        _result(1, 0.3, [0.02], 2, usage=4),
        _result(2, None, [], 0, error="HTTP 429: busy"),
    ]
    report = bench.summarize(results, cfg, wall_s=2.0)
    assert report["tokens"] == 5
    assert report["tok_s"] == pytest.approx(2.5)
    assert report["usage_tokens"] == 8
    assert report["ttft_p50"] == pytest.approx(0.2)
    assert report["itl_p50"] == pytest.approx(0.02)
    assert report["errors"] == 1 and report["error_samples"] == ["HTTP 429: busy"]
    assert report["finish_reasons"] == {"length": 2}


def test_summarize_leaves_usage_out_when_a_server_does_not_send_it():
    cfg = bench.RunConfig(url="u", model="m", concurrency=1, requests=2, max_tokens=4)
    report = bench.summarize([_result(0, 0.1, [], 1, usage=1), _result(1, 0.1, [], 1)], cfg, 1.0)
    assert report["usage_tokens"] is None


# --------------------------------------------------------------------------- compare report


def _run(server, conc, tok_s, errors=0):
    return {
        "server": server, "concurrency": conc, "tok_s": tok_s, "ttft_p50": 0.1234,
        "ttft_p95": 0.2, "itl_p50": 0.0123, "itl_p95": None, "errors": errors,
    }


def test_ratios_against_targets_per_peer():
    runs = [
        _run("wicore", 1, 110.0), _run("llama-cpp-python", 1, 100.0),
        _run("wicore", 16, 300.0), _run("llama-cpp-python", 16, 100.0),
        _run("llama-server", 1, 120.0), _run("llama-server", 16, 240.0),
    ]
    out = bench.ratios(runs)
    second = out["llama-cpp-python"]
    assert second[1]["ratio"] == pytest.approx(1.1) and second[1]["verdict"] == "PASS"
    assert second[16]["ratio"] == pytest.approx(3.0) and second[16]["verdict"] == "MISS"
    primary = out["llama-server"]
    assert primary[1]["ratio"] == pytest.approx(110 / 120) and primary[1]["verdict"] == "MISS"
    assert primary[16]["ratio"] == pytest.approx(1.25) and primary[16]["verdict"] == "PASS"
    assert primary[16]["target"] == 1.2


def test_ratios_miss_when_either_side_had_errors_and_skip_missing_servers():
    runs = [_run("wicore", 1, 500.0, errors=1), _run("llama-cpp-python", 1, 100.0),
            _run("wicore", 16, 500.0)]
    out = bench.ratios(runs)
    assert out["llama-cpp-python"][1]["verdict"] == "MISS"
    assert 16 not in out["llama-cpp-python"]
    assert "llama-server" not in out


def test_decode_rate_is_concurrency_over_the_mean_gap():
    assert bench.decode_rate([0.1, 0.1, 0.2, 0.0], 16) == pytest.approx(160.0)
    assert bench.decode_rate([], 16) is None
    assert bench.decode_rate([0.0], 1) is None


def test_ceiling_checks_against_raw_llama_cpp_and_llama_server_ttft():
    runs = [
        {**_run("wicore", 1, 54.0), "decode_tok_s": 60.0},
        {**_run("wicore", 16, 200.0), "decode_tok_s": 130.0, "ttft_p50": 0.5},
        {**_run("llama-server", 16, 150.0), "ttft_p50": 0.4},
    ]
    ceilings = {"llama_bench_tg": 56.0, "batched_tg_16": 150.0}
    checks = {c["name"]: c for c in bench.ceiling_checks(runs, ceilings)}
    one = checks["1 stream tok/s / llama-bench tg"]
    assert one["value"] == pytest.approx(54 / 56) and one["verdict"] == "PASS"
    sixteen = checks["16 streams decode tok/s / llama-batched-bench B=16 decode"]
    assert sixteen["value"] == pytest.approx(130 / 150) and sixteen["verdict"] == "PASS"
    ttft = checks["16 streams TTFT p50 / llama-server's"]
    assert ttft["value"] == pytest.approx(1.25) and ttft["verdict"] == "MISS"
    # Without the figures a check needs, it is left out rather than passed.
    assert bench.ceiling_checks(runs[:1], None) == []


def _batched_row(pl: int, speed_tg: float, t_tg: float) -> str:
    return json.dumps({
        "n_kv_max": 16384, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1,
        "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 32,
        "tg": 64, "pl": pl, "n_kv": pl * 96, "t_pp": 0.1 * pl, "speed_pp": 320.0, "t_tg": t_tg,
        "speed_tg": speed_tg, "t": t_tg + 0.1 * pl, "speed": 100.0})


# What the tools print (llama-bench -o jsonl; llama-batched-bench --output-format jsonl),
# with the log lines around the JSON that they also print.
LLAMA_BENCH_JSONL = "\n".join([
    "load_backend: loaded CPU backend from libggml-cpu.so",
    json.dumps({"build_commit": "abc", "model_type": "gemma3 ?B Q8_0", "n_threads": 2,
                "n_prompt": 0, "n_gen": 64, "n_depth": 0, "avg_ns": 1142857142,
                "stddev_ns": 1000, "avg_ts": 56.03, "stddev_ts": 0.4,
                "samples_ts": [56.1, 55.9, 56.09]}),
    "",
])
BATCHED_BENCH_OUT = "\n".join([
    "main: n_kv_max = 16384, n_batch = 2048, n_ubatch = 512, flash_attn = -1",
    _batched_row(1, 53.33, 1.2),
    _batched_row(16, 152.8, 6.7),
    "",
    "llama_perf_context_print:        load time =     120.00 ms",
])


def test_parse_llama_bench_takes_the_generation_test():
    assert bench.parse_llama_bench(LLAMA_BENCH_JSONL) == pytest.approx(56.03)
    prompt_only = '{"n_prompt": 512, "n_gen": 0, "avg_ts": 900.0}'
    assert bench.parse_llama_bench(prompt_only) is None
    assert bench.parse_llama_bench("error: failed to load model\n{not json}") is None


def test_parse_batched_bench_per_batch_size():
    rows = bench.parse_batched_bench(BATCHED_BENCH_OUT)
    assert sorted(rows) == [1, 16]
    assert rows[16]["speed_tg"] == pytest.approx(152.8)
    assert rows[1]["speed_pp"] == pytest.approx(320.0) and rows[16]["t_tg"] == 6.7


def test_raw_llama_cpp_commands_match_the_servers_settings(tmp_path):
    cmd = bench.llama_bench_cmd(Path("/b/llama-bench"), "m.gguf", 2, 64)
    assert cmd[cmd.index("-t") + 1] == "2" and cmd[cmd.index("-n") + 1] == "64"
    assert cmd[cmd.index("-p") + 1] == "0" and cmd[cmd.index("-o") + 1] == "jsonl"
    cmd = bench.batched_bench_cmd(Path("/b/llama-batched-bench"), "m.gguf", 2, 64, 32, (1, 16),
                                  16384)
    assert "-kvu" in cmd and cmd[cmd.index("-npl") + 1] == "1,16"
    assert cmd[cmd.index("-c") + 1] == "16384" and cmd[cmd.index("-ntg") + 1] == "64"
    assert cmd[cmd.index("--output-format") + 1] == "jsonl"


def test_run_tool_keeps_the_output_and_raises_on_failure(tmp_path):
    text = bench.run_tool([sys.executable, "-c", "print('{\"pl\": 1}')"],
                          tmp_path / "ok.log", 60)
    assert '{"pl": 1}' in text and (tmp_path / "ok.log").read_text() == text
    with pytest.raises(RuntimeError, match="failed"):
        bench.run_tool([sys.executable, "-c", "import sys; sys.exit(3)"],
                       tmp_path / "bad.log", 60)


def test_median_runs_pick_the_median_round_and_sum_errors():
    runs = [
        {**_run("wicore", 16, tok, errors=err), "round": n, "per_request": []}
        for n, (tok, err) in enumerate([(300.0, 0), (100.0, 1), (200.0, 0)], start=1)
    ] + [{**_run("wicore", 1, 50.0), "round": 1}, {**_run("wicore", 1, 60.0), "round": 2}]
    rows = {r["concurrency"]: r for r in bench.median_runs(runs)}
    assert rows[16]["tok_s"] == 200.0 and rows[16]["round"] == 3
    assert rows[16]["errors"] == 1
    assert rows[16]["rounds_tok_s"] == [300.0, 100.0, 200.0]
    assert "per_request" not in rows[16]
    assert rows[1]["tok_s"] == 50.0  # the lower middle of an even count


def test_markdown_table_formats_milliseconds():
    lines = bench.markdown_table([_run("wicore", 16, 333.33)])
    assert lines[0].startswith("| server | concurrency | tok/s |")
    assert lines[2] == "| wicore | 16 | 333.3 | 123 | 200 | 12.3 | - | 0 |"


def test_report_lines_include_ratio_priority_and_failures():
    runs = [_run("wicore", 16, 400.0), _run("llama-cpp-python", 16, 100.0)]
    table = bench.median_runs(runs)
    results = {
        "model": "m.gguf", "threads": 2, "max_tokens": 64, "runs": runs, "table": table,
        "rounds": 1, "loadavg_start": 0.2,
        "ratios": bench.ratios(table), "failures": ["llama-cpp-python: did not start"],
        "ceilings": {"llama_bench_tg": 56.0, "batched_tg_1": 53.3, "batched_tg_16": 152.8},
        "checks": [{"name": "16 streams TTFT p50 / llama-server's", "value": 0.8,
                    "bound": 1.0, "higher_is_better": False, "verdict": "PASS"}],
        "priority": {"running": 16, "waiting": 32, "urgent_ttft": 0.25, "normal_ttft": 5.0,
                     "normal_over_urgent": 20.0, "errors": 0},
    }
    text = "\n".join(bench.report_lines(results))
    assert "WiCore / llama-cpp-python at concurrency 16: 4.00x (target >= 4x: PASS)" in text
    assert "llama-bench tg 56.0 tok/s" in text and "at B=16 152.8 tok/s" in text
    assert "16 streams TTFT p50 / llama-server's: 0.80 (target <= 1: PASS)" in text
    assert "urgent TTFT 250 ms, normal TTFT 5000 ms (20.0x)" in text
    assert "FAILED: llama-cpp-python: did not start" in text


def test_cli_parses_each_subcommand():
    parser = bench.build_parser()
    args = parser.parse_args(["run", "--model", "m", "--concurrency", "16", "--requests", "32"])
    assert (args.concurrency, args.requests, args.max_tokens) == (16, 32, 64)
    args = parser.parse_args(["priority", "--model", "m"])
    assert (args.running, args.waiting) == (16, 32)
    args = parser.parse_args(["compare", "--model", "x.gguf", "--wicore-arg=--workers=1"])
    assert args.wicore_arg == ["--workers=1"] and args.out_dir == "bench-results"
    assert args.servers.split(",")[:2] == ["wicore", "llama-server"] and not args.skip_ceilings
    args = parser.parse_args(["fairness", "--model", "m", "--flood-key", "a", "--polite-key", "b"])
    assert (args.flood_requests, args.probes, args.flood_key, args.polite_key) == (40, 6, "a", "b")
    args = parser.parse_args(["multiturn", "--model", "x.gguf", "--servers", "wicore"])
    assert (args.conversations, args.turns, args.servers) == (4, 4, "wicore")
    args = parser.parse_args(["host-tier", "--model", "x.gguf", "--lengths", "64,128"])
    assert args.lengths == "64,128"


# --------------------------------------------------------------------------- multi-turn


def test_tracker_keeps_the_reply_text_and_cached_tokens():
    res = bench.RequestResult(index=0, start=0.0)
    tracker = bench.StreamTracker(res)
    for t, data in enumerate([chunk({"content": "Hel"}), chunk({"content": "lo"}),
                              chunk(None, usage={"completion_tokens": 2, "prompt_tokens": 9,
                                                 "prompt_tokens_details": {"cached_tokens": 8}})]):
        tracker.on_event(bench.SSEEvent(data), float(t))
    assert "".join(res.text) == "Hello" and res.cached_tokens == 8


def test_filler_text_is_deterministic_and_differs_by_seed():
    assert bench.filler_text(3, 50) == bench.filler_text(3, 50)
    assert bench.filler_text(3, 50) != bench.filler_text(4, 50)
    assert len(bench.filler_text(3, 50).split()) == 50


def _turn(ttft, cached=None, error=None, start=0.0):
    return bench.RequestResult(index=0, start=start, end=start + 1.0, ttft=ttft, num_chunks=4,
                               cached_tokens=cached, error=error)


def test_multiturn_summary_by_turn_and_rounds_merged():
    cfg = bench.MultiTurnConfig(url="u", model="m", conversations=2, turns=3)
    run1 = bench.summarize_multiturn(
        [[_turn(2.0), _turn(0.2, 900), _turn(0.3, 1000)],
         [_turn(4.0, start=1.0), _turn(0.4, 950), _turn(0.5, 1050)]], cfg)
    assert run1["first_ttft_p50"] == pytest.approx(3.0)
    assert run1["later_ttft_p50"] == pytest.approx(0.35)
    assert run1["by_turn"][1]["cached_tokens_mean"] == pytest.approx(925)
    assert run1["tok_s"] == pytest.approx(24 / 2.0) and run1["errors"] == 0
    # A conversation that failed at its second turn: that turn and the one it never sent count.
    run2 = bench.summarize_multiturn(
        [[_turn(3.0), _turn(0.1), _turn(0.1)], [_turn(5.0), _turn(None, error="boom")]], cfg)
    assert run2["errors"] == 2
    row = bench.merge_multiturn_rounds([run1, run2])
    assert row["first_ttft_p50"] == pytest.approx(3.5)  # 2, 3, 4, 5
    assert row["later_over_first"] == pytest.approx(row["later_ttft_p50"] / 3.5)
    assert row["errors"] == 2
    lines = bench.multiturn_table({"wicore": row})
    assert lines[0].startswith("| server | turn 1 TTFT p50 (ms) | turn 2 TTFT p50 (ms)")
    assert lines[2].startswith("| wicore | 3500 |")


def test_multiturn_verdicts_against_the_targets():
    def row(first, later, errors=0):
        return {"first_ttft_p50": first, "later_ttft_p50": later,
                "later_over_first": later / first, "errors": errors}

    verdicts = bench.multiturn_verdicts({"wicore": row(4.0, 0.5), "llama-server": row(4.0, 0.6)})
    assert [ok for _, ok in verdicts] == [True, True]
    verdicts = bench.multiturn_verdicts({"wicore": row(4.0, 2.0), "llama-server": row(4.0, 1.0)})
    assert [ok for _, ok in verdicts] == [False, False]
    assert len(bench.multiturn_verdicts({"wicore": row(4.0, 0.5)})) == 1


def test_llama_server_build_is_reused_only_for_the_same_recipe(tmp_path):
    build = bench.LlamaServerBuild(tmp_path)
    assert not build.is_built()
    build.binary.parent.mkdir(parents=True)
    build.binary.write_text("")
    (tmp_path / "built-from").write_text(build.recipe + "\n")
    assert not build.is_built()  # llama-bench and llama-batched-bench are missing
    for tool in ("llama-bench", "llama-batched-bench"):
        build.tool(tool).write_text("")
    assert "llama-batched-bench" in build.recipe
    assert build.is_built() and build.ensure() == build.binary
    (tmp_path / "built-from").write_text("llama-cpp-python==0.0.1\n")
    assert not build.is_built()
    cmd = bench.llama_server(build.binary, "m.gguf", 2, 4096, 16, tmp_path).cmd
    assert cmd[0] == str(build.binary) and "--kv-unified" in cmd
    assert cmd[cmd.index("--parallel") + 1] == "16" and cmd[cmd.index("--threads") + 1] == "2"
