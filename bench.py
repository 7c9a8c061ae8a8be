"""
Speed, never correctness (that is the tests'). Prints the machine, then, at GPT-2 small's shapes
(d_in 768, d_sae 8192, 4096-token batches of 128-token contexts):
1. measured matmul peaks, (N, d_in) @ (d_in, d_sae): fp32 and bf16 on CPU (torch.mm and oneDNN), bf16 on CUDA;
2. per op, the reference against our path: on CUDA the Triton kernels (triton.testing.do_bench, p50/p20/p80),
   on CPU the five-matmul encode-ReLU-decode and the blocked and sampled JL; ms, GFLOP/s, speed-up, peak memory;
3. JL value+gradient memory at d_sae 65536 (8192 with --quick): the dense reference (if it fits) vs ours;
4. end to end: harvest tokens/s (stopped at the layer vs the full forward) and training tokens/s for each
   loss in sae.py's --dtype=auto, with MFU: the rate over the arithmetic limit (the model's forward FLOPs to the
   site, the SAE's and the JL penalty's, at that dtype's measured matmul peak); hybrid's rate as a fraction of
   the sparsity loss's; three SAEs on one pass against one. --archs=True adds hybrid's rate over the sparsity
   loss's for every architecture.
With --models=True, instead: tokenizing tokens/s (tiktoken gpt2, SmolLM2's tokenizer.json) and a real Llama-family
model's harvest against its full forward. With --layers_pass=True, instead: a transcoder on every layer of a real
Llama-family model trained in one pass against one pass per layer, and with --sparsify=True against EleutherAI's
sparsify. --synthetic=True runs synthbench.py's known-directions benchmark instead, a measure of quality, not speed
(SAEs scored by how well they recover known directions): the command that docs/results.md and logs/ name.

$ python bench.py                # about five minutes on 2 CPU cores
$ python bench.py --quick=True --json=bench.json
$ SMOLLM2_DIR=... python bench.py --models=True  # tokenizers, and SmolLM2-135M's harvest at layer 15
$ sl/bin/python bench.py --saelens=True --data_dir=data/local  # against SAELens end to end (docs/speed-and-memory.md), ~16 min
$ SMOLLM2_DIR=... SPARSIFY_PYTHON=sparsify-venv/bin/python python bench.py --layers_pass=True --sparsify=True \
      --data_dir=data/smollm2  # every layer in one pass, one-layer passes and sparsify (docs/speed-and-memory.md)
$ python bench.py --synthetic=True --regime=1  # synthbench.py's known-directions benchmark (docs/research-helpers.md)
"""
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

# --sparsify_worker runs under sparsify's own venv (bench_layers_pass), whose torch need not be ours and which has no
# triton: that process imports numpy, torch and sparsify only, so our modules are imported for every other part
SPARSIFY_WORKER = __name__ == "__main__" and any(arg.startswith("--sparsify_worker=") for arg in sys.argv[1:])
if not SPARSIFY_WORKER:
    import sae_kernels
    import synthbench
    from sae import ARCHS, GPT, GPTConfig, SAE, TrainConfig, auto_dtype, parse_overrides, resolved_dtype, sae_loss, \
        sae_update, write_json


@dataclass
class BenchConfig:
    init_from: str = "random"  # random = GPT-2 small's shape with random weights; or a Hub id / local directory
    layer: int = 6             # harvest stops here
    site: str = "mlp_in"
    d_sae: int = 8192
    batch_size: int = 4096     # activations per training step
    block_size: int = 128      # tokens per context
    jl_sample: int = 512       # rows of the sampled JL estimate that the CPU hybrid/jl steps use
    jl_big: int = 65536        # d_sae of the JL memory comparison
    iters: int = 3             # timed repetitions, after one warm-up
    quick: bool = False        # under a minute: one repetition at d_sae 2048, batch 1024, jl_big 8192, no full forward
    json: str = ""             # also write every figure as one JSON object here
    synthetic: bool = False    # instead: synthbench.py's known-directions benchmark (quality, not speed), every arch's sweep
    regime: int = 0            # --synthetic: 0 = every regime of synthbench.REGIMES, else only that one (1, 2)
    synthetic_archs: str = ""  # --synthetic: the architectures swept (comma-separated); "" = all
    jl_form: str = "atanh"     # --synthetic: the JL form added to each at its best setting, over synthbench.JL_COEFFS
    archs: bool = False        # instead: the sparse kernels, and one training step of every architecture (d_sae 8192, 32768)
    saelens: bool = False      # instead: sae.py against SAELens's runner, end to end (needs sae-lens installed)
    data_dir: str = "data/local"  # --saelens: the token shards both read (prepare.py)
    steps: int = 96            # --saelens: steps timed (a multiple of 32), after 33 of warm-up
    saelens_worker: str = ""   # internal: run SAELens on this .npy of tokens and print its rate
    dtype: str = "auto"        # --saelens: sae.py's --dtype; where it is bfloat16, SAELens gets autocast and autocast_lm
    models: bool = False       # instead: real models: tokenizing tokens/s, and --llama's harvest at --llama_layer
    llama: str = ""            # --models: a Llama-family directory or Hub id; "" = $SMOLLM2_DIR, else SmolLM2 on the Hub
    llama_layer: int = 15      # --models: the harvest stops here (15: the middle of SmolLM2-135M's 30 blocks)
    layers_pass: bool = False  # instead: --llama's every layer in one pass (sae.py --layers=all) against one-layer passes
    layers_d_sae: int = 1152   # --layers_pass: latents of each layer's topk skip transcoder mlp_in -> mlp_out
    layers_k: int = 32         # --layers_pass: active latents per token
    layers_batch: int = 1024   # --layers_pass: tokens per step, whole contexts of block_size (no position dropped)
    layers_buffer: int = 2**12 # --layers_pass: sae.py's buffer_tokens; 30 x 1152 fp32 columns a row: 0.57 GB at 2**12
    layers_warmup: int = 2     # --layers_pass: steps before the timed ones (whole buffer refill periods)
    layers_steps: int = 16     # --layers_pass: steps timed (whole refill periods: layers_buffer / 2 / layers_batch each)
    threads: int = 1           # --layers_pass: OMP_NUM_THREADS of every process measured (ours and sparsify's)
    sparsify: bool = False     # --layers_pass: also EleutherAI's sparsify at the same shape, under $SPARSIFY_PYTHON
    sparsify_optimizer: str = "adam"  # --sparsify: its optimizer (adam as ours; its default is signum)
    sparsify_worker: str = ""  # internal: run sparsify with this JSON's settings and print its rate
    device: str = "auto"       # auto = cuda if available, else cpu


def parse_args(cfg, argv):
    """sae.py's configurator (parse_overrides) for one configuration, no sweeps: -> a new dataclass with the overrides
    applied, each printed."""
    overrides = parse_overrides(cfg, argv)
    for key, value in overrides.items():
        if isinstance(value, list):
            raise ValueError(f"--{key}={value!r}: one value only here")
        print(f"override: {key} = {value!r}")
    return replace(cfg, **overrides)


