"""Side by side in one process on CPU: decode ms/step of the eager path, the compiled decode
(batch 1 graph + one dynamic-batch graph) and, at batch > 1, a graph compiled for that one batch
size (what a CUDA-graph-like ladder would use). On a shared machine only the ratios mean much.

    python benchmarks/cpu_compiled_decode.py [--batch-sizes 1,8] [--output-json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

from litedeploy.bench.latency import run_latency
from litedeploy.config import EngineConfig
from litedeploy.engine.cpu_compiled_decode import CompiledCPUDecode
from litedeploy.engine.engine import LLMEngine
from litedeploy.loader.default_model import default_model_path
from litedeploy.model_bundle import load_bundle


def _engine(bundle, config: EngineConfig, eager: bool) -> LLMEngine:
    import dataclasses

    return LLMEngine(bundle, dataclasses.replace(config, eager_mode=eager))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    config = EngineConfig(cache_max_tokens=max(sizes) * (args.input_len + args.output_len + 64),
                          max_batch_size=max(sizes))
    bundle = load_bundle(args.model_path or default_model_path(), config)
    engines = {"eager": _engine(bundle, config, eager=True)}
    start = time.perf_counter()
    engines["compiled"] = _engine(bundle, config, eager=False)
    compiled = engines["compiled"].runner.graphs
    assert isinstance(compiled, CompiledCPUDecode), "the compiled decode is off here"
    compiled.wait()
    result = {"compile_s": compiled.compile_seconds, "status": compiled.status_text(),
              "engine_start_to_compiled_s": time.perf_counter() - start, "runs": []}
    static_sizes = [s for s in sizes if s > 1]
    if static_sizes:
        engine = engines["static_batch_graph"] = _engine(bundle, config, eager=True)
        runner = engine.runner
        static = CompiledCPUDecode(runner.model, runner.kv_cache, runner.scale,
                                   runner._run_eager, max(sizes), dynamic_batch=False)
        static.static_batch_sizes = static_sizes
        runner.graphs = static.start(background=False)
        result["static_compile_s"] = static.compile_seconds
    for size in sizes:
        best: dict[str, float] = {}
        for _ in range(args.rounds):  # interleaved, so a load spike hits every engine alike
            for name, engine in engines.items():
                if name == "static_batch_graph" and size == 1:
                    continue
                run = run_latency(engine, size, args.input_len, args.output_len, 1)
                best[name] = min(best.get(name, float("inf")), run["decode_ms_per_step"])
        row = {"batch_size": size, "decode_ms_per_step": best,
               "eager_over_compiled": best["eager"] / best["compiled"]}
        if "static_batch_graph" in best:
            row["static_over_dynamic"] = best["static_batch_graph"] / best["compiled"]
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
