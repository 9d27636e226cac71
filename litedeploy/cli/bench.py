"""`litedeploy bench throughput|latency`: engine benchmarks that print and save JSON."""

from __future__ import annotations

import argparse

from litedeploy.cli.args import (
    HelpFormatter,
    add_engine_args,
    add_log_arg,
    add_model_arg,
    engine_config_from,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (JSON results)",
                                   formatter_class=HelpFormatter)
    kinds = parser.add_subparsers(dest="bench_kind", metavar="KIND", required=True)

    throughput = kinds.add_parser("throughput", help="offline throughput of N requests",
                                  formatter_class=HelpFormatter)
    _common(throughput)
    throughput.add_argument("--num-prompts", type=int, default=32)
    throughput.add_argument("--input-len", type=int, default=128)
    throughput.add_argument("--output-len", type=int, default=128)
    throughput.add_argument("--random-range-ratio", type=float, default=0.0,
                            help="lengths drawn from len * U[1 - r, 1 + r]")
    throughput.set_defaults(run=run_throughput)

    latency = kinds.add_parser("latency", help="prefill and decode latency of one batch",
                               formatter_class=HelpFormatter)
    _common(latency)
    latency.add_argument("--batch-size", type=int, default=1)
    latency.add_argument("--input-len", type=int, default=128)
    latency.add_argument("--output-len", type=int, default=128)
    latency.add_argument("--num-iters", type=int, default=3)
    latency.add_argument("--compare-hf", action="store_true",
                         help="also run Hugging Face transformers generate() on the same "
                              "weights in the same process")
    latency.add_argument("--hf-static-compiled", action="store_true",
                         help="with --compare-hf: also transformers' static cache, compiled")
    latency.add_argument("--cpu-compiled-decode", action="store_true",
                         help="kept for old scripts: the compiled CPU decode is the default now "
                              "(--eager-mode turns it off); benchmarks wait for its compile")
    latency.add_argument("--compare-llama-cpp", action="store_true",
                         help="also run llama.cpp (llama-cpp-python, installed separately) on the "
                              "same GGUF file and prompt in the same process; batch 1")
    latency.add_argument("--llama-cpp-threads", type=int, default=None,
                         help="with --compare-llama-cpp: llama.cpp's threads (default: as many "
                              "as torch uses)")
    latency.add_argument("--plot", default=None, metavar="FILE.png",
                         help="also draw the result (with the bandwidth roofline on CUDA)")
    latency.set_defaults(run=run_latency)

    sweep = kinds.add_parser("sweep", help="decode latency over a ladder of batch sizes, with "
                             "the measured bandwidth roofline", formatter_class=HelpFormatter)
    _common(sweep)
    sweep.add_argument("--batch-sizes", type=_int_list, default=None,
                       help="comma-separated (default: 1, 2, 4, ... up to --max-batch-size)")
    sweep.add_argument("--input-len", type=int, default=128)
    sweep.add_argument("--output-len", type=int, default=128)
    sweep.add_argument("--num-iters", type=int, default=2)
    sweep.add_argument("--plot", default=None, metavar="FILE.png",
                       help="also draw latency and tokens/s against batch size")
    sweep.set_defaults(run=run_sweep)

    from litedeploy.cli.bench_serving import add_serving_parser

    add_serving_parser(kinds)  # load generator against a running api_server
    serving = kinds.choices["serving"]
    serving.add_argument("--concurrency", type=_int_list, default=None,
                         help="comma-separated ladder of --max-concurrency values, one run each")
    serving.add_argument("--plot", default=None, metavar="FILE.png",
                         help="also draw throughput against concurrency and the TTFT / TPOT "
                              "distributions")
    serving.set_defaults(run=run_serving_ladder)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _common(parser: argparse.ArgumentParser) -> None:
    add_model_arg(parser)
    add_engine_args(parser)
    add_log_arg(parser)
    parser.add_argument("--output-json", default=None, help="also write the result here")


def _engine(args: argparse.Namespace):
    from litedeploy.engine.cpu_compile_cache import compiled_decode_of
    from litedeploy.engine.engine import LLMEngine

    engine = LLMEngine.from_pretrained(args.model_path, engine_config_from(args))
    compiled = compiled_decode_of(engine)
    if compiled is not None:  # time the steady state, not the eager steps of the compile
        compiled.wait()
    return engine


def run_throughput(args: argparse.Namespace) -> int:
    from litedeploy.bench.common import write_json
    from litedeploy.bench.throughput import run_throughput as bench

    engine = _engine(args)
    result = bench(engine, args.num_prompts, args.input_len, args.output_len,
                   args.random_range_ratio)
    result["model"] = engine.bundle.name
    result["dtype"] = str(engine.bundle.dtype)
    write_json(result, args.output_json)
    return 0