def choose_device(spec="auto"):
    """--device with auto decided: cuda where torch sees a GPU, else cpu."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec


# ---------------------------------------------------------------------------------------------------------------------
# measuring: the machine, timings, peak memory, a table row; one update of an SAE; whole processes'
# rates and peak memory (the --saelens and --layers_pass runs)

def machine(device=None):
    """CPU model or GPU name, torch and triton versions, threads; on the CPU the vector instructions torch's kernels
    use and what decides the bf16 paths (sae_kernels.py: native bf16 products; oneDNN's bf16 kernels). device: the one
    measured; None: CUDA where there is one (.ci/run's and .ci/gpu's line)."""
    if (device or choose_device()).startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        cpu = [line for line in open("/proc/cpuinfo") if line.startswith("model name")] if os.path.exists("/proc/cpuinfo") else []
        name = cpu[0].split(":", 1)[1].strip() if cpu else platform.processor()
        name += f" ({torch.backends.cpu.get_cpu_capability()}; bf16 {'native' if sae_kernels.cpu_bf16_native() else 'emulated'}" \
                f", oneDNN bf16 {'yes' if sae_kernels.ONEDNN_BF16 else 'no'})"
    triton = f"triton {sae_kernels.triton.__version__}" if sae_kernels.HAS_TRITON else "no triton (the CPU path needs none)"
    return f"{name} | torch {torch.__version__} | {triton} | {torch.get_num_threads()} threads"


def time_ms(fn, iters, device):
    """(p50, p20, p80) milliseconds of fn(); do_bench on CUDA, wall-clock repetitions after one warm-up on CPU."""
    if device == "cuda":
        import triton.testing
        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times = torch.tensor(times)
    return tuple(torch.quantile(times, q).item() for q in (0.5, 0.2, 0.8))


def rss_peak_mib(fn):
    """Peak resident memory above the level before fn() ran, in MiB (CPU): Linux's high-water mark, reset first.
    glibc is set to map every block over 64 KiB on its own and to return freed ones, so memory that an earlier
    measurement freed is not reused unseen."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so large blocks go back to the OS when freed
    libc.malloc_trim(0)
    def read(field):
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = read("VmRSS:")
    fn()
    return read("VmHWM:") - before


def peak_mib(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return rss_peak_mib(fn)


def row(label, ms, flops, base_ms=None, mem=None):
    p50, p20, p80 = ms
    speedup = f"{base_ms / p50:5.2f}x" if base_ms else "     "
    memory = f"{mem:9.0f} MiB" if mem is not None else ""
    print(f"  {label:<34} {p50:9.1f} ms ({p20:.1f}..{p80:.1f})  {flops / p50 / 1e6:8.1f} GFLOP/s  {speedup} {memory}")
    return {"ms": p50, "ms_p20": p20, "ms_p80": p80, "gflops": flops / p50 / 1e6, "peak_mib": mem}


def backward_and_update(sae, optimizer, loss_and_terms, cfg):
    """Backward from one batch's sae_loss (loss_and_terms), then sae.py's update (sae_update): sae.py's train_step on
    one process in one piece, without its learning-rate schedule and feature tracking, so that the SAE's arithmetic
    alone is timed."""
    loss, terms = loss_and_terms
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae_update(sae, optimizer, cfg, threshold_seen=terms.threshold_seen)


@contextlib.contextmanager
def onednn_off():
    """sae_kernels.linear on aten's matmuls inside the block, oneDNN's op restored after it, even on an error: torch's
    FLOP counter counts aten's matmuls, not oneDNN's op."""
    onednn, sae_kernels.ONEDNN = sae_kernels.ONEDNN, False
    try:
        yield
    finally:
        sae_kernels.ONEDNN = onednn


def run_measured(label, args, env):
    """Runs a command to its end -> (stdout, its peak resident memory in GiB): the kernel's high-water mark of
    that one process (wait4's rusage), whatever it allocated or freed on the way. A failure raises with its
    last line of stderr."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError(f"{label}: {(err.read().strip().splitlines() or ['no output'])[-1]}")
        return out.read(), usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def logged_rate(out, first, last):
    """sae.py's tokens/s over steps first + 1 to last from its log lines (`iter N | ... | R tok/s`), each line's rate
    the process's since the line before (with --layers, one line per layer, all with the same rate)."""
    rate = lambda line: float(next(f for f in line.split("|") if f.strip().endswith("tok/s")).split()[0].replace(",", ""))
    logged = sorted({int(line.split()[1]): rate(line) for line in out.splitlines()
                     if line.startswith("iter ") and "tok/s" in line}.items())  # [(iteration, tok/s)]
    windows = [(it - prev, r) for (prev, _), (it, r) in zip(logged, logged[1:]) if first <= prev < it <= last]
    return sum(steps for steps, _ in windows) / sum(steps / r for steps, r in windows)


# ---------------------------------------------------------------------------------------------------------------------
# the default run: matmul peaks, each op against its reference, JL memory, end to end

def bench_peak(cfg, device):
    """The matmul peaks that MFU is measured against, at the SAE's encoder matmul: bf16 on CUDA; on the CPU fp32
    and bf16, each through torch.mm and oneDNN (sae_kernels.linear's op), the faster of the two its peak. -> {dtype:
    GFLOP/s}"""
    bf16 = sae_kernels.ONEDNN_BF16 or sae_kernels.cpu_bf16_native()
    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float32] + [torch.bfloat16] * bf16
    if device == "cpu" and not bf16:  # torch's own bf16 matmul there: 1 GFLOP/s on AMD's AVX2 (oneDNN capped)
        print("matmul peak (bf16): skipped: oneDNN's bf16 kernels need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, which "
              "this CPU lacks; bf16 would go through torch's generic matmul (about 200x slower than fp32)")
    flops = 2 * cfg.batch_size * 768 * cfg.d_sae
    if device == "cpu":  # its fresh output reuses freed memory, as in sae.py, instead of page-faulting in
        sae_kernels.keep_freed_memory()
    peaks = {}
    for dtype in dtypes:
        a = torch.randn(cfg.batch_size, 768, device=device, dtype=dtype)
        b = torch.randn(768, cfg.d_sae, device=device, dtype=dtype)
        c = torch.empty(cfg.batch_size, cfg.d_sae, device=device, dtype=dtype)  # preallocated: no page faults timed
        candidates = {"torch.mm": lambda: torch.mm(a, b, out=c)}
        if device == "cpu" and sae_kernels.ONEDNN:
            bt = b.T.contiguous()  # (d_sae, 768): linear's weight layout
            candidates["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [None], "")
        for name, fn in candidates.items():
            best = min(time_ms(fn, 1, device)[0] for _ in range(10))  # a peak: the best of 10
            peaks[(dtype, name)] = flops / best / 1e6
            print(f"matmul peak ({cfg.batch_size}x768 @ 768x{cfg.d_sae}, {dtype}, {name}): "
                  f"{peaks[(dtype, name)]:,.0f} GFLOP/s")
    if device == "cpu":  # the ops below are timed and measured at glibc's defaults
        sae_kernels.keep_freed_memory(keep=False)
    return {str(dtype).split(".")[1]: max(v for (dt, _), v in peaks.items() if dt == dtype) for dtype in dtypes}


def bench_ops(cfg, device, dtypes=("float32",)):
    """Each op's reference against ours: encode-ReLU-decode in each of dtypes (bf16 under autocast: cuBLAS's
    matmuls against the Triton kernel's on CUDA), the JL penalty (exact and sampled)."""
    results = {}
    for dtype in dtypes:
        results.update(bench_encode_relu_decode(cfg, device, dtype))
    results.update(bench_jl(cfg, device))
    return results


def bench_encode_relu_decode(cfg, device, dtype):
    N, d, s = cfg.batch_size, 768, cfg.d_sae
    results = {}
    print(f"encode-ReLU-decode forward+backward, N={N} d_in={d} d_sae={s} ({dtype}{' autocast' * (dtype != 'float32')}):")
    autocast = torch.autocast(device, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    x = torch.randn(N, d, device=device)
    sae = SAE(d, s).to(device)
    params = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    def step(fn):  # mse + L1, the L1 sum from f (the reference) or from the op's fused sums (ours)
        if fn is sae_kernels.encode_relu_decode_ref:
            x_hat, f = fn(x, *params)[:2]
            l1 = f.sum(dim=-1)
        else:
            x_hat, _, l1, _, _ = fn(x, *params)
        ((x_hat.float() - x).pow(2).sum(dim=-1).mean() + l1.float().mean()).backward()
        for p in params:
            p.grad = None
    def timed(fn):
        def under_autocast():
            with autocast:
                step(fn)
        return time_ms(under_autocast, cfg.iters, device), peak_mib(under_autocast, device)
    # FLOPs: 2 matmuls forward, 3 backward (the b_dec gradient reduced before its multiply), 2*N*d*s each
    flops = 10 * N * d * s
    suffix = "" if dtype == "float32" else f"_{dtype}"
    ref, mem = timed(sae_kernels.encode_relu_decode_ref)
    results[f"erd_ref{suffix}"] = row("reference (autograd, 6 matmuls)", ref, flops, mem=mem)
    label = "triton" if device == "cuda" else f"ours (5 matmuls{', oneDNN' if sae_kernels.ONEDNN else ''})"
    ours, mem = timed(sae_kernels.encode_relu_decode)
    results[f"erd_ours{suffix}"] = row(label, ours, flops, ref[0], mem)
    return results


def bench_jl(cfg, device):
    s, d = cfg.d_sae, 768
    results = {}
    precision = "bf16 tensor cores, the Gram from W's bf16 split" if device == "cuda" else "fp32"
    print(f"JL penalty value+gradient, n={s} d={d} ({precision}; the reference fp32):")
    W = torch.nn.functional.normalize(torch.randn(s, d, device=device), dim=1)
    def jl(fn):
        Wg = W.clone().requires_grad_()
        fn(Wg).backward()
    # FLOPs: G on and above the diagonal (n^2 d), then S W_J and S^T W_I (2 n^2 d): 3 n^2 d with symmetry
    flops = 3 * s * s * d
    ref = time_ms(lambda: jl(sae_kernels.jl_penalty_ref), cfg.iters, device)
    results["jl_ref"] = row("dense reference (G materialised)", ref, flops, mem=peak_mib(lambda: jl(sae_kernels.jl_penalty_ref), device))
    ours = time_ms(lambda: jl(sae_kernels.jl_penalty), cfg.iters, device)
    results["jl_ours"] = row("triton" if device == "cuda" else "blocked (no G)", ours, flops, ref[0],
                             peak_mib(lambda: jl(sae_kernels.jl_penalty), device))
    g = torch.Generator().manual_seed(0)
    sampled = lambda Wg: sae_kernels.jl_penalty(Wg, cfg.jl_sample, g)
    ms = time_ms(lambda: jl(sampled), cfg.iters, device)
    # FLOPs of the estimate: (m, d) @ (d, n) forward and its two backward matmuls, 6 m n d
    results["jl_sampled"] = row(f"sampled ({cfg.jl_sample} rows, estimate)", ms, 6 * cfg.jl_sample * s * d, ref[0],
                                peak_mib(lambda: jl(sampled), device))
    exact = sae_kernels.jl_penalty_ref(W).item()
    draws = torch.tensor([sae_kernels.jl_penalty(W, cfg.jl_sample, g).item() for _ in range(20)])
    results["jl_sampled_rel_err"] = (draws.std() / exact).item()
    print(f"  sampled estimate: relative standard error {results['jl_sampled_rel_err']:.2%} per step (20 draws, random rows)")
    return results


def bench_jl_memory(cfg, device):
    n, d = cfg.jl_big, 768
    print(f"JL value+gradient memory at n={n}, d={d}:")
    W = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=1)
    def run(fn, rows=n):
        Wg = W[:rows].clone().requires_grad_()
        fn(Wg).backward()
    # the dense reference's peak grows as n^2: measured at a small n, scaled. (A guess of 4 n^2 fp32 temporaries ran
    # an H200 out of memory at n = 65536: the reference peaked at 16.4 times G's bytes at n = 8192.)
    small = 2048
    per_entry = peak_mib(lambda: run(sae_kernels.jl_penalty_ref, small), device) * 2**20 / small**2
    dense_bytes = per_entry * n * n
    results = {"n": n, "dense_bytes_per_pair": per_entry}
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if dense_bytes < 0.8 * free:
        results["dense_mib"] = peak_mib(lambda: run(sae_kernels.jl_penalty_ref), device)
        print(f"  dense reference  peak {results['dense_mib']:9.0f} MiB")
    else:
        print(f"  dense reference  does not fit: G alone is {n * n * 4 / 2**30:.0f} GiB, its peak about "
              f"{dense_bytes / 2**30:.0f} GiB ({per_entry:.0f} bytes a pair, measured at n = {small})")
    t0 = time.perf_counter()
    results["ours_mib"] = peak_mib(lambda: run(sae_kernels.jl_penalty), device)
    print(f"  {'triton' if device == 'cuda' else 'blocked'}          peak {results['ours_mib']:9.0f} MiB above W "
          f"({W.numel() * 4 / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
    return results


def bench_end_to_end(cfg, device, peaks):
    if device == "cpu":  # the trainer's allocator setting (sae.py): freed temporaries reused, no page faults;
        sae_kernels.keep_freed_memory()  # the ops above are timed and measured at glibc's defaults
    model = GPT(GPTConfig()) if cfg.init_from == "random" else GPT.from_pretrained(cfg.init_from)
    model = model.to(device).eval().requires_grad_(False)
    contexts = cfg.batch_size // cfg.block_size
    idx = torch.randint(0, model.config.vocab_size, (contexts, cfg.block_size), device=device)
    dtype = auto_dtype(device)  # sae.py's --dtype=auto: the harvest and the SAE step in it, MFU against its peak
    autocast = torch.autocast(device, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    peak_gflops = peaks[dtype]
    from torch.utils.flop_counter import FlopCounterMode
    with onednn_off(), torch.no_grad(), autocast, FlopCounterMode(display=False) as counter:
        model.harvest(idx, cfg.layer, cfg.site)
    harvest_flops = counter.get_total_flops()
    results = {}
    print(f"end to end, {contexts}x{cfg.block_size} tokens a step, layer {cfg.layer} {cfg.site}, d_sae {cfg.d_sae}, "
          f"{dtype} matmuls (MFU against {peak_gflops:,.0f} GFLOP/s):")
    with torch.no_grad(), autocast:
        harvest = time_ms(lambda: model.harvest(idx, cfg.layer, cfg.site), cfg.iters, device)
        mfu_harvest = harvest_flops / harvest[0] / 1e6 / peak_gflops
        print(f"  harvest, stop at layer {cfg.layer}     {harvest[0]:9.1f} ms  {cfg.batch_size / harvest[0] * 1e3:10,.0f} tok/s  "
              f"MFU {mfu_harvest:.0%}")
        results["harvest_stop_tok_s"], results["harvest_mfu"] = cfg.batch_size / harvest[0] * 1e3, mfu_harvest
        if not cfg.quick:
            full = time_ms(lambda: model(idx), cfg.iters, device)
            print(f"  full forward                 {full[0]:9.1f} ms  {cfg.batch_size / full[0] * 1e3:10,.0f} tok/s "
                  f"(harvest takes {harvest[0] / full[0]:.2f} of its time)")
            results["harvest_full_tok_s"] = cfg.batch_size / full[0] * 1e3
    d = model.config.n_embd
    trainees = {}  # loss -> (sae, optimizer, its config)

    def harvest_and_train(losses):  # one harvest feeds every SAE, as in `sae.py --loss=sparsity,jl,hybrid`
        with torch.no_grad(), autocast:
            acts = model.harvest(idx, cfg.layer, cfg.site).reshape(-1, d).float()
        for loss in losses:
            sae, optimizer, tcfg = trainees[loss]
            with autocast:
                loss_and_terms = sae_loss(sae, acts, tcfg, 10)
            backward_and_update(sae, optimizer, loss_and_terms, tcfg)

    for loss in ("sparsity", "jl", "hybrid"):
        sample = cfg.jl_sample if device == "cpu" else 0  # the CPU steps estimate JL; CUDA runs it exactly
        tcfg = TrainConfig(loss=loss, d_sae=cfg.d_sae, jl_sample=sample, sparsity_warmup_iters=1)
        sae = SAE(d, cfg.d_sae).to(device)
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
        trainees[loss] = sae, optimizer, tcfg
        x = torch.randn(cfg.batch_size, d, device=device)
        def sae_only():
            with autocast:
                loss_and_terms = sae_loss(sae, x, tcfg, 10)
            backward_and_update(sae, optimizer, loss_and_terms, tcfg)
        jl_flops = 0 if loss == "sparsity" else (6 * sample * cfg.d_sae * d if sample else 3 * cfg.d_sae ** 2 * d)
        sae_flops = 10 * cfg.batch_size * d * cfg.d_sae + jl_flops
        step = time_ms(sae_only, cfg.iters, device)
        train = time_ms(lambda: harvest_and_train([loss]), cfg.iters, device)
        mfu_sae = sae_flops / step[0] / 1e6 / peak_gflops
        mfu = (sae_flops + harvest_flops) / train[0] / 1e6 / peak_gflops
        # the arithmetic limit: every FLOP of the step (the model's forward to the site, the SAE's six matmuls and
        # its L1 terms, the JL penalty's) at the measured matmul peak; MFU = the measured rate over it
        limit_tok_s = peak_gflops * 1e9 / ((sae_flops + harvest_flops) / cfg.batch_size)
        jl_note = f" (JL from {sample} rows)" if loss != "sparsity" and sample else ""
        print(f"  train {loss:<6}{jl_note:<22} {train[0]:9.1f} ms  {cfg.batch_size / train[0] * 1e3:10,.0f} tok/s  "
              f"MFU {mfu:.0%} of the limit {limit_tok_s:,.0f} tok/s | SAE step alone {step[0]:.1f} ms, "
              f"{cfg.batch_size / step[0] * 1e3:,.0f} tok/s, MFU {mfu_sae:.0%}")
        results[f"train_{loss}"] = {"ms": train[0], "tok_s": cfg.batch_size / train[0] * 1e3, "mfu": mfu,
                                    "limit_tok_s": limit_tok_s, "sae_step_ms": step[0], "sae_step_mfu": mfu_sae}
    ratio = results["train_hybrid"]["sae_step_ms"] / results["train_sparsity"]["sae_step_ms"]
    rate = results["train_hybrid"]["tok_s"] / results["train_sparsity"]["tok_s"]
    print(f"  hybrid SAE step / sparsity SAE step: {ratio:.2f}x; hybrid's rate end to end {rate:.2f} of sparsity's")
    results["hybrid_over_sparsity_step"], results["hybrid_over_sparsity_rate"] = ratio, rate
    # many SAEs per pass: the harvest is paid once for all three
    three = time_ms(lambda: harvest_and_train(["sparsity", "jl", "hybrid"]), cfg.iters, device)
    alone = sum(results[f"train_{loss}"]["ms"] for loss in ("sparsity", "jl", "hybrid")) / 3
    print(f"  sparsity, jl, hybrid on one pass  {three[0]:9.1f} ms: {three[0] / 3:.1f} ms per SAE, against {alone:.1f} ms "
          f"with one SAE per pass (per-SAE cost {three[0] / 3 / alone:.2f}x)")
    results["three_per_pass"] = {"ms": three[0], "ms_per_sae": three[0] / 3, "ms_per_sae_alone": alone}
    return results


# ---------------------------------------------------------------------------------------------------------------------
# --archs=True: the sparse kernels against their dense references, then one training step of every
# architecture and transcoder

def bench_sparse_codes(cfg, device):
    """sae_kernels.py's sparse codes at GPT-2 small's width, K = 32, n_latents 8192 and 32768: the dense references
    (the code scattered into (N, n_latents), autograd's matmuls) against ours, forward and backward apart, beside
    one dense encoder-sized matmul, then peak memory; on the CPU also the candidates for each of the three
    primitives that the section's header compares, the first of each sae_kernels.py's and each one's speed-up column
    against it (< 1: slower). CPU timings use the trainer's allocator setting (keep_freed_memory: fresh outputs
    are not page-faulted in again)."""
    import torch.nn.functional as F
    N, K, d = cfg.batch_size, 32, 768
    results = {}
    for m in ((cfg.d_sae,) if cfg.quick else (8192, 32768)):
        g = torch.Generator().manual_seed(0)
        indices = torch.rand(N, m, generator=g).topk(K, dim=1).indices.to(device)  # (N, K), distinct in a row
        values, Q = torch.randn(N, K, device=device), torch.randn(N, K, device=device)  # Q: an upstream dvalues
        x, R = torch.randn(N, d, device=device), torch.randn(N, d, device=device)      # R: an upstream dx_hat
        sae = SAE(d, m).to(device)
        W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        v = values.clone().requires_grad_()
        with torch.no_grad():
            pre = sae_kernels.linear(x - b_dec, W_enc.T, b_enc)  # (N, m): the caller's no-grad pre-activations
        def backward(out, grad):  # as training runs it: .backward() into .grad, then the grads dropped
            out.backward(grad, retain_graph=True)
            for p in (v, W_enc, b_enc, W_dec, b_dec):
                p.grad = None
        def no_grad(fn):
            with torch.no_grad():
                return fn()
        decode_ref = lambda: backward(sae_kernels.sparse_decode_ref(indices, v, W_dec, b_dec), R)
        decode = lambda: backward(sae_kernels.sparse_decode(indices, v, W_dec, b_dec), R)
        encode_ref = lambda: backward(sae_kernels.sparse_encode_ref(x, W_enc, b_enc, b_dec, indices), Q)
        encode = lambda: backward(sae_kernels.sparse_encode(x, W_enc, b_enc, b_dec, indices, pre=pre), Q)
        x_hat = sae_kernels.sparse_decode(indices, v, W_dec, b_dec)
        code = sae_kernels.sparse_encode(x, W_enc, b_enc, b_dec, indices, pre=pre)
        a, bt = torch.randn(N, d, device=device), torch.randn(m, d, device=device)
        flops = 2 * N * K * d  # the useful work of one primitive (gather-sum, gather-dot or scatter)
        # (key, label, fn, useful FLOPs, key of the row its speed-up is against)
        rows = [("dense_matmul", f"one dense matmul ({N}x{d} @ {d}x{m})", lambda: sae_kernels.linear(a, bt), 2 * N * d * m, None),
                ("decode_ref", "decode reference fwd+bwd", decode_ref, 3 * flops, None),
                ("decode_fwd", "decode ours fwd", lambda: no_grad(lambda: sae_kernels.sparse_decode(indices, v, W_dec, b_dec)), flops, None),
                ("decode_bwd", "decode ours bwd", lambda: backward(x_hat, R), 2 * flops, None),
                ("decode", "decode ours fwd+bwd", decode, 3 * flops, "decode_ref"),
                ("encode_ref", "encode reference fwd+bwd", encode_ref, flops, None),
                ("encode_fwd_pre", "encode ours fwd, gathered from pre",
                 lambda: no_grad(lambda: sae_kernels.sparse_encode(x, W_enc, b_enc, b_dec, indices, pre=pre)), 0, None),
                ("encode_fwd", "encode ours fwd, recomputed",
                 lambda: no_grad(lambda: sae_kernels.sparse_encode(x, W_enc, b_enc, b_dec, indices)), flops, None),
                ("encode_bwd", "encode ours bwd", lambda: backward(code, Q), flops, None),
                ("encode", "encode ours fwd (pre) + bwd", encode, flops, "encode_ref")]
        if device == "cpu":
            W, A, c = W_dec.detach(), R, 256  # c: rows a chunk, so that the (c, K, d) gather is 25 MiB
            crow = torch.arange(0, N * K + 1, K)
            csr = lambda vals: torch.sparse_csr_tensor(crow, indices.reshape(-1), vals.reshape(-1), (N, m), check_invariants=False)
            coo = torch.stack([indices.reshape(-1), torch.arange(N).repeat_interleave(K)])  # (2, N K) of f^T
            def chunked(fn, shape):
                out = torch.empty(shape)
                for s in range(0, N, c):
                    out[s:s + c] = fn(slice(s, s + c))
                return out
            def scatter_csr():
                entries, w, offsets = sae_kernels._sort_by_index(indices, values, m)
                return torch.sparse.mm(torch.sparse_csr_tensor(offsets, entries, w, (m, N), check_invariants=False), A)
            def scatter_index_add():
                out = torch.zeros(m, d)
                for s in range(0, N, c):  # (c K, d) outer products at a time
                    out.index_add_(0, indices[s:s + c].reshape(-1), (values[s:s + c, :, None] * A[s:s + c, None, :]).reshape(-1, d))
                return out
            candidates = [
                ("gather-sum", "embedding_bag", lambda: F.embedding_bag(indices, W, per_sample_weights=values, mode="sum")),
                ("gather-sum", "CSR sparse.mm", lambda: torch.sparse.mm(csr(values), W)),
                ("gather-sum", "gather + bmm, 256-row chunks",
                 lambda: chunked(lambda s: torch.bmm(values[s, None, :], W[indices[s]]).squeeze(1), (N, d))),
                ("gather-dot", "sampled_addmm", lambda: sae_kernels._gather_dot_cpu(A, W, indices)),
                ("gather-dot", "gather + bmm, 256-row chunks",
                 lambda: chunked(lambda s: torch.bmm(W[indices[s]], A[s, :, None]).squeeze(2), (N, K))),
                ("scatter", "sort + embedding_bag", lambda: sae_kernels._scatter_outer_cpu(indices, values, A, m)),
                ("scatter", "sort + CSR sparse.mm", scatter_csr),
                ("scatter", "index_add_, 256-row chunks", scatter_index_add),
                ("scatter", "COO sparse.mm", lambda: torch.sparse.mm(
                    torch.sparse_coo_tensor(coo, values.reshape(-1), (m, N), check_invariants=False), A))]
            ours = {"gather-sum": "embedding_bag", "gather-dot": "sampled_addmm", "scatter": "sort + embedding_bag"}
            rows += [(f"{p}: {name}", f"{p}: {name}", fn, flops, f"{p}: {ours[p]}") for p, name, fn in candidates]
            sae_kernels.keep_freed_memory()
        print(f"sparse codes, N={N} K={K} d={d} n_latents={m} (fp32), GFLOP/s of 2 N K d per primitive:")
        r = results[m] = {}
        for key, label, fn, useful, base in rows:
            ms = time_ms(fn, cfg.iters, device)
            r[key] = row(label, ms, useful, r[base]["ms"] if base in r else ms[0] if base == key else None)
        if device == "cpu":  # memory at glibc's defaults, as bench_ops measures it
            sae_kernels.keep_freed_memory(keep=False)
        for key, fn in (("decode_ref", decode_ref), ("decode", decode), ("encode_ref", encode_ref), ("encode", encode)):
            r[key]["peak_mib"] = peak_mib(fn, device)
        print(f"  peak memory above the inputs, fwd+bwd: decode {r['decode_ref']['peak_mib']:.0f} MiB (reference) against "
              f"{r['decode']['peak_mib']:.0f} (ours); encode {r['encode_ref']['peak_mib']:.0f} against {r['encode']['peak_mib']:.0f}")
    return results


def bench_arch_steps(cfg, device, widths=(8192, 32768), k=32):
    """One training step (sae_loss + backward_and_update: forward, backward, Adam) of every architecture at GPT-2
    small's width, batch cfg.batch_size, on random activations at sae.py's scale (E|x| = sqrt(d)); a tenth of the
    features dead, so AuxK runs. Time and peak memory above the weights, gradients and Adam's state (allocated before)."""
    d = 768
    x = torch.randn(cfg.batch_size, d, device=device)
    results = {}
    print(f"one training step per architecture, d_in {d}, batch {cfg.batch_size}, k {k} (the k-sparse ones), fp32:")
    for width in widths:
        dead = torch.zeros(width, dtype=torch.bool, device=device)
        dead[::10] = True
        for arch in ARCHS:
            tcfg = TrainConfig(arch=arch, d_sae=width, k=k, sparsity_warmup_iters=1)
            torch.manual_seed(0)
            model = SAE.from_config((d, 0), tcfg).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            step = lambda: backward_and_update(model, optimizer, sae_loss(model, x, tcfg, 10, dead), tcfg)
            step()  # Adam's state allocated before memory is measured
            ms = time_ms(step, cfg.iters, device)
            mem = peak_mib(step, device)
            pre_mib = cfg.batch_size * width * 4 / 2**20  # the dense encoder pre-activations, (N, d_sae) fp32
            print(f"  {arch + ', d_sae ' + str(width):<24} {ms[0]:9.1f} ms ({ms[1]:.1f}..{ms[2]:.1f})  {mem:7.0f} MiB"
                  f"  ({mem / pre_mib:.2f}x the pre-activations' {pre_mib:.0f} MiB)")
            results[f"{arch}_{width}"] = {"ms": ms[0], "ms_p20": ms[1], "ms_p80": ms[2], "peak_mib": mem,
                                          "pre_mib": pre_mib}
            if width == widths[0]:  # hybrid beside it: what the JL penalty costs each architecture
                results[f"{arch}_{width}"]["hybrid_over_sparsity_rate"] = ms[0] / hybrid_step_ms(cfg, device, model, x, tcfg, dead)
            del model, optimizer
        base = results[f"relu_{width}"]["ms"]
        print(f"  d_sae {width}: " + ", ".join(f"{a} {results[f'{a}_{width}']['ms'] / base:.2f}x" for a in ARCHS) +
              " the relu step")
        if width == widths[0]:
            jl = "exact" if device == "cuda" else f"estimated from {cfg.jl_sample} rows, as on the CPU"
            print(f"  d_sae {width}, hybrid's rate as a fraction of the sparsity loss's (the JL penalty {jl}): " +
                  ", ".join(f"{a} {results[f'{a}_{width}']['hybrid_over_sparsity_rate']:.2f}" for a in ARCHS))
        results.update(bench_transcoder_steps(cfg, device, width, k, dead, results))
    return results


def hybrid_step_ms(cfg, device, model, x, tcfg, dead):
    """The median ms of one --loss=hybrid step of model (its sparsity loss plus the JL penalty: exact on CUDA,
    estimated from cfg.jl_sample rows on the CPU, as bench_end_to_end runs it), on its own Adam."""
    hcfg = replace(tcfg, loss="hybrid", jl_sample=0 if device == "cuda" else cfg.jl_sample)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    step = lambda: backward_and_update(model, optimizer, sae_loss(model, x, hcfg, 10, dead), hcfg)
    step()  # Adam's state
    return time_ms(step, cfg.iters, device)[0]


def bench_transcoder_steps(cfg, device, width, k, dead, sae_results):
    """Transcoders' steps beside the SAEs' (bench_arch_steps): mlp_in -> mlp_out at GPT-2 small's shape (d_in = d_out
    = 768, rows of both side by side), relu and topk, plain and with the skip path (one more (N, 768) @ (768, 768)
    matmul and its gradients)."""
    d = 768
    x = torch.randn(cfg.batch_size, 2 * d, device=device)  # [x_in | y]
    results = {}
    for arch in ("relu", "topk"):
        for skip in (False, True):
            tcfg = TrainConfig(arch=arch, d_sae=width, k=k, sparsity_warmup_iters=1, target_site="mlp_out", skip=skip)
            torch.manual_seed(0)
            model = SAE.from_config((d, d), tcfg).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            step = lambda: backward_and_update(model, optimizer, sae_loss(model, x, tcfg, 10, dead), tcfg)
            step()
            ms = time_ms(step, cfg.iters, device)
            name = f"{arch}_{'skip_' * skip}transcoder_{width}"
            results[name] = {"ms": ms[0], "ms_p20": ms[1], "ms_p80": ms[2],
                             "vs_sae": ms[0] / sae_results[f"{arch}_{width}"]["ms"]}
            label = f"{arch} {'skip ' * skip}transcoder, d_sae {width}"
            print(f"  {label:<34} {ms[0]:9.1f} ms ({ms[1]:.1f}..{ms[2]:.1f})  {results[name]['vs_sae']:.2f}x the "
                  f"{arch} SAE's step")
            del model, optimizer
    return results


def bench_archs(cfg, device):
    """--archs=True: the sparse kernels against their dense references, then every architecture's step."""
    sae_kernels.keep_freed_memory()  # as sae.py runs on the CPU
    widths = (cfg.d_sae,) if cfg.quick else (8192, 32768)
    return {"sparse_codes": bench_sparse_codes(cfg, device), "steps": bench_arch_steps(cfg, device, widths)}


# ---------------------------------------------------------------------------------------------------------------------
# --models=True: tokenizers, then a real Llama-family model's harvest

def shared_documents():
    """The real web text of ../shared/data/text: a list of documents, read as prepare.py reads them."""
    import glob
    import prepare
    text_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "text")
    paths = sorted(glob.glob(os.path.join(text_dir, "*.jsonl")))
    if not paths:
        raise ValueError(f"{os.path.normpath(text_dir)}: no .jsonl text (../shared is missing)")
    return [doc for path in paths for doc in prepare.read_local_documents(path, "text")]


def llama_spec(cfg):
    """The Llama-family model --models reads: --llama, else $SMOLLM2_DIR, else SmolLM2 on the Hub."""
    return cfg.llama or os.environ.get("SMOLLM2_DIR", "HuggingFaceTB/SmolLM2-135M")


def bench_tokenizers(cfg, documents):
    """Tokens/s of prepare.py's tokenization (prepare.tokenize_documents: tiktoken in its process pool, a
    tokenizer.json in batches on every core) over the documents, separators included: tiktoken's gpt2 and
    the --llama model's tokenizer.json (skipped if it cannot be loaded)."""
    import prepare
    n_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    print(f"tokenization as prepare.py does it, {len(documents):,} documents ({n_bytes / 2**20:.1f} MiB) of "
          f"../shared/data/text, {os.cpu_count()} CPUs:")
    results = {}
    for spec in ("gpt2", llama_spec(cfg)):  # tiktoken first: it forks
        try:
            tokenizer = prepare.load_tokenizer(spec)
        except ValueError as e:  # prepare.PrepareError: offline, no cache, ...
            print(f"  {spec:<34} skipped: {e}")
            continue
        dtype = prepare.shard_dtype(tokenizer)
        count = lambda: sum(len(tokens) for tokens in prepare.tokenize_documents(tokenizer, documents, dtype))
        n_tokens = count()
        ms = time_ms(count, cfg.iters, "cpu")
        label = f"{tokenizer.kind} {os.path.basename(spec.rstrip('/'))}"
        print(f"  {label:<34} {ms[0]:9.1f} ms ({ms[1]:.1f}..{ms[2]:.1f})  {n_tokens / ms[0] * 1e3:10,.0f} tok/s  "
              f"{n_bytes / n_tokens:.2f} bytes/token")
        results[spec] = {"ms": ms[0], "tokens": n_tokens, "tok_s": n_tokens / ms[0] * 1e3}
    return results


def bench_llama_harvest(cfg, documents):
    """A real Llama-family model's harvest at (llama_layer, mlp_in) against its full forward, tokens/s, on
    batch_size // block_size contexts of the documents tokenized with its own tokenizer."""
    import prepare
    from sae import load_model
    spec = llama_spec(cfg)
    model, tok = load_model(spec).requires_grad_(False), prepare.load_tokenizer(spec)
    contexts = cfg.batch_size // cfg.block_size
    ids = []
    for doc in documents:  # as prepare.py writes them: the separator, then the document
        ids += [tok.separator_id] + tok.encode(doc)
        if len(ids) >= contexts * cfg.block_size:
            break
    idx = torch.tensor(ids[:contexts * cfg.block_size]).view(contexts, cfg.block_size)  # (contexts, block_size)
    n = idx.numel()
    print(f"{os.path.basename(spec.rstrip('/'))}: {model.config.n_layer} blocks, d_model {model.config.n_embd}, "
          f"{contexts}x{cfg.block_size} tokens:")
    with torch.no_grad():
        harvest = time_ms(lambda: model.harvest(idx, cfg.llama_layer, "mlp_in"), cfg.iters, "cpu")
        full = time_ms(lambda: model(idx), cfg.iters, "cpu")
    print(f"  harvest, stop at layer {cfg.llama_layer} mlp_in {harvest[0]:9.1f} ms  {n / harvest[0] * 1e3:10,.0f} tok/s")
    print(f"  full forward                  {full[0]:9.1f} ms  {n / full[0] * 1e3:10,.0f} tok/s "
          f"(harvest takes {harvest[0] / full[0]:.2f} of its time)")
    return {"model": spec, "harvest_tok_s": n / harvest[0] * 1e3, "full_tok_s": n / full[0] * 1e3}


def bench_models(cfg):
    """--models=True: tokenizers, then a real Llama-family model's harvest."""
    sae_kernels.keep_freed_memory()  # as sae.py runs on the CPU
    documents = shared_documents()
    return {"tokenizers": bench_tokenizers(cfg, documents), "llama_harvest": bench_llama_harvest(cfg, documents)}


# ---------------------------------------------------------------------------------------------------------------------
# --saelens=True: SAELens against sae.py, end to end on the CPU: GPT-2 small's shape (random weights), layer 6
# mlp_in, d_sae 8192, 4096-token steps of 128-token contexts (position 0 dropped), a 2**18-token shuffling buffer of
# 32-context harvests, fp32, relu with the L1 coefficient 5, Adam 1e-4; no evaluation, checkpoint or wandb inside the timed
# steps. Each in its own process, on the same tokens. Steady-state tokens/s: steps 33 to 32 + steps, whole refill
# periods of both buffers (half a buffer, 32 steps, between refills), refills included.
WARMUP = 32


def saelens_worker(tokens_path, steps, bf16, device="cpu"):
    """SAELens 6.54 through its own LanguageModelSAETrainingRunner (`pip install sae-lens==6.54.12`, not a
    dependency). Its model is a HookedTransformer of GPT-2 small's shape built directly, with layer norm folded
    as from_pretrained("gpt2") gives it (normalization LNPre), so nothing is downloaded. bf16: its two autocast
    options on (the model's forward, the SAE's step; parameters fp32, as ours). Prints its rate, and on CUDA its peak
    GPU memory."""
    from datasets import Dataset
    import importlib.util
    if importlib.util.find_spec("sae_lens") is None:
        sys.exit("sae_lens is not installed: `pip install sae-lens==6.54.12` (the baseline, not a dependency)")
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, StandardTrainingSAEConfig
    from sae_lens.config import LoggingConfig
    from sae_lens.training.sae_trainer import SAETrainer
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    tokens = np.load(tokens_path).astype(np.int64)
    dataset = Dataset.from_dict({"input_ids": tokens[:len(tokens) // 128 * 128].reshape(-1, 128).tolist()})
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=12, d_model=768, n_ctx=1024, d_head=64, n_heads=12, d_mlp=3072, d_vocab=50257, act_fn="gelu_new",
        normalization_type="LNPre", default_prepend_bos=False, device=device, dtype=torch.float32, seed=0))
    stamps, step = [], SAETrainer.step
    def timed_step(self, *args, **kwargs):  # a time stamp as each step starts; the step itself unchanged
        stamps.append(time.perf_counter())
        return step(self, *args, **kwargs)
    SAETrainer.step = timed_step
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=768, d_sae=8192, l1_coefficient=5.0, dtype="float32", device=device,
                                      apply_b_dec_to_input=True, normalize_activations="none"),
        model_name="gpt2", hook_name="blocks.6.ln2.hook_normalized", dataset_path="local", is_dataset_tokenized=True,
        # SAELens 6.54's buffer holds n_batches_in_buffer x 127 activations (not x store_batch_size_prompts too,
        # as its log line says): 2064 of them are our 2**18-token buffer
        streaming=False, context_size=128, seqpos_slice=(1, None), prepend_bos=False, n_batches_in_buffer=2**18 // 127,
        store_batch_size_prompts=32, training_tokens=4096 * (WARMUP + 1 + steps), train_batch_size_tokens=4096, lr=1e-4,
        device=device, dtype="float32", autocast=bf16, autocast_lm=bf16, logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        save_final_checkpoint=False, output_path=None, checkpoint_path=None, verbose=False)
    LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model).run()
    stamps.append(time.perf_counter())  # the end of the last step
    # stamps[i]: step i starts, its batch fetched; stamps[WARMUP + 1] to the end: fetching and training steps 33 on
    print(f"saelens_tok_s {4096 * (len(stamps) - 2 - WARMUP) / (stamps[-1] - stamps[WARMUP + 1]):.1f}")
    if device == "cuda":
        print(f"saelens_gpu_gib {torch.cuda.max_memory_allocated() / 2**30:.3f}")


def bench_saelens(cfg, device="cpu"):
    import glob
    from prepare import read_shard
    shards = sorted(glob.glob(os.path.join(cfg.data_dir, "*_train_*.bin")))
    if not shards:
        raise ValueError(f"--data_dir={cfg.data_dir}: no train shards (run prepare.py; offline: see the README's 'offline use')")
    dtype = resolved_dtype(cfg, device)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    print(f"end to end against SAELens on {device}, GPT-2 small's shape (random weights), layer 6 mlp_in, d_sae 8192, "
          f"l1, 4096-token steps, buffers of 2**18 activations, {dtype} matmuls, rates over steps {WARMUP + 1} to "
          f"{WARMUP + cfg.steps}, peak resident memory of the whole run (and on CUDA the peak GPU memory):")
    gpu = lambda out, key: f", GPU {float(out.split(key)[1].split()[0]):.2f} GiB" if key in out else ""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "tokens.npy"), np.concatenate([read_shard(p) for p in shards]))
        out, theirs_gib = run_measured("SAELens", [sys.executable, "bench.py", f"--saelens_worker={tmp}/tokens.npy",
                                                   f"--steps={cfg.steps}", f"--dtype={dtype}", f"--device={device}"], env)
        theirs = float(out.split("saelens_tok_s")[1].split()[0])
        print(f"  SAELens (its runner)       {theirs:9,.0f} tok/s   peak {theirs_gib:.2f} GiB{gpu(out, 'saelens_gpu_gib')}")
        # sae.py at its defaults but for the run's length, the log interval and the evaluation: at 4,096 tokens
        # (one batch of 32 contexts, the default's 2**15 in eight) once at the start and once at the end, outside
        # the timed steps, so its peak memory is in the figure
        out, ours_gib = run_measured("sae.py", [
            sys.executable, "sae.py", "--init_from=scratch", f"--data_dir={cfg.data_dir}", f"--out_dir={tmp}/ours",
            "--loss=sparsity", f"--max_iters={WARMUP + 2 + cfg.steps}", f"--eval_interval={10 * cfg.steps}",
            f"--log_interval={WARMUP}", "--eval_tokens=4096", "--resample_iters=()", "--sparsity_warmup_iters=1",
            f"--dtype={dtype}", f"--device={device}"], env)
        # logged every 32 steps, each window ending with a refill: tokens over time from step 33 to 32 + steps
        ours = logged_rate(out, WARMUP, WARMUP + cfg.steps)
        last = [line for line in out.splitlines() if line.startswith("iter ")][-1]  # on CUDA it ends "| peak X GiB"
        print(f"  sae.py                     {ours:9,.0f} tok/s   peak {ours_gib:.2f} GiB{gpu(last, 'peak ')}   {ours / theirs:.2f}x "
              f"SAELens's rate, {ours_gib / theirs_gib:.2f}x its memory")
    return {"dtype": dtype, "saelens_tok_s": theirs, "ours_tok_s": ours, "speedup": ours / theirs,
            "saelens_peak_gib": theirs_gib, "ours_peak_gib": ours_gib}


