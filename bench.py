"""
Speed, never correctness (that is test_sae.py): prints the machine, then the throughput of each stage.

Harvest: tokens/s of GPT-2 stopped at (layer, site) against the full forward, at GPT-2 small's shape
(random weights unless --init_from names a checkpoint; speed does not depend on the values).

$ python bench.py
$ python bench.py --quick=True --init_from=gpt2
"""
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch

from sae import GPT, GPTConfig, parse_args


@dataclass
class BenchConfig:
    init_from: str = "random"  # random = GPT-2 small's shape with random weights; or a Hub id / local directory
    layer: int = 6             # stop here when harvesting
    site: str = "mlp_in"
    batch_size: int = 8        # contexts per forward
    block_size: int = 128      # tokens per context
    iters: int = 10            # timed forwards, after 2 of warm-up
    quick: bool = False        # a run under a minute: fewer iterations
    device: str = "auto"       # auto = cuda if available, else cpu


def machine():
    """CPU model or GPU name, torch and triton versions, threads."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        cpu = [line for line in open("/proc/cpuinfo") if line.startswith("model name")] if os.path.exists("/proc/cpuinfo") else []
        name = cpu[0].split(":", 1)[1].strip() if cpu else platform.processor()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return f"{name} | torch {torch.__version__} | triton {triton_version} | {torch.get_num_threads()} threads"


def time_per_call(fn, iters, device):
    """Seconds per call of fn(), after 2 calls of warm-up, timed between synchronizations (nanoGPT bench.py)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def bench_harvest(cfg, device):
    model = GPT(GPTConfig()) if cfg.init_from == "random" else GPT.from_pretrained(cfg.init_from)
    model = model.to(device).eval()
    idx = torch.randint(0, model.config.vocab_size, (cfg.batch_size, cfg.block_size), device=device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    tokens = idx.numel()
    with torch.no_grad(), ctx:
        full = time_per_call(lambda: model(idx), cfg.iters, device)
        stop = time_per_call(lambda: model.harvest(idx, cfg.layer, cfg.site), cfg.iters, device)
    print(f"harvest {cfg.batch_size}x{cfg.block_size} tokens, {model.config.n_layer}-layer GPT-2 of width {model.config.n_embd}:")
    print(f"  full forward              {full * 1e3:8.1f} ms  {tokens / full:10,.0f} tok/s")
    print(f"  stop at layer {cfg.layer} {cfg.site:<9} {stop * 1e3:8.1f} ms  {tokens / stop:10,.0f} tok/s  "
          f"({stop / full:.2f} of the full forward's time)")
    return {"harvest_full_tok_s": tokens / full, "harvest_stop_tok_s": tokens / stop}


if __name__ == "__main__":
    try:
        cfg = parse_args(BenchConfig(), sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if cfg.quick:
        cfg.iters = 3
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    print(machine())
    bench_harvest(cfg, device)
