"""BERT-large MLM pretraining throughput and MFU on one CUDA GPU (bf16 autocast, TF32).

    python benchmarks/pretrain_gpu.py                          # h100 peak, 60 steps, batch 128
    python benchmarks/pretrain_gpu.py --device h200 --steps 100 --batch-size 256 --compile
    python benchmarks/pretrain_gpu.py --preset base --vocab 50000

Runs `scaling_study.pretrain.train_mlm` (the same loop every Ray worker runs) on random token
ids written as a corpus build in a temporary folder: no corpus, tokenizer training or network
needed. Prints tokens/s per log window and, over the windows after warmup, tokens/s and MFU:
model FLOPs (`models.mlm_flops_breakdown` at the measured mask fraction: encoder on every
token, head at masked positions only) per second over the device's dense bf16 peak from
presets/devices.yaml (`--device`). Without a CUDA device it says so and exits with status 0.

Measured on one H200 (torch 2.11, transformers 5.17, vocab 30522, AdamW fused, BERT's dropout):
batch 128: 168k tokens/s, MFU 32%; batch 256: 180k, 34%; batch 256 --compile: 191k, 36%;
batch 256 --optimizer lamb: 146k, 28% (foreach LAMB); fp32 (no tensor cores): 25k.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["h100", "h200", "a100"], default="h100",
                        help="whose bf16 peak (presets/devices.yaml) MFU is measured against")
    parser.add_argument("--preset", default="large", help="model-size preset (default: large)")
    parser.add_argument("--vocab", type=int, default=30522, help="vocabulary size (ScholarBERT: 50000)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128, help="sequences per optimizer step")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps in all, warmup included")
    parser.add_argument("--warmup-steps", type=int, default=10, help="steps left out of the averages")
    parser.add_argument("--log-every", type=int, default=10, help="steps per measured window")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--optimizer", choices=["adamw", "lamb"], default="adamw")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("pretrain_gpu: no CUDA device visible (torch.cuda.is_available() is False); nothing to measure. "
              "Run it on a GPU machine.")
        return 0

    from scaling_study.models import count_parameters, load_devices, load_presets
    from scaling_study.pretrain import MemoryLogger, PretrainConfig, train_mlm, write_synthetic_corpus

    device = load_devices()[args.device]
    preset = load_presets()[args.preset]
    windows = max(1, args.steps // args.log_every)
    config = PretrainConfig(
        preset=preset, vocab_size=args.vocab, total_steps=args.steps, checkpoint_steps=(), seq_len=args.seq_len,
        batch_size=args.batch_size, lr=1e-4, warmup_fraction=0.0, schedule="constant", precision=args.precision,
        optimizer=args.optimizer, log_every=args.log_every, peak_flops=device.peak_flops, compile=args.compile)
    name = torch.cuda.get_device_name(0)
    print(f"device: {name} (MFU against {args.device}: {device.peak_flops / 1e12:.0f} TFLOP/s {device.peak_precision})")
    print(f"model: {args.preset} ({count_parameters(preset, args.vocab) / 1e6:.1f}M params, vocab {args.vocab}), "
          f"seq {args.seq_len}, batch {args.batch_size}, {args.precision}, {args.optimizer}, "
          f"compile={args.compile}, torch {torch.__version__}")

    with tempfile.TemporaryDirectory(prefix="pretrain-gpu-") as tmp:
        sequences = min(args.steps * args.batch_size, 65_536)
        corpus = write_synthetic_corpus(Path(tmp) / "corpus", vocab_size=args.vocab, seq_len=args.seq_len,
                                        num_sequences=sequences, num_shards=1)
        log = MemoryLogger()
        started = time.perf_counter()
        train_mlm(config, corpus, Path(tmp) / "run", logger=log, resume=False, device=torch.device("cuda", 0))
        wall = time.perf_counter() - started

    for row in log.history:
        print(f"  step {row['step']:5d}  loss {row['loss']:.3f}  {row['tokens_per_s']:10.0f} tokens/s  "
              f"mfu {row['mfu']:.3f}")
    measured = [r for r in log.history if r["step"] > args.warmup_steps] or log.history[-1:]
    # Equal-length windows: the mean of rates is the overall rate.
    tokens_per_s = statistics.fmean(r["tokens_per_s"] for r in measured)
    mfu = statistics.fmean(r["mfu"] for r in measured)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30
    print(f"result: {tokens_per_s:,.0f} tokens/s, MFU {mfu:.1%} of {args.device} bf16 peak "
          f"(over {len(measured)} windows of {args.log_every} steps after {args.warmup_steps} warmup steps; "
          f"{windows} windows in all), peak GPU memory {peak_mem:.1f} GiB, wall {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