# ---------------------------------------------------------------------------------------------------------------------
# --layers_pass=True: every layer in one pass against one-layer passes (and sparsify). On a real Llama-family model
# (--llama, else $SMOLLM2_DIR), a topk skip transcoder mlp_in -> mlp_out per layer, trained by one `sae.py
# --layers=all` process against one-layer passes (--layer=L) and, with --sparsify, against EleutherAI's sparsify,
# which trains all layers' transcoders from one forward too. Every process gets the same shape (latents, k, tokens a
# step of whole block_size contexts, no position dropped, fp32), the same tokens and OMP_NUM_THREADS=threads; each is
# run to its end and measured as a whole (run_measured: peak RSS).

def sparsify_worker(path):
    """EleutherAI's sparsify 1.3.3 (`pip install eai-sparsify==1.3.3` in its own venv: not a dependency) through its
    own Trainer on the CPU, with the settings of the JSON at path. Its CLI loads the model onto CUDA (device_map
    cuda:rank) and reads a Hub dataset; here the model is loaded as the CLI loads it (AutoModel, its loss being fvu)
    but onto the CPU in fp32, and our tokens, contexts in order, are its dataset. Prints its tokens/s over the timed
    steps: wall time between the DataLoader's fetches of their batches (each stamped as its first context is read,
    which is after the step before has ended) and so every step whole: forward, hooks' backward, optimizer."""
    import json
    from sparsify import SparseCoderConfig, TrainConfig, Trainer
    from transformers import AutoModel
    s = json.load(open(path))
    torch.set_num_threads(s["threads"])
    contexts, n_steps = s["batch"] // s["block_size"], s["warmup"] + s["steps"] + 1  # the last step: after the timing
    rows = np.load(s["tokens"])[:n_steps * s["batch"]].reshape(-1, s["block_size"])  # (n_steps * contexts, block_size)
    assert len(rows) == n_steps * contexts, f"{len(rows)} contexts of tokens, {n_steps * contexts} needed"
    stamps = []  # stamps[i]: step i starts (its batch fetched)
    class Contexts(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)
        def __getitem__(self, i):
            if i % contexts == 0:
                stamps.append(time.perf_counter())
            return {"input_ids": torch.from_numpy(rows[i].astype(np.int64))}
    model = AutoModel.from_pretrained(s["model"], dtype=torch.float32)
    # a transcoder per layer from the MLP's input (its hook's input: the post-attention norm's output, our mlp_in) to
    # its output (mlp_out), with the skip path; no AuxK (auxk_alpha's default 0); never saved before the end
    cfg = TrainConfig(SparseCoderConfig(activation="topk", num_latents=s["d_sae"], k=s["k"], transcode=True,
                                        skip_connection=True),
                      batch_size=contexts, loss_fn="fvu", optimizer=s["optimizer"], hookpoints=["layers.*.mlp"],
                      log_to_wandb=False, save_every=10**9, save_dir=s["save_dir"])
    trainer = Trainer(cfg, Contexts(), model)
    assert len(trainer.saes) == model.config.num_hidden_layers, f"{len(trainer.saes)} transcoders"
    trainer.fit()
    first, last = s["warmup"], s["warmup"] + s["steps"]
    print(f"sparsify_tok_s {s['batch'] * s['steps'] / (stamps[last] - stamps[first]):.1f}")