def run_latency(args: argparse.Namespace) -> int:
    from litedeploy.bench.common import write_json
    from litedeploy.bench.latency import run_latency as bench
    from litedeploy.engine.cpu_compile_cache import compiled_decode_of, decode_status_text

    engine = _engine(args)
    ours = bench(engine, args.batch_size, args.input_len, args.output_len, args.num_iters)
    compiled = compiled_decode_of(engine)
    if engine.device.type == "cpu":
        ours["cpu_decode"] = decode_status_text(engine)
        ours["cpu_compiled_decode_compile_s"] = compiled.compile_seconds if compiled else None
        ours["cpu_compiled_decode_steps"] = compiled.num_runs if compiled else 0
    result = {"model": engine.bundle.name, "dtype": str(engine.bundle.dtype), "litedeploy": ours}
    write_json(result, args.output_json)  # ours are saved even if a baseline fails below
    if args.compare_hf:
        _compare_hf(args, engine, ours, result)
    if args.compare_llama_cpp:
        _compare_llama_cpp(args, engine, ours, result)
    write_json(result, args.output_json)
    if args.plot:
        from litedeploy.bench.plots import plot_latency_sweep, sweep_from_latency
        from litedeploy.bench.sweep import measured_bandwidth

        sweep = sweep_from_latency(result)
        copy = measured_bandwidth(engine.device)
        sweep["copy_bandwidth_tb_s"] = copy["copy_bandwidth_tb_s"] if copy else None
        print(f"plot: {plot_latency_sweep(sweep, args.plot)}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from litedeploy.bench.common import write_json
    from litedeploy.bench.sweep import batch_ladder
    from litedeploy.bench.sweep import run_sweep as sweep

    sizes = args.batch_sizes or batch_ladder(args.max_batch_size)
    # the engine must take the largest rung in one step
    args.max_batch_size = max(args.max_batch_size, *sizes)
    result = sweep(_engine(args), sizes, args.input_len, args.output_len, args.num_iters)
    write_json(result, args.output_json)
    if args.plot:
        from litedeploy.bench.plots import plot_latency_sweep

        print(f"plot: {plot_latency_sweep(result, args.plot)}")
    return 0


def run_serving_ladder(args: argparse.Namespace) -> int:
    """`bench serving` as before, once per --concurrency rung; --plot draws the runs."""
    import json
    import tempfile
    from pathlib import Path

    from litedeploy.cli.bench_serving import run_serving_cli

    if not args.concurrency and not args.plot:
        return run_serving_cli(args)
    output_json, runs, code = args.output_json, [], 0
    with tempfile.TemporaryDirectory() as scratch:
        for rung in args.concurrency or [args.max_concurrency]:
            args.max_concurrency = rung
            args.output_json = str(Path(scratch) / f"c{rung}.json")
            code = max(code, run_serving_cli(args))
            if not Path(args.output_json).exists():
                return code  # refused before running (bad flags)
            runs.append(json.loads(Path(args.output_json).read_text()))
    result = runs[0] if len(runs) == 1 else {"benchmark": "serving_sweep", "runs": runs}
    if output_json:
        Path(output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(output_json).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        from litedeploy.bench.plots import plot_serving

        print(f"plot: {plot_serving(result, args.plot)}")
    return code


def _compare_llama_cpp(args: argparse.Namespace, engine, ours: dict, result: dict) -> None:
    import torch

    from litedeploy.bench.llama_cpp_baseline import run_llama_cpp_latency
    from litedeploy.model_bundle import resolve_model_path

    if args.batch_size != 1:
        raise SystemExit("--compare-llama-cpp measures batch 1 only; use --batch-size 1")
    path = resolve_model_path(args.model_path)
    if not path.endswith(".gguf"):
        raise SystemExit(f"--compare-llama-cpp needs a .gguf model, got {path}")
    threads = args.llama_cpp_threads or torch.get_num_threads()
    theirs = run_llama_cpp_latency(path, args.input_len, args.output_len, threads,
                                   args.num_iters, engine.model_config.vocab_size)
    result["llama_cpp"] = theirs
    result["decode_ratio_vs_llama_cpp"] = (
        ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"])


def _compare_hf(args: argparse.Namespace, engine, ours: dict, result: dict) -> None:
    from litedeploy.bench.hf_baseline import run_hf_latency

    model = engine.bundle.model
    hf = run_hf_latency(model, args.batch_size, args.input_len, args.output_len)
    result["transformers"] = hf
    result["decode_speedup_vs_transformers"] = (
        ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"])
    if not args.hf_static_compiled:
        return
    try:
        static = run_hf_latency(model, args.batch_size, args.input_len, args.output_len,
                                cache_implementation="static", compile=True)
    except Exception as exc:  # noqa: BLE001 - a baseline's failure must not lose ours
        result["transformers_static_compiled_error"] = f"{type(exc).__name__}: {exc}"
        return
    result["transformers_static_compiled"] = static
    result["decode_speedup_vs_transformers_static_compiled"] = (
        ours["decode_tokens_per_s"] / static["decode_tokens_per_s"])
