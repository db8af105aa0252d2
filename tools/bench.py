"""Benchmarks of train_gpt.py on the current device: training step time, sliding-window evaluation
throughput and quantization time, each projected to the challenge's 8-GPU run.

    python3 tools/bench.py step                  # seed (3 blocks x 4) and plain 11-layer configurations
    python3 tools/bench.py eval --data DATA_PATH # sliding-window tokens scored per second
    python3 tools/bench.py quant                 # GPTQ calibration, quantization and packing time

Every subcommand takes `--set NAME=VALUE` to change any train_gpt.py setting. Inputs are random
tokens unless --data is given, so no data is needed. These print figures; they are not tests.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402

CONFIGS = {
    "seed": {"USE_UNIVERSAL": "1", "UNIVERSAL_UNIQUE_BLOCKS": "3", "UNIVERSAL_ITERATIONS": "4"},
    "plain11": {"USE_UNIVERSAL": "0", "NUM_LAYERS": "11"},
}
# Dense bf16 peak of one H100 SXM or H200 (vendor datasheets); the denominator of model FLOP utilisation.
PEAK_BF16_FLOPS = 989e12
FINEWEB_VAL_TOKENS = 62_000_000  # the challenge's validation split, about 62 million tokens
CHALLENGE_GPUS = 8


def settings(name: str, overrides: list[str], extra: dict[str, str]) -> train_gpt.Hyperparameters:
    env = dict(CONFIGS[name], **extra)
    for item in overrides:
        key, _, value = item.partition("=")
        env[key] = value
    args = train_gpt.Hyperparameters(env)
    args.validate(1)
    return args


def matmul_params_per_token(model: train_gpt.GPT) -> int:
    """Weights each token multiplies through: every effective layer's block matrices, the embedding
    projections and the output head."""
    per_block = sum(p.numel() for n, p in model.blocks[0].named_parameters() if p.ndim == 2)
    projections = sum(p.numel() for n, p in model.named_parameters() if train_gpt.is_matrix(n, p) and not n.startswith("blocks."))
    head = model.tok_emb.weight.numel() if model.lm_head is None else model.lm_head.weight.numel()
    return model.layers * per_block + projections + head


def training_flops_per_token(model: train_gpt.GPT, args: train_gpt.Hyperparameters) -> float:
    """6 x matmul weights (forward and backward) plus causal attention: 6 x layers x width x seq_len,
    half of the 12 x layers x width x seq_len of full attention."""
    return 6.0 * matmul_params_per_token(model) + 6.0 * model.layers * args.model_dim * args.train_seq_len


class RandomLoader:
    """Stands in for TrainLoader: uniform random tokens already on the device."""

    def __init__(self, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device

    def next_batch(self, tokens: int, seq_len: int):
        batch = torch.randint(0, self.vocab, (tokens + 1,), device=self.device)
        return batch[:-1].view(-1, seq_len), batch[1:].view(-1, seq_len)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_step(options) -> None:
    results = {}
    for name in options.configs.split(","):
        args = settings(name, options.set, {"TRAIN_BATCH_TOKENS": str(options.batch_tokens),
                                            "TRAIN_SEQ_LEN": str(options.seq_len), "EVAL_SEQ_LEN": str(options.seq_len)})
        rt = train_gpt.Runtime(args)
        torch.manual_seed(0)
        model = train_gpt.GPT(args).to(rt.device)
        step_model = torch.compile(model, dynamic=False, fullgraph=True) if rt.compile else model
        optimizers = train_gpt.build_optimizers(model, args, rt.device.type == "cuda")
        loader = RandomLoader(args.vocab_size, rt.device)
        if rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        train_gpt.train_step(step_model, loader, optimizers, args, rt, 1.0, 0)
        synchronize(rt.device)
        first_s = time.perf_counter() - started
        for _ in range(options.warmup - 1):
            train_gpt.train_step(step_model, loader, optimizers, args, rt, 1.0, 0)
        times = []
        for step in range(options.steps):
            synchronize(rt.device)
            started = time.perf_counter()
            train_gpt.train_step(step_model, loader, optimizers, args, rt, 1.0, step)
            synchronize(rt.device)
            times.append(time.perf_counter() - started)
        ms = 1000.0 * statistics.median(times)
        tokens_per_s = args.train_batch_tokens / (ms / 1000.0)
        flops = training_flops_per_token(model, args)
        line = (f"bench_step config:{name} device:{rt.device.type} compile:{int(rt.compile)} batch_tokens:{args.train_batch_tokens} "
                f"seq_len:{args.train_seq_len} accum:{rt.accum} first_step_s:{first_s:.1f} ms_per_step:{ms:.1f} "
                f"tokens_per_s:{tokens_per_s:.0f} gflop_per_token:{flops / 1e9:.3f}")
        if rt.device.type == "cuda":
            mfu = tokens_per_s * flops / PEAK_BF16_FLOPS
            full_step_ms = 786432 / tokens_per_s * 1000.0
            line += (f" mfu:{100 * mfu:.1f}% ms_per_786432_tokens:{full_step_ms:.1f} "
                     f"projected_8gpu_ms_per_step:{full_step_ms / CHALLENGE_GPUS:.1f} "
                     f"peak_memory:{torch.cuda.max_memory_allocated() // 2**20}MiB")
        print(line, flush=True)
        results[name] = ms
        del model, step_model, optimizers
    if "seed" in results and "plain11" in results:
        print(f"bench_step ratio plain11/seed ms_per_step:{results['plain11'] / results['seed']:.3f}")


def load_model(options, args: train_gpt.Hyperparameters, device: torch.device) -> train_gpt.GPT:
    if options.artifact:
        return train_gpt.model_from_artifact(options.artifact, args, device)[0]
    torch.manual_seed(0)
    model = train_gpt.GPT(args).to(device)
    with torch.no_grad():  # open the zero-initialized projections so the timing covers real work
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def bench_eval(options) -> None:
    args = settings(options.config, options.set, {})
    rt = train_gpt.Runtime(args)
    if options.data:
        files = train_gpt.find_shards(options.data, "val")
        tokens = train_gpt.ValidationData(files).tokens()
    else:
        tokens = torch.randint(0, args.vocab_size, (args.eval_seq_len + options.windows * args.eval_stride + 1,))
    # Score the first `windows` windows only: enough to time the steady state.
    tokens = tokens[: args.eval_seq_len + options.windows * args.eval_stride + 1]
    tables = (torch.ones(args.vocab_size, dtype=torch.int32), torch.zeros(args.vocab_size, dtype=torch.bool),
              torch.zeros(args.vocab_size, dtype=torch.bool))
    model = load_model(options, args, rt.device).eval()
    functions = train_gpt.model_functions(model, rt.compile)
    ev = train_gpt.Evaluation(args, tokens, tables, 0, 1, rt.device, rt.autocast, print)
    short = train_gpt.Evaluation(args, tokens[: args.eval_seq_len + ev.batch_windows * args.eval_stride + 1], tables,
                                 0, 1, rt.device, rt.autocast, print)
    started = time.perf_counter()
    train_gpt.evaluate_sliding(functions, model, short, args.eval_stride)  # compiles, fills caches
    synchronize(rt.device)
    warm_s = time.perf_counter() - started
    started = time.perf_counter()
    train_gpt.evaluate_sliding(functions, model, ev, args.eval_stride)
    synchronize(rt.device)
    seconds = time.perf_counter() - started
    scored = tokens.numel() - 1
    rate = scored / seconds
    projected = FINEWEB_VAL_TOKENS / (rate * CHALLENGE_GPUS)
    print(f"bench_eval config:{options.config} device:{rt.device.type} compile:{int(rt.compile)} "
          f"seq_len:{args.eval_seq_len} stride:{args.eval_stride} windows_per_batch:{ev.batch_windows} "
          f"ngram:{int(args.ngram_eval)} knn_lambda:{args.knn_lambda} warmup_s:{warm_s:.1f} tokens_scored:{scored} "
          f"seconds:{seconds:.2f} tokens_per_s:{rate:.0f} projected_62M_tokens_on_8_devices_s:{projected:.0f}", flush=True)


def bench_quant(options) -> None:
    args = settings(options.config, options.set, {})
    rt = train_gpt.Runtime(args)
    model = load_model(options, args, rt.device)
    seq = args.train_seq_len
    batches = [torch.randint(0, args.vocab_size, (min(train_gpt.CALIB_BATCH_SEQS, args.gptq_calib_seqs - i), seq),
                             device=rt.device) for i in range(0, args.gptq_calib_seqs, train_gpt.CALIB_BATCH_SEQS)]
    started = time.perf_counter()
    blob, timings = train_gpt.build_artifact(model, args, rt, batches)
    total = time.perf_counter() - started
    # On 8 processes each calibrates an eighth of the sequences; rank 0 alone quantizes and packs.
    projected = timings["calibration_s"] / CHALLENGE_GPUS + timings.get("quantize_s", 0) + timings.get("pack_s", 0)
    codecs = " ".join(f"{k}:{v}" for k, v in timings["codec_bytes"].items())
    print(f"bench_quant config:{options.config} device:{rt.device.type} gptq:{int(args.gptq)} calib_seqs:{args.gptq_calib_seqs} "
          f"calibration_s:{timings['calibration_s']:.2f} quantize_s:{timings['quantize_s']:.2f} pack_s:{timings['pack_s']:.2f} "
          f"total_s:{total:.2f} projected_8_devices_s:{projected:.2f} artifact_bytes:{len(blob)} {codecs}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cuda = torch.cuda.is_available()
    step = sub.add_parser("step", help="time training steps")
    step.add_argument("--configs", default="seed,plain11", help="comma-separated: seed, plain11")
    step.add_argument("--batch-tokens", type=int, default=786432 if cuda else 4096,
                      help="tokens per optimizer step (default: 786432 on CUDA, 4096 on CPU)")
    step.add_argument("--seq-len", type=int, default=2048 if cuda else 512, help="sequence length (default: 2048 on CUDA, 512 on CPU)")
    step.add_argument("--steps", type=int, default=10 if cuda else 3, help="timed steps (the median is reported)")
    step.add_argument("--warmup", type=int, default=3 if cuda else 1, help="untimed steps first, including compilation")
    step.set_defaults(run=bench_step)
    ev = sub.add_parser("eval", help="time sliding-window evaluation")
    ev.add_argument("--config", default="seed", choices=sorted(CONFIGS))
    ev.add_argument("--data", help="DATA_PATH with fineweb_val_*.bin; random tokens when absent")
    ev.add_argument("--artifact", help="score this artifact instead of a random model")
    ev.add_argument("--windows", type=int, default=2048 if cuda else 32, help="windows to time")
    ev.set_defaults(run=bench_eval)
    quant = sub.add_parser("quant", help="time calibration, GPTQ and packing")
    quant.add_argument("--config", default="seed", choices=sorted(CONFIGS))
    quant.add_argument("--artifact", help="quantize this artifact's weights instead of a random model")
    quant.set_defaults(run=bench_quant)
    for p in (step, ev, quant):
        p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="any train_gpt.py setting")
    options = parser.parse_args()
    options.run(options)


if __name__ == "__main__":
    main()