def layers_pass_runs(cfg, model, n_layer, tmp):
    """The processes measured: (label, argv, layer or None). sae.py once with --layers=all and once at each of the
    first, middle and last layers; sparsify (with --sparsify) when $SPARSIFY_PYTHON names its interpreter."""
    period = cfg.layers_buffer // 2 // cfg.layers_batch  # steps between buffer refills: the log interval
    if cfg.layers_batch % cfg.block_size or cfg.layers_buffer % (2 * cfg.layers_batch) or \
            cfg.layers_warmup % period or cfg.layers_steps % period or cfg.layers_steps < period:
        raise ValueError(f"--layers_batch={cfg.layers_batch} must be whole contexts of --block_size={cfg.block_size}, "
                         f"--layers_buffer={cfg.layers_buffer} a multiple of 2 x layers_batch, and --layers_warmup and "
                         f"--layers_steps multiples of its refill period ({period} steps)")
    ours = [sys.executable, "sae.py", f"--init_from={model}", f"--data_dir={cfg.data_dir}", "--site=mlp_in",
            "--target_site=mlp_out", "--skip=True", "--arch=topk", f"--k={cfg.layers_k}", f"--d_sae={cfg.layers_d_sae}",
            f"--batch_size={cfg.layers_batch}", f"--block_size={cfg.block_size}", "--exclude_pos0=False",
            f"--harvest_batch={cfg.layers_batch // cfg.block_size}",  # one forward fills one batch's rows exactly
            f"--buffer_tokens={cfg.layers_buffer}", f"--max_iters={cfg.layers_warmup + cfg.layers_steps + 1}",
            f"--log_interval={period}", "--resample_iters=()", "--dtype=float32", "--device=cpu",
            # the scales' and biases' first sample is drawn from the buffer: more rows than it holds are repeats, and
            # the default 2**14 rows of every layer's columns (2.3 GB at 30 layers) would be the run's peak
            f"--resample_samples={cfg.layers_buffer}",
            # evaluated at step 0 and at the end (each layer spliced alone, then all at once), outside the timing:
            # one context (30 layers: about a minute each time on 2 cores)
            "--eval_interval=1000000", f"--eval_tokens={cfg.block_size}"]
    runs = [("sae.py, every layer in one pass", ours + ["--layers=all", f"--out_dir={tmp}/all"], None)]
    for layer in (0, n_layer // 2, n_layer - 1):
        runs.append((f"sae.py, layer {layer} alone", ours + [f"--layer={layer}", f"--out_dir={tmp}/layer{layer}"], layer))
    if cfg.sparsify:
        python = os.environ.get("SPARSIFY_PYTHON", "")
        if not (python and os.access(python, os.X_OK)):
            print(f"  sparsify: skipped: $SPARSIFY_PYTHON {'is not set' if not python else f'={python} is not executable'}"
                  f" (the python of a venv with `pip install torch==2.13.0 eai-sparsify==1.3.3`)")
        else:
            settings = {"model": model, "tokens": f"{tmp}/tokens.npy", "save_dir": f"{tmp}/sparsify",
                        "d_sae": cfg.layers_d_sae, "k": cfg.layers_k, "batch": cfg.layers_batch,
                        "block_size": cfg.block_size, "warmup": cfg.layers_warmup, "steps": cfg.layers_steps,
                        "threads": cfg.threads, "optimizer": cfg.sparsify_optimizer}
            json.dump(settings, open(f"{tmp}/sparsify.json", "w"))
            runs.append(("sparsify, every layer in one pass",
                         [python, "bench.py", f"--sparsify_worker={tmp}/sparsify.json"], None))
    return runs


def bench_layers_pass(cfg):
    """--layers_pass=True: tokens/s and peak resident memory of every layer's transcoder in one pass, of one-layer
    passes (the time of all n_layer of them estimated from three), and with --sparsify of sparsify's pass; the ratios."""
    import glob
    from prepare import hub_file, read_shard
    shards = sorted(glob.glob(os.path.join(cfg.data_dir, "*_train_*.bin")))
    if not shards:
        raise ValueError(f"--data_dir={cfg.data_dir}: no train shards (run prepare.py with the model's tokenizer)")
    model = llama_spec(cfg)
    config = hub_file(model, "config.json", "--llama")
    if config is None:
        raise ValueError(f"--llama={model}: no config.json (a Llama-family directory written by save_pretrained)")
    n_layer = json.load(open(config))["num_hidden_layers"]
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads)}
    first, last = cfg.layers_warmup, cfg.layers_warmup + cfg.layers_steps
    print(f"every layer in one pass: {os.path.basename(model.rstrip('/'))}, {n_layer} layers, a topk skip transcoder "
          f"mlp_in -> mlp_out per layer, {cfg.layers_d_sae} latents, k {cfg.layers_k}, {cfg.layers_batch}-token steps of "
          f"{cfg.block_size}-token contexts, fp32, {cfg.threads} thread(s) a process; tok/s over steps {first + 1} to "
          f"{last}, peak resident memory of the whole process:")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "tokens.npy"), np.concatenate([read_shard(p) for p in shards]))
        for label, args, layer in layers_pass_runs(cfg, model, n_layer, tmp):
            out, gib = run_measured(label, args, env)
            tok_s = float(out.split("sparsify_tok_s")[1].split()[0]) if "sparsify" in label else logged_rate(out, first, last)
            print(f"  {label:<36} {tok_s:9,.1f} tok/s   peak {gib:.2f} GiB")
            results[label.split(",")[0] + ("" if layer is None else f"_layer{layer}")] = {"tok_s": tok_s, "peak_gib": gib}
    one = results["sae.py"]
    # a one-layer pass's time per token grows with the depth its harvest stops at: 1/rate linear in the layer between
    # the three measured ones, summed over every layer
    measured = sorted((int(k.split("layer")[1]), v["tok_s"]) for k, v in results.items() if "_layer" in k)
    layers, rates = zip(*measured)
    seconds_per_token = float(np.interp(np.arange(n_layer), layers, [1 / r for r in rates]).sum())
    separate = {"tok_s": 1 / seconds_per_token, "peak_gib": max(v["peak_gib"] for k, v in results.items() if "_layer" in k)}
    print(f"  {n_layer} one-layer passes (estimated from the 3 measured layers {', '.join(map(str, layers))}: 1/rate "
          f"linear in the layer, summed) {separate['tok_s']:,.1f} tok/s, peak {separate['peak_gib']:.2f} GiB (one at a "
          f"time)\n  one pass: {one['tok_s'] / separate['tok_s']:.2f}x their combined rate, {one['peak_gib'] / separate['peak_gib']:.2f}x "
          f"the largest one's memory")
    report = {"model": model, "n_layer": n_layer, "threads": cfg.threads, "runs": results, "separate": separate,
              "speedup_vs_separate": one["tok_s"] / separate["tok_s"],
              "memory_vs_separate": one["peak_gib"] / separate["peak_gib"]}
    if "sparsify" in results:
        theirs = results["sparsify"]
        print(f"  against sparsify ({cfg.sparsify_optimizer}): sae.py {one['tok_s']:,.1f} tok/s / sparsify "
              f"{theirs['tok_s']:,.1f} tok/s = {one['tok_s'] / theirs['tok_s']:.2f}x its rate; memory {one['peak_gib']:.2f} / "
              f"{theirs['peak_gib']:.2f} GiB = {one['peak_gib'] / theirs['peak_gib']:.2f}x")
        report.update(speedup_vs_sparsify=one["tok_s"] / theirs["tok_s"], memory_vs_sparsify=one["peak_gib"] / theirs["peak_gib"])
    return report


def main(argv):
    if SPARSIFY_WORKER:  # before parse_args: that is sae.py's, not imported in sparsify's venv
        sparsify_worker(next(arg for arg in argv if arg.startswith("--sparsify_worker=")).split("=", 1)[1])
        sys.exit(0)
    try:
        cfg = parse_args(BenchConfig(), argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    device = choose_device(cfg.device)
    if cfg.saelens_worker:
        saelens_worker(cfg.saelens_worker, cfg.steps, cfg.dtype == "bfloat16", device)
        sys.exit(0)
    if cfg.quick:  # a smoke run of every part; the figures are not comparable with a full run's
        cfg.iters, cfg.d_sae, cfg.batch_size, cfg.jl_big = 1, 2048, 1024, 8192
    torch.manual_seed(0)
    report = {"machine": machine(device), "date": time.strftime("%Y-%m-%d"), "config": vars(cfg)}
    print(report["machine"])
    cfg.layers_pass = cfg.layers_pass or cfg.sparsify  # --sparsify is a part of --layers_pass
    special_runs = {  # each instead of the default run
        "models": lambda: bench_models(cfg),
        "synthetic": lambda: synthbench.run_known_directions(cfg.regime, cfg.synthetic_archs, cfg.jl_form),
        "saelens": lambda: bench_saelens(cfg, device),
        "archs": lambda: bench_archs(cfg, device),
        "layers_pass": lambda: bench_layers_pass(cfg)}
    special = next((name for name in special_runs if getattr(cfg, name)), None)
    if special:
        try:
            report[special] = special_runs[special]()
        except (ValueError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    else:
        report["peak_gflops"] = bench_peak(cfg, device)  # {dtype: GFLOP/s}
        dtypes = ("float32", "bfloat16") if "bfloat16" in report["peak_gflops"] else ("float32",)
        report["ops"] = bench_ops(cfg, device, dtypes)
        report["jl_memory"] = bench_jl_memory(cfg, device)
        report["end_to_end"] = bench_end_to_end(cfg, device, report["peak_gflops"])
    if cfg.json:
        write_json(cfg.json, report)
        print(f"wrote {cfg.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
