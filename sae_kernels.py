"""
The SAE's hot spots, one section each, always in this order: docstring with the math and shapes; the PyTorch
reference `<op>_ref` (the specification: every eps, clamp and dtype is decided there); the Triton kernels, each
naming its reference; their launchers; the op's CPU code; a module-level torch.autograd.Function; the public op.

Dispatch (the first section): each public op asks pick_path once which code runs it: the Triton kernels, compiled
on CUDA tensors, or with TRITON_INTERPRET=1 (set before triton is imported) interpreted on CPU tensors, which is how
test_sae_kernels.py reaches them; on the CPU otherwise, PyTorch code that wastes less than autograd's graph
(encode-ReLU-decode: five matmuls, not six; sparse codes: embedding_bag and sampled_addmm, never a dense code; JL:
blocked over rows, never materialising the n x n Gram matrix); with SAE_NO_TRITON=1, the references everywhere.
triton is optional: without it (macOS, a CPU-only install) this module imports, the CPU code and the references run,
and a Triton path stops with a one-line error. COMPILE: torch.compile (sae.py --compile) stops at the four ops
(encode_relu_decode, sparse_decode, sparse_encode, jl_penalty; torch.compiler.disable) and compiles the code around
them: Dynamo fails tracing into their launchers on the interpreter's kernels, and the kernels are fused already.
The last two sections hold no kernel: the architectures' small ops in PyTorch alone (BatchTopK's selection, FSQ's
rounding, JumpReLU's straight-through estimators), and the CPU's dense matmul `linear` (oneDNN where it works),
which encode-ReLU-decode's CPU code and GPT-2's layers call. References: the Triton tutorials
(03-matrix-multiplication), llm.c's CPU reference beside each kernel, openai/sparse_autoencoder's kernels.py,
modded-nanogpt's symmetric XXT.
"""
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # macOS and CPU-only installs: the CPU code and the references need no triton
    from types import SimpleNamespace
    HAS_TRITON = False
    # stand-ins for what the kernels' definitions read as they are defined (the decorators, the configs, the constexpr
    # annotation), so that the module imports; without triton pick_path never sends a tensor to a kernel
    triton = SimpleNamespace(jit=lambda fn: fn, autotune=lambda *args, **kwargs: (lambda fn: fn),
                             Config=lambda kwargs, **options: SimpleNamespace(kwargs=kwargs, **options))
    tl = SimpleNamespace(constexpr=None)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NO_TRITON = os.environ.get("SAE_NO_TRITON") == "1"


# -----------------------------------------------------------------------------
# dispatch: the one place that picks the code an op runs
# Each public op (encode_relu_decode, sparse_decode, sparse_encode, jl_penalty) opens the same way:
#     path = pick_path(<its data tensor>)
#     if path == "reference": return <op>_ref(...)
#     return <Op>.apply(..., path)
# and its autograd Function calls that path's code, `_<step>_triton` (a launcher) or `_<step>_cpu`, deciding nothing
# again. Two ops decide one thing first: encode_relu_decode sends float64 to its reference (the kernels have no fp64
# dot), jl_penalty a sampled estimate to jl_penalty_sampled (PyTorch on every path). The flags are module globals
# read at each call, so that a test can switch them with monkeypatch.

def pick_path(t):
    """-> "reference" under SAE_NO_TRITON=1; "triton" for a CUDA tensor t, or for any under TRITON_INTERPRET=1 (the
    same kernels, interpreted); "cpu" otherwise. A Triton path without triton installed: a one-line RuntimeError."""
    if NO_TRITON:
        return "reference"
    if t.is_cuda or INTERPRET:
        if not HAS_TRITON:
            asked = "a CUDA tensor" if t.is_cuda else "TRITON_INTERPRET=1"
            raise RuntimeError(f"sae_kernels: {asked} asks for the Triton kernels, but triton is not installed: "
                               f"pip install triton, or set SAE_NO_TRITON=1 to run the PyTorch references")
        return "triton"
    return "cpu"


# -----------------------------------------------------------------------------
# a matmul with the SAE's prologue and epilogues, each of encode-ReLU-decode's five matmuls on the Triton path
# C (M, N) = epilogue(sum_k (A[m, k] - shift) * B[k, n]); shift is shift[k] (SHIFT=1) or shift[m] (SHIFT=2);
# epilogue: + bias[n], + D[m, n], + row[m] (times col[n] with HAS_COL: a rank-one term), relu, * (F[m, n] > 0);
# A and B in one dtype, products summed in fp32, C stored in its own dtype; with STATS, from the final tile in
# registers: sums[m] += sum_n C, counts[m] += #(C > 0), fired[n] += #(C > 0) (atomics across tiles).
# A and B by strides, so transposes are free.

def sae_matmul_ref(A, B, shift=None, shift_rows=False, bias=None, D=None, row=None, col=None, relu=False,
                   mask_by=None, stats=False, out_dtype=None):
    """_sae_matmul's specification in plain torch ops, the same arguments and results: A shifted in fp32 and rounded
    back to the operands' dtype, products summed in fp32, the epilogue in fp32 in the kernel's order (bias, D, the
    rank-one term, relu, the mask), the stats from the fp32 result, and C rounded to out_dtype last."""
    if shift is None:
        A_shifted = A
    elif shift_rows:  # SHIFT=2: one shift per row of A (A = x^T), rounded to B's dtype
        A_shifted = (A.float() - shift.float()[:, None]).to(B.dtype)
    else:  # SHIFT=1: one shift per column of A (per k: x - b_dec), rounded to A's dtype
        A_shifted = (A.float() - shift.float()[None, :]).to(A.dtype)
    C = A_shifted.float() @ B.float()  # (M, K) @ (K, N) -> (M, N), fp32: the kernel's accumulator (no TF32)
    if bias is not None:  # HAS_BIAS
        C = C + bias.float()[None, :]
    if D is not None:  # HAS_D
        C = C + D.float()
    if row is not None:  # HAS_ROW: row[m], times col[n] with HAS_COL
        C = C + (row.float()[:, None] if col is None else row.float()[:, None] * col.float()[None, :])
    if relu:  # RELU
        C = torch.relu(C)
    if mask_by is not None:  # MASK_F
        C = torch.where(mask_by > 0, C, 0.0)
    out = C.to(out_dtype or A.dtype)
    if not stats:
        return out
    active = C > 0  # STATS: of the fp32 tile, before C's rounding
    return out, C.sum(dim=1), active.sum(dim=1, dtype=torch.int32), active.sum(dim=0, dtype=torch.int32)


def get_autotune_configs():
    if INTERPRET:  # the interpreter runs every program in numpy: one small config
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
               for bm, bn, bk, s, w in [(128, 128, 32, 3, 8), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
                                        (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (64, 64, 32, 5, 4),
                                        (128, 128, 64, 4, 8), (64, 256, 32, 4, 4)]]
    keep = lambda conf: conf.kwargs["BLOCK_M"] * conf.kwargs["BLOCK_N"] <= 256 * 128  # registers
    return [c for c in configs if keep(c)]  # TODO: the fastest from TRITON_PRINT_AUTOTUNING=1 on an H100 and an A100


def configs_that_fit(configs, named_args, **kwargs):
    """The autotuner's early_config_prune: the configs that fit both an A100's and an H100's shared memory (163 and
    227 KiB) at the operands' width. Measured by the ahead-of-time compiles (test_sae_kernels.py, Triton 3.9): fp32
    tiles at BLOCK_K 64 take 225-257 KiB, too much for an A100 (and the largest for an H100 too), so fp32 launches
    drop them; at 16 bits every config takes 128 KiB or less. (sm_86 and sm_89 have 99 KiB: there the autotuner also
    skips the configs that fail to launch, and at least one fits at every launch: test_every_launch_fits_...)"""
    if named_args["a_ptr"].element_size() < 4:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_K"] < 64]


# The outputs the kernel accumulates into with atomics (STATS): the autotuner runs the kernel once per config and
# several times each while it times a new shape, so it must zero them before every run and before the real one, or
# they come out summed over all those runs (on a GPU: counts thousands of times too large, and the first step's L1
# with them; test_the_autotuners_timing_runs_do_not_add_into_the_counts). The kernel's other output, C, is
# overwritten whole, never accumulated.
ACCUMULATED = ["sums_ptr", "counts_ptr", "fired_ptr"]


@triton.autotune(configs=get_autotune_configs(), key=["M", "N", "K"], reset_to_zero=ACCUMULATED,
                 prune_configs_by={"early_config_prune": configs_that_fit})
@triton.jit
def _sae_matmul_kernel(
        # pointers
        a_ptr, b_ptr, c_ptr, shift_ptr, bias_ptr, d_ptr, row_ptr, col_ptr, f_ptr, sums_ptr, counts_ptr, fired_ptr,
        # sizes
        M, N, K,
        # strides (D and F share C's)
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        # meta
        SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
        RELU: tl.constexpr,
        MASK_F: tl.constexpr, STATS: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # reference: sae_matmul_ref, each flag's step in the same order
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SHIFT == 2:
        shift_m = tl.load(shift_ptr + rm, mask=rm < M, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if SHIFT == 1:  # (x - b_dec) @ W_enc: the pre-encoder bias, subtracted as A is read
            shift_k = tl.load(shift_ptr + kk, mask=kk < K, other=0.0)
            a = tl.where(kk[None, :] < K, a - shift_k[None, :], 0.0).to(a.dtype)
        if SHIFT == 2:  # (x - b_dec)^T @ dpre, A = x^T: the shift runs along A's rows
            a = tl.where(kk[None, :] < K, a.to(tl.float32) - shift_m[:, None], 0.0).to(b.dtype)
        acc += tl.dot(a, b, input_precision=PRECISION)
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_D:
        acc += tl.load(d_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_ROW:  # the L1 term's gradient: the same for every feature of a row, or with HAS_COL the row's times each
        # feature's L1 weight (free decoder norms), an (M, N) block never written to memory
        rank_one = tl.load(row_ptr + rm, mask=rm < M, other=0.0).to(tl.float32)[:, None]
        if HAS_COL:
            rank_one = rank_one * tl.load(col_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        acc += rank_one
    if RELU:
        acc = tl.maximum(acc, 0.0)
    if MASK_F:  # ReLU's backward: pass the gradient where the feature fired
        fired = tl.load(f_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, mask=c_mask, other=0.0)
        acc = tl.where(fired > 0, acc, 0.0)
    if STATS:  # L1 and L0 per row, firings per feature, while the tile is in registers (padding excluded:
        # a padded row reads x = 0, and 0 - b_dec need not encode to 0)
        active = c_mask & (acc > 0)
        tl.atomic_add(sums_ptr + rm, tl.sum(tl.where(c_mask, acc, 0.0), axis=1), mask=rm < M)
        tl.atomic_add(counts_ptr + rm, tl.sum(active.to(tl.int32), axis=1), mask=rm < M)
        tl.atomic_add(fired_ptr + rn, tl.sum(active.to(tl.int32), axis=0), mask=rn < N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def int32_offsets_fit(*tensors):
    """Whether every element of each tensor lies within 2^31 - 1 elements of its start: the kernels compute offsets
    as index x stride in int32, Triton's type for both, which wraps around past that."""
    return all(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) < 2**31 for t in tensors if t.numel())


def _sae_matmul(A, B, shift=None, shift_rows=False, bias=None, D=None, row=None, col=None, relu=False, mask_by=None,
                stats=False, out_dtype=None):
    """Launcher: C = epilogue((A - shift) @ B). A (M, K), B (K, N) any strides, one dtype; shift (K,) or, with
    shift_rows, (M,); bias (N,); row (M,); col (N,), with row only; D and mask_by (M, N) contiguous. -> C (M, N)
    contiguous in out_dtype (A's by default), and with stats also (sums (M,) fp32, counts (M,) int32, fired (N,)
    int32) of C."""
    M, K = A.shape
    K2, N = B.shape
    assert K == K2, f"inner sizes differ: A is {tuple(A.shape)}, B is {tuple(B.shape)}"
    assert A.device == B.device, "A and B on different devices"
    assert A.dtype == B.dtype, f"A is {A.dtype}, B is {B.dtype}: tl.dot multiplies one dtype (cast first)"
    assert col is None or row is not None, "col scales row: pass both"
    for name, t, shape in (("shift", shift, (M,) if shift_rows else (K,)), ("bias", bias, (N,)), ("D", D, (M, N)),
                           ("row", row, (M,)), ("col", col, (N,)), ("mask_by", mask_by, (M, N))):
        assert t is None or tuple(t.shape) == shape, f"{name} has shape {tuple(t.shape)}, expected {shape}"
        assert t is None or t.is_contiguous(), f"{name} must be contiguous (call .contiguous() first)"
    assert M * N < 2**31 and int32_offsets_fit(A, B), \
        f"({M}, {K}) @ ({K}, {N}): an operand or the result has 2^31 elements or more, past the kernel's int32 " \
        f"offsets; use a smaller batch (--micro_batches) or dictionary"
    C = torch.empty(M, N, device=A.device, dtype=out_dtype or A.dtype)
    sums = torch.zeros(M, device=A.device, dtype=torch.float32) if stats else None
    counts = torch.zeros(M, device=A.device, dtype=torch.int32) if stats else None
    fired = torch.zeros(N, device=A.device, dtype=torch.int32) if stats else None
    optional = lambda t: C if t is None else t  # C stands for an absent pointer; never read (its flag is off)
    precision = "ieee" if A.dtype == torch.float32 else "tf32"  # fp32: no TF32 rounding, as the reference
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(N, META["BLOCK_N"]))
    _sae_matmul_kernel[grid](
        A, B, C, optional(shift), optional(bias), optional(D), optional(row), optional(col), optional(mask_by),
        optional(sums), optional(counts), optional(fired),
        M, N, K, A.stride(0), A.stride(1), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        SHIFT=0 if shift is None else (2 if shift_rows else 1), HAS_BIAS=bias is not None, HAS_D=D is not None,
        HAS_ROW=row is not None, HAS_COL=col is not None, RELU=relu, MASK_F=mask_by is not None, STATS=stats,
        PRECISION=precision)
    return (C, sums, counts, fired) if stats else C


# -----------------------------------------------------------------------------
# encode-ReLU-decode
# x (N, d_model) -> f = relu((x - b_dec) @ W_enc + b_enc) (N, n_latents); x_hat = f @ W_dec + b_dec (N, d_model);
# a transcoder reads x (N, d_in) and writes x_hat (N, d_out), W_dec (n_latents, d_out): its input bias b_in (d_in) is
# not b_dec (d_out), and then db_in = -W_enc @ db_enc, db_dec = sum_N dx_hat (below, b_in = b_dec: the two summed);
# and, in the same pass, l1 = f @ scale (N,) (scale (n_latents,) the L1 weight of each latent, the decoder rows'
# norms for an SAE with free norms; all ones when not given: l1 = sum_latents f), l0 = #(f > 0) (N,),
# fired = #_N(f > 0) (n_latents,): the L1 term, the sparsity and the dead-feature counts without reading f again.
# Backward, given dx_hat (N, d_model), dl1 (N,) (the L1 term's gradient: one number per row) and df
# (N, n_latents) (only if the caller's loss reads f itself):
#   dpre = (dx_hat @ W_dec^T + dl1[:, None] * scale[None, :] + df) * (f > 0)        (N, n_latents)
#   dW_dec = f^T @ dx_hat,  dscale = dl1 @ f,  db_enc = sum_N dpre,  dW_enc = (x - b_dec)^T @ dpre
#   db_dec = sum_N dx_hat - (sum_N dpre) @ W_enc^T   reduced over the batch before the multiply: a mat-vec,
#   where autograd computes the full (N, d_model) dx = dpre @ W_enc^T (a sixth matmul) and then sums it.
# Through l1, the L1 term's gradient is a rank-one term, where autograd of (f * scale).sum() would materialise
# (N, n_latents) blocks of f * scale and of its gradient. On the GPU (Triton) the unscaled term is a row vector
# added in the epilogue. On the CPU every reduction rides on a matmul, since a separate, memory-bound pass over an
# (N, n_latents) tensor costs a third to all of a matmul's time once AMX multiplies bf16 at 2.4 TFLOP/s (at 4096 x
# 8192: sign 6 ms, torch's sums 12-19 ms, the encoder's matmul 20 ms): the decoder is held as one matrix
# W_ext = [W_dec | scale] (n_latents, d_model + 1, zero-padded to D columns: padded_width), so that
#   [x_hat | l1] = f @ W_ext (+ [b_dec | 0]),   dpre = ([dx_hat | dl1] @ W_ext^T) * (f > 0) (the mask in oneDNN's
#   epilogue),  [dW_dec^T; dscale] = [dx_hat | dl1]^T @ f,  [dW_enc; db_enc] = [x - b_dec | 1]^T @ dpre,
# each one column or row wider than the plain matmul. The kernels are dense: f is read once by the decoder matmul,
# but inactive rows are not skipped (TODO: a gathered decoder for very sparse f, as openai/sparse_autoencoder
# does for inference).

def encode_relu_decode_ref(x, W_enc, b_enc, W_dec, b_dec, *, scale=None, b_in=None):
    """The SAE forward with a pre-encoder bias (Bricken et al. 2023) -> (x_hat (N, d_out), f (N, n_latents),
    l1 (N,), l0 (N,) int32, fired (n_latents,) int32), l1 weighted by scale (n_latents,) if given.
    b_in: a transcoder's input bias (d_in,), subtracted instead of b_dec (d_out,)."""
    f = torch.relu((x - (b_dec if b_in is None else b_in)) @ W_enc + b_enc)  # (N, d_in) @ (d_in, n_latents)
    x_hat = f @ W_dec + b_dec                     # (N, n_latents) @ (n_latents, d_out) -> (N, d_out)
    active = f > 0
    l1 = f.sum(dim=1) if scale is None else f @ scale  # (N, n_latents) @ (n_latents,)
    return x_hat, f, l1, active.sum(dim=1, dtype=torch.int32), active.sum(dim=0, dtype=torch.int32)


def matmul_dtype(device_type, default=torch.float32):
    """The dtype the SAE's matmuls run in on this device: autocast's where it is on, else default. A custom
    autograd Function's inputs are not cast by autocast (only aten's ops are), so the ops below ask for themselves:
    otherwise the Triton path would multiply the fp32 parameters in fp32 under CUDA autocast (no tensor cores)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


def _encode_relu_decode_fwd_triton(ctx, x, W_enc, b_enc, W_dec, b_dec, scale, shift):
    """Two launches, the bias, ReLU and the three counts fused into the encoder's. -> (x_hat, f, l1, l0, fired)"""
    # the operands cast once to autocast's dtype (bf16 on CUDA by default), the inputs' otherwise; the biases stay
    # fp32, added to the fp32 sums; f and x_hat come out in that dtype, as autocast's would
    dtype = matmul_dtype(x.device.type, torch.promote_types(x.dtype, W_enc.dtype))
    xm, W_enc_m, W_dec_m = x.to(dtype), W_enc.to(dtype), W_dec.to(dtype)
    # (N, d_in) @ (d_in, n_latents) -> f (N, n_latents); f @ W_dec (n_latents, d_out) -> x_hat
    f, l1, l0, fired = _sae_matmul(xm, W_enc_m, shift=shift, bias=b_enc, relu=True, stats=True)
    x_hat = _sae_matmul(f, W_dec_m, bias=b_dec)
    if scale is not None:  # the row sums of f weighted by the L1 weights: a mat-vec
        l1 = (f @ scale.to(dtype)).float()  # (N, n_latents) @ (n_latents,)
    ctx.save_for_backward(xm, W_enc, W_dec_m, shift, f, scale)  # x and W_dec as the matmuls read them
    return x_hat, f, l1, l0, fired


def _encode_relu_decode_bwd_triton(ctx, dx_hat, df, dl1):
    """Three launches, every matmul in the forward's dtype, the parameters' gradients stored in fp32.
    -> the gradients of (W_enc, b_enc, W_dec, b_dec, scale, b_in)"""
    x, W_enc, W_dec, shift, f, scale = ctx.saved_tensors
    N, d = x.shape[0], ctx.d_out
    dx_hat = torch.zeros(N, d, dtype=f.dtype, device=f.device) if dx_hat is None else \
        dx_hat.to(f.dtype).contiguous()
    df = None if df is None else df.contiguous()
    dl1 = None if dl1 is None else dl1.contiguous()
    # (N,) @ (N, n_latents): the L1 weights' gradient
    dscale = None if scale is None or dl1 is None else (dl1.to(f.dtype) @ f).to(scale.dtype)
    col = None if dl1 is None else scale  # the L1 term's gradient dl1[m] scale[n], added in the epilogue
    dpre = _sae_matmul(dx_hat, W_dec.T, D=df, row=dl1, col=col, mask_by=f)  # (N, d_out) @ (d_out, n_latents)
    dW_dec = _sae_matmul(f.T, dx_hat, out_dtype=torch.float32)             # (n_latents, N) @ (N, d_out)
    dW_enc = _sae_matmul(x.T, dpre, shift=shift, shift_rows=True, out_dtype=torch.float32)  # (d_in, N) @ (N, n)
    db_enc = dpre.sum(dim=0, dtype=torch.float32).to(W_enc.dtype)          # (n_latents,)
    return _with_bias_gradients(ctx, W_enc, dx_hat, dW_enc, db_enc, dW_dec, dscale)


def _encode_relu_decode_fwd_cpu(ctx, x, W_enc, b_enc, W_dec, b_dec, scale, shift):
    """Two matmuls through linear, the decoder widened to W_ext = [W_dec | scale | 0] (the header); the counts by
    count_ones. Under CPU autocast the matmuls run in bf16 (f and x_hat come out bf16), and so does the backward.
    -> (x_hat, f, l1, l0, fired)"""
    dtype = ctx.dtype = matmul_dtype("cpu")
    d = ctx.d_out
    W_ext = torch.zeros(W_dec.shape[0], padded_width(d), dtype=dtype)  # [W_dec | scale | 0], cast once
    W_ext[:, :d] = W_dec
    W_ext[:, d] = 1.0 if scale is None else scale
    f = linear(x - shift, W_enc.T, b_enc, "relu")            # (N, d_in) @ (d_in, n_latents), fused
    out = linear(f, W_ext.T, F.pad(b_dec, (0, W_ext.shape[1] - d)))  # (N, n_latents) @ (n_latents, D)
    x_hat, l1 = out[:, :d].contiguous(), out[:, d].float()  # l1 rounded as x_hat is, returned fp32
    active = torch.sign(f)  # the 0/1 mask of the features that fired (f > 0; f is never negative)
    l0, fired = count_ones(active)
    ctx.active = active  # not an input or output: a plain attribute is enough
    ctx.save_for_backward(x, W_enc, W_ext, shift, f, scale)
    return x_hat, f, l1, l0, fired


def _encode_relu_decode_bwd_cpu(ctx, dx_hat, df, dl1):
    """Three matmuls through linear, in the forward's dtype, each one column or row wider (the header).
    -> the gradients of (W_enc, b_enc, W_dec, b_dec, scale, b_in)"""
    x, W_enc, W_ext, shift, f, scale = ctx.saved_tensors
    (N, d_in), d = x.shape, ctx.d_out
    D = W_ext.shape[1]
    g = torch.zeros(N, D, dtype=ctx.dtype)  # [dx_hat | dl1 | 0]
    if dx_hat is not None:
        g[:, :d] = dx_hat
    if dl1 is not None:
        g[:, d] = dl1
    # transposed copies within one dtype: torch's blocked transpose (a cast and a transpose in one copy is
    # a slow strided loop: 25 ms against 1 for W_dec's gradient)
    xc = torch.zeros(padded_width(d_in), N, dtype=ctx.dtype)  # [x - b_in | 1 | 0]^T
    xc[:d_in] = (x - shift).to(ctx.dtype).T
    xc[d_in] = 1.0
    with torch.autocast("cpu", dtype=ctx.dtype, enabled=ctx.dtype != torch.float32):
        if df is None:  # ReLU's backward, the forward's 0/1 floats, multiplied in the matmul's epilogue
            dpre = linear(g, W_ext, mul=ctx.active)  # (N, D) @ (D, n_latents)
        else:
            dpre = linear(g, W_ext).add_(df).mul_(ctx.active)
        # oneDNN copies a transposed input but reads a transposed weight in place: the big (N, n_latents)
        # operands go in as weights, and only (N, D) blocks are transposed
        grad_dec = linear(g.T.contiguous(), f.T)  # (D, N) @ (N, n_latents): [dW_dec^T; dscale; 0]
        grad_enc = linear(xc, dpre.T)             # (D_in, N) @ (N, n_latents): [dW_enc; db_enc; 0]
    # the parameters' dtype, fp32, whatever the matmuls ran in
    dW_dec = grad_dec[:d].T.contiguous().to(W_enc.dtype)
    dscale = None if scale is None else grad_dec[d].to(scale.dtype)
    dW_enc, db_enc = grad_enc[:d_in].to(W_enc.dtype), grad_enc[d_in].to(W_enc.dtype)
    return _with_bias_gradients(ctx, W_enc, dx_hat, dW_enc, db_enc, dW_dec, dscale)


def _with_bias_gradients(ctx, W_enc, dx_hat, dW_enc, db_enc, dW_dec, dscale):
    """Both paths' last step: db_dec = sum_N dx_hat and db_in = -W_enc @ db_enc, the two summed into db_dec when b_dec
    is the input bias too (an SAE). -> the gradients of (W_enc, b_enc, W_dec, b_dec, scale, b_in)"""
    db_dec = W_enc.new_zeros(ctx.d_out) if dx_hat is None else dx_hat.sum(dim=0, dtype=W_enc.dtype)  # (d_out,)
    db_in = -(W_enc @ db_enc)  # (d_in, n_latents) @ (n_latents,): a mat-vec, not a matmul
    db_dec, db_in = (db_dec + db_in, None) if ctx.tied else (db_dec, db_in)
    # W_enc's dtype for both: on the CPU the matmuls' dtype may be bf16
    return dW_enc.to(W_enc.dtype), db_enc, dW_dec.to(W_enc.dtype), db_dec, dscale, db_in


class EncodeReluDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, scale, b_in, path):
        shift = b_dec if b_in is None else b_in  # the input bias: an SAE's b_dec, a transcoder's own
        ctx.path, ctx.d_out, ctx.tied = path, W_dec.shape[1], b_in is None
        forward = _encode_relu_decode_fwd_triton if path == "triton" else _encode_relu_decode_fwd_cpu
        x_hat, f, l1, l0, fired = forward(ctx, x, W_enc, b_enc, W_dec, b_dec, scale, shift)
        ctx.mark_non_differentiable(l0, fired)
        ctx.set_materialize_grads(False)  # an output the loss does not read gets None, not an (N, n_latents) zero block
        return x_hat, f, l1, l0, fired

    @staticmethod
    def backward(ctx, dx_hat, df, dl1, _dl0, _dfired):
        backward = _encode_relu_decode_bwd_triton if ctx.path == "triton" else _encode_relu_decode_bwd_cpu
        return None, *backward(ctx, dx_hat, df, dl1), None  # x and path get no gradient


@torch.compiler.disable  # see COMPILE
def encode_relu_decode(x, W_enc, b_enc, W_dec, b_dec, *, scale=None, b_in=None):
    """-> (x_hat, f, l1, l0, fired), as encode_relu_decode_ref; see the section's header. The statistics come with
    every call: the kernels form them in the same pass. x needs no gradient; l1 (weighted by scale (n_latents,) if
    given, which may need a gradient) carries the gradient of a loss on it. b_in: a transcoder's input bias (d_in,);
    None: b_dec is the input bias too (an SAE)."""
    # the kernels multiply fp32, bf16 and fp16 only (an fp64 tl.dot does not accumulate in the kernel's fp32):
    # float64, for exact checks, takes the reference on any device
    path = "reference" if torch.float64 in (x.dtype, W_enc.dtype) else pick_path(x)
    if path == "reference":
        return encode_relu_decode_ref(x, W_enc, b_enc, W_dec, b_dec, scale=scale, b_in=b_in)
    return EncodeReluDecode.apply(x, W_enc, b_enc, W_dec, b_dec, scale, b_in, path)


# -----------------------------------------------------------------------------
# sparse codes
# The k-sparse SAEs' code f (N, n_latents), held padded: indices (N, K) int64 and values (N, K); a padding entry
# has value 0 (and any valid index), and indices within a row are otherwise distinct. The caller computes pre
# densely without autograd and selects (TopK, BatchTopK, Matryoshka); these ops carry the gradients:
#   sparse_decode: x_hat[n] = sum_j values[n, j] W_dec[indices[n, j]] (+ b_dec)                      (N, d_model)
#     dvalues[n, j] = dx_hat[n] . W_dec[indices[n, j]]                                    (N, K)       gather-dot
#     dW_dec[i] = sum_{(n, j): indices[n, j] = i} values[n, j] dx_hat[n] = (f^T @ dx_hat)[i]  (n_latents, d_model)
#     db_dec = sum_N dx_hat
#   sparse_encode: values[n, j] = (x[n] - b_dec) . W_enc[:, indices[n, j]] + b_enc[indices[n, j]]  (N, K),
#   gathered from pre when given; x gets no gradient; padding entries get whatever dvalues says (the caller zeroes
#   them by multiplying by its keep mask, so their dvalues are 0)
#     dW_enc^T = dF^T @ (x - b_dec), dF the code of dvalues: the same scatter as dW_dec      (n_latents, d_model)
#     db_enc = sum_{(n, j): indices[n, j] = i} dvalues[n, j];  db_dec = -W_enc @ db_enc (a mat-vec)
# Three primitives serve both ops: gather-sum, gather-dot, and the scatter f^T @ A, which sorts the entries by
# latent (openai/sparse_autoencoder's triton_sparse_transpose_dense_matmul sorts the same way) and sums each
# latent's segment, with no atomics. Nothing (N, n_latents) or (N, K, d_model) is formed on either path.
# Each primitive has its reference (gather_sum_ref, gather_dot_ref, scatter_outer_ref), its launcher
# (_gather_sum_triton, ...) and its CPU code (_gather_sum_cpu, ...).
# CPU, the medians of two runs of bench.bench_sparse_codes on an idle 2-core AMD EPYC, at N 4096, K 32, d_model 768,
# n_latents 8192 / 32768, in ms:
#   gather-sum: embedding_bag 6-8 / 15-16; CSR sparse.mm 20-21 / 37-45; gather + bmm in 256-row chunks 64-76 / 69-88
#   gather-dot: sampled_addmm 12-15 / 22-23; gather + bmm in 256-row chunks 109-141 / 136-149
#   scatter:    sort + embedding_bag 14-15 / 19-22; sort + CSR sparse.mm 18-19 / 25-29; index_add_ in 256-row
#               chunks 33-49 / 58-70; COO sparse.mm 29-41 / 54-88
#   whole ops, fwd+bwd: decode 32-58 / 56-64 (dense reference 809-996 / 3853-4070); encode, gathered from pre,
#   18-20 / 27-28 (reference 838-1067 / 3488-3676); one dense (4096, 768) @ (768, n_latents) matmul 266-276 / 968-1493.

def sparse_decode_ref(indices, values, W_dec, b_dec=None):
    """The code scattered into a dense f (N, n_latents) (scatter_add: padding adds 0), then f @ W_dec + b_dec."""
    f = torch.zeros(indices.shape[0], W_dec.shape[0], dtype=values.dtype, device=values.device)
    f = f.scatter_add(1, indices, values)  # (N, n_latents)
    x_hat = f @ W_dec                      # (N, n_latents) @ (n_latents, d_model) -> (N, d_model)
    return x_hat if b_dec is None else x_hat + b_dec


def sparse_encode_ref(x, W_enc, b_enc, b_dec, indices):
    """The dense pre-activations, gathered at indices: ((x - b_dec) @ W_enc + b_enc)[n, indices[n, j]] (N, K)."""
    pre = (x - b_dec) @ W_enc + b_enc  # (N, d_model) @ (d_model, n_latents) -> (N, n_latents)
    return pre.gather(1, indices)


def gather_sum_ref(indices, values, W):
    """out[n] = sum_j values[n, j] W[indices[n, j]]: the code scattered into a dense f (N, n_latents) (padding adds
    0), times W. (N, K), (N, K), (n_latents, d) -> (N, d)"""
    f = torch.zeros(indices.shape[0], W.shape[0], dtype=W.dtype, device=W.device)
    f = f.scatter_add(1, indices, values.to(W.dtype))  # (N, n_latents)
    return f @ W                                       # (N, n_latents) @ (n_latents, d) -> (N, d)


def gather_dot_ref(A, W, indices):
    """out[n, j] = A[n] . W[indices[n, j]]: the dense A @ W^T, gathered. (N, d), (n_latents, d), (N, K) -> (N, K)"""
    return (A @ W.T.to(A.dtype)).gather(1, indices)  # (N, d) @ (d, n_latents) -> (N, n_latents) -> (N, K)


def scatter_outer_ref(indices, weights, A, n_latents):
    """out[i] = sum_{(n, j): indices[n, j] = i} weights[n, j] A[n]: f^T @ A for the dense code f of weights (repeated
    indices summed). (N, K), (N, K), (N, d) -> (n_latents, d) fp32"""
    f = torch.zeros(indices.shape[0], n_latents, dtype=A.dtype, device=A.device)
    f = f.scatter_add(1, indices, weights.to(A.dtype))  # (N, n_latents)
    return (f.T @ A).float()                            # (n_latents, N) @ (N, d) -> (n_latents, d)


@triton.jit
def _gather_sum_kernel(
        # pointers: indices (N, K), values (N, K), W (n_latents, d), out (N, d)
        idx_ptr, val_ptr, w_ptr, out_ptr,
        # sizes
        K, d,
        # strides
        stride_in, stride_ik, stride_vn, stride_vk, stride_wm, stride_wd, stride_on, stride_od,
        # meta
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # reference: gather_sum_ref (sparse_decode's forward less b_dec).
    # One row n, one block of d: out[n] = sum_j v_j W[i_j]
    n, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        i = tl.load(idx_ptr + n * stride_in + kk * stride_ik, mask=kk < K, other=0)
        v = tl.load(val_ptr + n * stride_vn + kk * stride_vk, mask=kk < K, other=0.0).to(tl.float32)
        live = (kk < K) & (v != 0)  # padding and masked-out entries: no row read
        w = tl.load(w_ptr + i[:, None] * stride_wm + rd[None, :] * stride_wd, mask=live[:, None] & (rd[None, :] < d),
                    other=0.0)  # (BLOCK_K, BLOCK_D): K gathered rows
        acc += tl.sum(v[:, None] * w.to(tl.float32), axis=0)
    tl.store(out_ptr + n * stride_on + rd * stride_od, acc.to(out_ptr.dtype.element_ty), mask=rd < d)


@triton.jit
def _gather_dot_kernel(
        # pointers: A (N, d), W (n_latents, d), indices (N, K), out (N, K)
        a_ptr, w_ptr, idx_ptr, out_ptr,
        # sizes
        K, d,
        # strides
        stride_an, stride_ad, stride_wm, stride_wd, stride_in, stride_ik, stride_on, stride_ok,
        # meta
        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # reference: gather_dot_ref (A = dx_hat: sparse_decode's dvalues; A = x - b_dec, W = W_enc^T: sparse_encode's
    # forward less b_enc). One row n, one block of K: out[n, j] = A[n] . W[i_j]
    n, pid_k = tl.program_id(0).to(tl.int64), tl.program_id(1)
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    i = tl.load(idx_ptr + n * stride_in + kk * stride_ik, mask=kk < K, other=0)
    rd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dd = d0 + rd
        a = tl.load(a_ptr + n * stride_an + dd * stride_ad, mask=dd < d, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + i[:, None] * stride_wm + dd[None, :] * stride_wd,
                    mask=(kk[:, None] < K) & (dd[None, :] < d), other=0.0)  # (BLOCK_K, BLOCK_D)
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    tl.store(out_ptr + n * stride_on + kk * stride_ok, acc.to(out_ptr.dtype.element_ty), mask=kk < K)


@triton.jit
def _scatter_outer_kernel(
        # pointers: rows (E,), weights (E,), offsets (n_latents + 1,) from _sort_by_index; A (N, d); out (n_latents, d)
        rows_ptr, w_ptr, off_ptr, a_ptr, out_ptr,
        # sizes
        d,
        # strides (out is contiguous)
        stride_an, stride_ad,
        # meta
        BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    # reference: scatter_outer_ref (sparse_decode's dW_dec, sparse_encode's dW_enc^T). Following
    # openai/sparse_autoencoder's triton_sparse_transpose_dense_matmul_kernel (entries sorted by latent), but one
    # program owns a latent's whole segment and a block of d, so it sums in registers and stores once: no atomics,
    # the same sums every run.
    i, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    start, end = tl.load(off_ptr + i), tl.load(off_ptr + i + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):  # a latent chosen by many rows: a longer loop, in one program
        ee = e0 + tl.arange(0, BLOCK_E)
        r = tl.load(rows_ptr + ee, mask=ee < end, other=0)
        w = tl.load(w_ptr + ee, mask=ee < end, other=0.0).to(tl.float32)
        live = (ee < end) & (w != 0)
        a = tl.load(a_ptr + r[:, None] * stride_an + rd[None, :] * stride_ad, mask=live[:, None] & (rd[None, :] < d),
                    other=0.0)  # (BLOCK_E, BLOCK_D): the rows of A that chose latent i
        acc += tl.sum(w[:, None] * a.to(tl.float32), axis=0)
    tl.store(out_ptr + i * d + rd, acc, mask=rd < d)  # every latent's row written, empty segments as 0


def _check_code(indices, values=None):
    assert indices.dim() == 2 and indices.dtype == torch.int64, \
        f"indices must be (N, K) int64, got {tuple(indices.shape)} {indices.dtype} (topk's indices are int64)"
    assert values is None or values.shape == indices.shape, \
        f"values {tuple(values.shape)} != indices {tuple(indices.shape)}"


def _sort_by_index(indices, weights, n_latents):
    """The code's entries grouped by latent (f^T in CSR): rows (N K,) the row of each entry, weights (N K,), and
    offsets (n_latents + 1,), latent i's entries lying at offsets[i]:offsets[i + 1]. A stable sort: fixed sums."""
    keys = indices.reshape(-1)
    if keys.is_cuda:
        order = torch.sort(keys, stable=True).indices  # (N K,)
    else:  # numpy's one-thread sort: torch's CPU sort of integers is an OpenMP radix sort (fbgemm) whose barriers
        # stall while another process holds a core. 131072 keys, 2 cores here: torch 1.6 ms idle but 180 ms busy;
        # numpy 8.5 ms busy
        order = torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
    offsets = torch.zeros(n_latents + 1, dtype=torch.int64, device=indices.device)
    # each latent's end: how many sorted keys are <= it (bincount's cumsum, but bincount reads the largest key
    # back to size its output, a wait for the GPU)
    offsets[1:] = torch.searchsorted(keys[order], torch.arange(n_latents, device=keys.device), right=True)
    return order // indices.shape[1], weights.reshape(-1)[order], offsets


def _gather_sum_triton(indices, values, W):
    """Launcher: gather_sum_ref's out (N, d) in W's dtype."""
    _check_code(indices, values)
    N, K = indices.shape
    d = W.shape[1]
    out = torch.empty(N, d, device=W.device, dtype=W.dtype)
    BLOCK_K, BLOCK_D = (8, 32) if INTERPRET else (min(32, triton.next_power_of_2(K)), 128)
    grid = (N, triton.cdiv(d, BLOCK_D))
    _gather_sum_kernel[grid](indices, values, W, out, K, d, *indices.stride(), *values.stride(), *W.stride(),
                             *out.stride(), BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return out


def _gather_dot_triton(A, W, indices):
    """Launcher: gather_dot_ref's out (N, K) in A's dtype."""
    _check_code(indices)
    assert A.shape[1] == W.shape[1], f"A {tuple(A.shape)} and W {tuple(W.shape)} differ in d"
    N, K = indices.shape
    W = W if W.stride(1) == 1 else W.contiguous()  # W_enc^T: one pass, so that each gathered row is contiguous
    out = torch.empty(N, K, device=A.device, dtype=A.dtype)
    BLOCK_K, BLOCK_D = (8, 32) if INTERPRET else (min(32, triton.next_power_of_2(K)), 128)
    grid = (N, triton.cdiv(K, BLOCK_K))
    _gather_dot_kernel[grid](A, W, indices, out, K, A.shape[1], *A.stride(), *W.stride(), *indices.stride(),
                             *out.stride(), BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D)
    return out


def _scatter_outer_triton(indices, weights, A, n_latents):
    """Launcher: scatter_outer_ref's out (n_latents, d) fp32."""
    _check_code(indices, weights)
    rows, w, offsets = _sort_by_index(indices, weights, n_latents)
    d = A.shape[1]
    out = torch.empty(n_latents, d, device=A.device, dtype=torch.float32)
    BLOCK_E, BLOCK_D = (8, 32) if INTERPRET else (16, 128)
    grid = (n_latents, triton.cdiv(d, BLOCK_D))
    _scatter_outer_kernel[grid](rows, w.contiguous(), offsets, A, out, d, *A.stride(), BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D)
    return out


def _gather_sum_cpu(indices, values, W):
    """gather_sum_ref's out (N, d) in W's dtype, by embedding_bag: bags of K rows weighted by values, summed (see the
    header's timings)."""
    _check_code(indices, values)
    return F.embedding_bag(indices, W, per_sample_weights=values.to(W.dtype), mode="sum")


def _gather_dot_cpu(A, W, indices):
    """gather_dot_ref's out (N, K) in A's dtype, by sampled_addmm: A @ W^T at the code's positions only, a CSR matrix
    with K entries a row."""
    _check_code(indices)
    assert A.shape[1] == W.shape[1], f"A {tuple(A.shape)} and W {tuple(W.shape)} differ in d"
    N, K = indices.shape
    W = W if W.stride(1) == 1 else W.contiguous()  # W_enc^T: one pass, so that each gathered row is contiguous
    # sampled_addmm's CPU kernel computes each entry on its own, so columns need not be sorted and padding may
    # repeat one: outside the CSR invariants (hence check_invariants=False); test_sae_kernels.py's sparse-code
    # padding cases check it
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        pattern = torch.sparse_csr_tensor(torch.arange(0, N * K + 1, K, device=A.device), indices.reshape(-1),
                                          torch.zeros(N * K, dtype=A.dtype, device=A.device), (N, W.shape[0]),
                                          check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, A, W.T.to(A.dtype), beta=0.0).values().view(N, K)


def _scatter_outer_cpu(indices, weights, A, n_latents):
    """scatter_outer_ref's out (n_latents, d) fp32, by embedding_bag again, now one bag per latent: its segment of
    A's rows (_sort_by_index), weighted."""
    _check_code(indices, weights)
    rows, w, offsets = _sort_by_index(indices, weights, n_latents)
    return F.embedding_bag(rows, A, offsets[:-1], per_sample_weights=w.to(A.dtype), mode="sum").float()


class SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, values, W_dec, b_dec, path):
        gather_sum = _gather_sum_triton if path == "triton" else _gather_sum_cpu
        x_hat = gather_sum(indices, values, W_dec)  # (N, K) rows of (n_latents, d_model) -> (N, d_model)
        if b_dec is not None:
            x_hat += b_dec
        ctx.path = path
        ctx.save_for_backward(indices, values, W_dec)
        return x_hat

    @staticmethod
    def backward(ctx, dx_hat):
        indices, values, W_dec = ctx.saved_tensors
        gather_dot = _gather_dot_triton if ctx.path == "triton" else _gather_dot_cpu
        scatter_outer = _scatter_outer_triton if ctx.path == "triton" else _scatter_outer_cpu
        dx_hat = dx_hat.contiguous()
        _, need_values, need_W_dec, need_b_dec, _ = ctx.needs_input_grad
        dvalues = gather_dot(dx_hat, W_dec, indices).to(values.dtype) if need_values else None  # (N, K)
        dW_dec = scatter_outer(indices, values, dx_hat, W_dec.shape[0]).to(W_dec.dtype) if need_W_dec else None
        db_dec = dx_hat.sum(dim=0) if need_b_dec else None                                         # (d_model,)
        return None, dvalues, dW_dec, db_dec, None


@torch.compiler.disable  # see COMPILE
def sparse_decode(indices, values, W_dec, b_dec=None):
    """x_hat (N, d_model) = sum_j values[n, j] W_dec[indices[n, j]] (+ b_dec); see the section's header."""
    path = pick_path(W_dec)
    if path == "reference":
        return sparse_decode_ref(indices, values, W_dec, b_dec)
    return SparseDecode.apply(indices, values, W_dec, b_dec, path)


class SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, indices, pre, path):
        if pre is not None:  # the caller's dense pre-activations (N, n_latents): gathered, not recomputed
            values = pre.gather(1, indices)
        else:  # (N, d_model) . K gathered columns of W_enc (rows of W_enc^T)
            gather_dot = _gather_dot_triton if path == "triton" else _gather_dot_cpu
            values = gather_dot(x - b_dec, W_enc.T, indices) + b_enc[indices]
        ctx.path = path
        ctx.save_for_backward(x, W_enc, b_dec, indices)
        return values  # (N, K)

    @staticmethod
    def backward(ctx, dvalues):
        x, W_enc, b_dec, indices = ctx.saved_tensors
        scatter_outer = _scatter_outer_triton if ctx.path == "triton" else _scatter_outer_cpu
        n_latents = W_enc.shape[1]
        dvalues = dvalues.contiguous()
        _, need_W_enc, need_b_enc, need_b_dec, _, _, _ = ctx.needs_input_grad
        dW_enc = db_enc = db_dec = None
        if need_W_enc:  # (n_latents, d_model), returned as its transpose: AccumulateGrad copies it to W_enc's layout
            dW_enc = scatter_outer(indices, dvalues, x - b_dec, n_latents).to(W_enc.dtype).T
        if need_b_enc or need_b_dec:
            db_enc = torch.zeros(n_latents, dtype=torch.float32, device=x.device)
            db_enc = db_enc.index_add_(0, indices.reshape(-1), dvalues.reshape(-1).float()).to(W_enc.dtype)
        if need_b_dec:
            db_dec = -(W_enc @ db_enc)  # (d_model, n_latents) @ (n_latents,): the batch summed first
        return None, dW_enc, db_enc, db_dec, None, None, None


@torch.compiler.disable  # see COMPILE
def sparse_encode(x, W_enc, b_enc, b_dec, indices, pre=None):
    """values (N, K) = (x - b_dec) @ W_enc[:, indices] + b_enc[indices], the pre-activations at the selected
    latents; gathered from pre (N, n_latents, no gradient) when given. x gets no gradient."""
    path = pick_path(W_enc)
    if path == "reference":
        return sparse_encode_ref(x, W_enc, b_enc, b_dec, indices)
    return SparseEncode.apply(x, W_enc, b_enc, b_dec, indices, pre, path)


# -----------------------------------------------------------------------------
# JL penalty: a mean over pairs of rows of a function of their |cos|, in one of three forms (JL_FORMS)
# W (n, d) with unit-norm rows, G = W @ W.T (n, n), g = |G_ij| -> mean over i != j of phi(g):
#   atanh (the default): phi(g) = atanh(min(g, 1 - JL_EPS)), phi'(g) = 1 / (1 - min(g, 1 - JL_EPS)^2), the slope at
#     the clamped point (never 0). With n >> d it acts like an L1 penalty on G: 8 stacked copies of an orthonormal
#     basis score lower than random rows, and Adam collapses rows onto each other
#     (test_jl_mean_rewards_clusters_of_duplicates_when_rows_outnumber_dimensions).
#   power: phi(g) = g^p, phi'(g) = p g^(p-1), p >= 1: the p-frame potential (Ehler and Okoudjou 2012, "Minimization
#     of the probabilistic p-frame potential", J. Stat. Planning and Inference 142). p = 2 is the frame potential
#     (Benedetto and Fickus 2003, "Finite normalized tight frames", Adv. Comput. Math. 18), minimised by every tight
#     frame, the stacked bases included; below 2 an orthonormal basis's duplicates do best, above 2 spread rows do
#     (at n = 8 d, d = 576: p = 1 charges the copies 22x less than random rows, p = 4 168x more).
#   welch: phi(g) = relu(g - mu)^2, phi'(g) = 2 relu(g - mu), mu = margin if > 0, else coherence_bound(n, d), a
#     lower bound on the largest |cos| of n unit vectors in R^d: the Welch bound sqrt((n - d) / (d (n - 1))) (0 for
#     n <= d; Welch 1974, "Lower bounds on the maximum cross correlation of signals", IEEE Trans. Inf. Theory 20) up
#     to n = d (d + 1) / 2 (the Gerzon bound: no more real equiangular lines exist, so past it no dictionary meets
#     Welch's), and past it the Levenshtein bound sqrt((3n - d^2 - 2d) / ((d + 2)(n - d))) (Levenshtein 1982, "Bounds
#     on the maximal cardinality of a code with bounded modulus of the inner product", Soviet Math. Dokl. 25; equal
#     to Welch's, 1/sqrt(d + 2), at the switch). Zero only for an equiangular tight frame, blind to pairs below mu.
#     Why not Welch's past the Gerzon bound: a frame's mean G^2 is at least Welch's mu^2 (the frame potential), so
#     the pairs cannot all sit under it, and the mean of hinges pays less for a few duplicate pairs ((1 - mu)^2 each)
#     than for the many just above mu: Adam on welch alone, from random or from spread rows, pairs rows into
#     duplicates at every n past d (d + 1) / 2 measured (d 16: 180, 256; d 32: 700, 1024) and at none below (d 16:
#     64, 100, 136; d 32: 256, 400, 528); at Levenshtein's margin none of those formed a pair above 0.9
#     (test_welch_keeps_rows_apart_at_its_default_margin).
# Gradient: 2 S W / (n (n - 1)), S_ij = sign(G_ij) phi'(|G_ij|) off the diagonal, S_ii = 0. sign(0) = 0, so a pair
# with G_ij = 0 exactly has no slope in any form (power at p = 1, whose phi' is 1 elsewhere, included).
# The Triton kernel and the blocked CPU path compute value and gradient together, tile by tile, on and
# above the diagonal only (G is symmetric), accumulating in fp32; the backward scales the saved gradient.
# Precision (the Triton kernel: tensor cores; the CPU path is fp32 throughout). u = 2^-8, bf16's unit roundoff.
# - G from the bf16 split W = hi + lo (+ r, |r| <= u^2 |W|): G = hi_i lo_j + lo_i hi_j + hi_i hi_j, three bf16 MMAs,
#   each product exact, sums in fp32 (bf16x3: Henry, Tang and Heinecke 2019, "Leveraging the bfloat16 Artificial
#   Intelligence Datatype For Higher-Precision Computations", ARITH 26; Triton's input_precision="bf16x3" does the
#   same for fp32 operands, here spelled out so that the interpreter runs it too). For unit rows
#   |G~ - G| <= 3u^2 + d 2^-24 (4.6e-5 + 4.6e-5 at d = 768), near fp32's own worst case (d 2^-24); measured: the
#   value within 7e-6 of float64, as fp32's.
#   One bf16 pass would be off by up to 2u = 2^-7, and the forms whose slope jumps or is steep cannot take that:
#   atanh's slope flips sign across G = 0 and is 1 / (1 - g^2) near 1 (at g = 0.99 an error of 2^-7 moves it by
#   78%), power at p = 1 flips too, and welch's hinge moves pairs near mu in and out; measured on pairs at |cos|
#   0.9 to 0.9999, atanh's gradient off by 1.2 M (M below), p = 1's by 0.07 M, welch's at margin 0.3 by 0.1 M,
#   where the split keeps every form within 0.006 M (test_the_gram_needs_the_bf16_split_where_slopes_jump).
#   p >= 2 and welch at the Welch bound would pass with one pass; one path for every form costs 3 MMAs where
#   1 would do on a third of the flops.
# - The slopes phi'(G~) in fp32, rounded to bf16 (relative u); the gradient S~ @ hi in one bf16 MMA: each term
#   S_ij W_jk within 2u + u^2 of its value, so each gradient entry within (2u + u^2) M_ik of float64's, M = 2 /
#   (n (n - 1)) |S| @ |W| the sum of its terms' magnitudes (the stated bound; measured <= 0.006 M; the terms of
#   mixed sign, the whole gradient within about 3e-3 of float64's in norm). Beside it, a term fp32 has too: the
#   slope moved by G's own rounding, |phi''| |G~ - G|, which counts only for atanh just under its clamp (1 - g^2
#   near 2e-4: a relative 2 |G~ - G| / (1 - g^2), 1e-3 at an error of 1e-7; fp32's kernel is as far off there).
# - The interpreter runs the same roundings (split by torch, products widened exactly: _mma_bf16); its fp32 -> bf16
#   cast truncates where a GPU rounds to nearest, which the tests patch (round_bf16_casts in test_sae_kernels.py).

JL_EPS = 1e-4  # atanh(1 - 1e-4) = 4.95 and its slope 1/(1 - g^2) = 5e3: finite for (near-)duplicate rows
JL_FORMS = ("atanh", "power", "welch")


def welch_bound(n, d):
    """sqrt((n - d) / (d (n - 1))), a lower bound on the largest |cos| of n unit vectors in R^d (Welch 1974), met by
    equiangular tight frames only; 0 for n <= d."""
    return ((n - d) / (d * (n - 1))) ** 0.5 if n > d else 0.0


def coherence_bound(n, d):
    """The welch form's default margin: the Welch bound up to n = d (d + 1) / 2 rows, the Levenshtein bound
    sqrt((3n - d^2 - 2d) / ((d + 2)(n - d))) past it (see the section's comment)."""
    if n <= d * (d + 1) // 2:
        return welch_bound(n, d)
    return ((3 * n - d * d - 2 * d) / ((d + 2) * (n - d))) ** 0.5


def check_jl_form(form, power, margin):
    """A form's settings, as one-line ValueErrors (they come from the command line)."""
    if form not in JL_FORMS:
        raise ValueError(f"JL form {form!r}: valid values are {', '.join(JL_FORMS)}")
    if not power >= 1:  # also catches NaN
        raise ValueError(f"JL power {power!r}: valid values are >= 1 (|cos|^p with p < 1 has an infinite slope at 0)")
    if not 0 <= margin < 1:
        raise ValueError(f"JL margin {margin!r}: valid values are 0 (coherence_bound: the Welch or Levenshtein bound) "
                         f"or a |cos| in (0, 1)")


def jl_margin(form, power, margin, n, d):
    """Checks a form's settings (check_jl_form) -> mu, the welch form's margin for n rows in d dimensions."""
    check_jl_form(form, power, margin)
    return float(margin) if margin > 0 else coherence_bound(n, d)


def jl_pairs_ref(G, form="atanh", power=4.0, mu=0.0):
    """phi(|G|) elementwise, through torch ops (autograd gives the slopes): the pair function of each form."""
    g = G.abs()
    if form == "atanh":
        g = g - (g - g.clamp(max=1 - JL_EPS)).detach()  # value clamped, gradient taken at the clamped point
        return torch.atanh(g)
    if form == "power":
        return g.pow(power)  # autograd: p g^(p-1) sign(G), 0 at G = 0 for every p >= 1 (abs's slope there is 0)
    return torch.relu(g - mu).square()


def jl_penalty_ref(W, form="atanh", power=4.0, margin=0.0):
    """Dense reference: materialises G (n, n), in fp32 or wider -> the mean over i != j of phi(|G_ij|). atanh clamps
    |G| at 1 - JL_EPS; its gradient is atanh's slope at the clamped value, sign(G)/(1 - min(|G|, 1-eps)^2), never 0,
    so duplicate rows are still pushed apart. The gradient w.r.t. W is 2 S W / (n (n - 1)), S_ij = that slope."""
    n = W.shape[0]
    mu = jl_margin(form, power, margin, n, W.shape[1])
    W = W.to(torch.promote_types(W.dtype, torch.float32))  # fp32 at least: bf16 rounds a cos of 0.998 to 1
    G = W @ W.T  # (n, d) @ (d, n) -> (n, n)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=W.device)
    return jl_pairs_ref(G, form, power, mu)[off_diagonal].sum() / (n * (n - 1))


def get_jl_configs():
    if INTERPRET:  # the interpreter runs every program in numpy: one small config
        return [triton.Config({"BLOCK": 32, "BLOCK_K": 32}, num_warps=4)]
    # bf16 tiles: the largest takes 64 KiB of shared memory, within every target's (the ahead-of-time compiles)
    return [triton.Config({"BLOCK": b, "BLOCK_K": k}, num_stages=s, num_warps=w)
            for b, k, s, w in [(64, 32, 3, 4), (64, 64, 3, 4), (128, 32, 3, 8), (128, 64, 2, 8)]]


@triton.jit
def _mma_bf16(a, b, WIDEN: tl.constexpr):
    """a @ b for bf16 tiles as a tensor core multiplies them: each product exact (8-bit by 8-bit significands fit
    fp32's 24), summed in fp32. WIDEN (the interpreter): Triton 3.9's interpreter multiplies bf16 operands as the
    integers that store them (test_interpreter_multiplies_bf16_as_integers), so they are widened to fp32 first,
    exactly, and multiplied in fp32: the same products. Reference: a.float() @ b.float()."""
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


# The JL penalty's tensor-core version. The Gram tile from the split W = hi + lo (both bf16, from the launcher):
# G = hi_i lo_j^T + lo_i hi_j^T + hi_i hi_j^T, three bf16 MMAs; the slopes S rounded to bf16 and multiplied by hi.
@triton.autotune(configs=get_jl_configs(), key=["n", "d"], reset_to_zero=["grad_ptr", "value_ptr"])
@triton.jit
def _jl_fwd_bwd_kernel(
        # pointers: hi, lo (n, d) bf16, contiguous, W = hi + lo; grad (n, d) fp32 zeroed; value (1,) fp32 zeroed
        hi_ptr, lo_ptr, grad_ptr, value_ptr,
        # sizes
        n, d, inv_pairs, clamp,
        # the forms' parameters: p (power), mu (welch)
        power, mu,
        # meta: FORM one of JL_FORMS; WIDEN under the interpreter (_mma_bf16)
        FORM: tl.constexpr, WIDEN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    # reference: jl_penalty_ref, its value and its autograd gradient 2 S W / (n (n - 1)); its roundings (the header's
    # "Precision") emulated in float64 by test_sae_kernels.py's tensor_core_emulation
    pid_i, pid_j = tl.program_id(0), tl.program_id(1)
    if pid_j < pid_i:  # G is symmetric: tiles on and above the diagonal only
        return
    ri = pid_i * BLOCK + tl.arange(0, BLOCK)
    rj = pid_j * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    G = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):  # G tile = W_I @ W_J^T, the small terms first
        kk = k0 + rk
        mi = (ri[:, None] < n) & (kk[None, :] < d)
        mj = (rj[:, None] < n) & (kk[None, :] < d)
        hi_i = tl.load(hi_ptr + ri[:, None] * d + kk[None, :], mask=mi, other=0.0)
        lo_i = tl.load(lo_ptr + ri[:, None] * d + kk[None, :], mask=mi, other=0.0)
        hi_j = tl.load(hi_ptr + rj[:, None] * d + kk[None, :], mask=mj, other=0.0)
        lo_j = tl.load(lo_ptr + rj[:, None] * d + kk[None, :], mask=mj, other=0.0)
        G += _mma_bf16(hi_i, tl.trans(lo_j), WIDEN) + _mma_bf16(lo_i, tl.trans(hi_j), WIDEN)
        G += _mma_bf16(hi_i, tl.trans(hi_j), WIDEN)  # (BLOCK, BLOCK_K) @ (BLOCK_K, BLOCK)
    valid = (ri[:, None] < n) & (rj[None, :] < n) & (ri[:, None] != rj[None, :])  # no padding, no diagonal
    # each form's phi(g), the pairs' values (BLOCK, BLOCK), as in jl_pairs_ref (FORM is a constexpr: one branch compiles)
    if FORM == "atanh":
        g = tl.minimum(tl.abs(G), clamp)
        phi = 0.5 * tl.log((1.0 + g) / (1.0 - g))
    elif FORM == "power":
        g = tl.abs(G)
        # g^p = 2^(p log2 g); log2 of 1 on the zeros, where 0 * -inf would be NaN at p = 1, then phi = 0 there
        log_g = tl.log2(tl.where(g > 0, g, 1.0))
        phi = tl.where(g > 0, tl.exp2(power * log_g), 0.0)
    else:  # "welch"
        excess = tl.maximum(tl.abs(G) - mu, 0.0)
        phi = excess * excess
    # an off-diagonal tile stands for itself and its mirror image below the diagonal
    weight = tl.where(pid_i == pid_j, 1.0, 2.0)
    tl.atomic_add(value_ptr, weight * inv_pairs * tl.sum(tl.where(valid, phi, 0.0)))
    # the slopes S = sign(G) phi'(g)
    sign = tl.where(G > 0, 1.0, tl.where(G < 0, -1.0, 0.0))
    if FORM == "atanh":
        S = sign / (1.0 - g * g)
    elif FORM == "power":
        S = sign * power * tl.exp2((power - 1.0) * log_g)  # at G = 0 sign is 0: no slope, whatever p
    else:
        S = sign * 2.0 * excess
    S = (tl.where(valid, S, 0.0) * (2.0 * inv_pairs)).to(tl.bfloat16)  # (BLOCK, BLOCK), rounded to nearest
    for k0 in range(0, d, BLOCK_K):  # grad_I += S W_J, and the mirror tile's grad_J += S^T W_I
        kk = k0 + rk
        mi = (ri[:, None] < n) & (kk[None, :] < d)
        mj = (rj[:, None] < n) & (kk[None, :] < d)
        hi_j = tl.load(hi_ptr + rj[:, None] * d + kk[None, :], mask=mj, other=0.0)
        tl.atomic_add(grad_ptr + ri[:, None] * d + kk[None, :], _mma_bf16(S, hi_j, WIDEN), mask=mi)
        if pid_i != pid_j:
            hi_i = tl.load(hi_ptr + ri[:, None] * d + kk[None, :], mask=mi, other=0.0)
            tl.atomic_add(grad_ptr + rj[:, None] * d + kk[None, :], _mma_bf16(tl.trans(S), hi_i, WIDEN), mask=mj)


def split_bf16(W):
    """W (fp32) -> (hi, lo), both bf16 (rounded to nearest even, as the GPU's cvt.rn): hi = W rounded, lo = the
    remainder rounded; W - hi - lo is at most u^2 |W| elementwise (u = 2^-8, bf16's unit roundoff)."""
    hi = W.bfloat16()
    return hi, (W - hi.float()).bfloat16()


def _jl_triton(W, form="atanh", power=4.0, mu=0.0):
    """Launcher: -> (value (), grad (n, d)) in fp32, whatever W's dtype; form, power and mu checked by the caller."""
    assert W.dim() == 2, f"W must be (n, d), got {tuple(W.shape)}"
    n, d = W.shape
    assert n >= 2, "the JL penalty needs at least two rows"
    assert form in JL_FORMS, f"unknown JL form {form!r}: jl_margin checks the user's settings"
    assert int32_offsets_fit(W), f"W {tuple(W.shape)} has 2^31 elements or more, past the kernel's int32 offsets"
    hi, lo = split_bf16(W.float().contiguous())
    grad = torch.zeros(n, d, device=W.device, dtype=torch.float32)
    value = torch.zeros(1, device=W.device, dtype=torch.float32)
    grid = lambda META: (triton.cdiv(n, META["BLOCK"]), triton.cdiv(n, META["BLOCK"]))
    _jl_fwd_bwd_kernel[grid](hi, lo, grad, value, n, d, 1.0 / (n * (n - 1)), 1.0 - JL_EPS, float(power), float(mu),
                             FORM=form, WIDEN=INTERPRET)
    return value[0], grad


def _jl_cpu(W, form="atanh", power=4.0, mu=0.0, block=None):
    """The CPU code: value and gradient over row blocks, each block against itself and the rows after it
    (symmetry), so memory is three (block, n) temporaries, not (n, n): 64 MiB each by default.
    -> (value (), grad (n, d))"""
    n = W.shape[0]
    block = block or max(64, min(512, 2**24 // n))
    W = W.to(torch.promote_types(W.dtype, torch.float32))
    grad = torch.zeros_like(W)
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    for i in range(0, n, block):
        b = min(block, n - i)
        Wi, rest = W[i:i + b], W[i:]
        G = Wi @ rest.T                                 # (b, d) @ (d, n - i) -> (b, n - i)
        if form == "atanh":
            g = G.abs().clamp_(max=1 - JL_EPS)
        else:
            g = G.abs()
        g.diagonal()[:] = 0                             # the diagonal entries (j = i) lie in the first b columns
        if form == "atanh":
            phi = torch.atanh(g)
        elif form == "power":
            phi = g.pow(power)
        else:
            phi = (g - mu).relu_().square_()
        total += phi[:, :b].sum(dtype=torch.float64) + 2 * phi[:, b:].sum(dtype=torch.float64)  # mirror tiles
        del phi
        # S = sign(G) phi'(g), all in place
        if form == "atanh":
            S = g.square_().neg_().add_(1).reciprocal_().mul_(G.sign_())  # sign(G) / (1 - g^2)
        elif form == "power":
            S = g.pow_(power - 1).mul_(G.sign_()).mul_(power)   # 0^0 = 1 at p = 1, times sign(0) = 0
        else:
            S = g.sub_(mu).relu_().mul_(G.sign_()).mul_(2)
        S.diagonal()[:] = 0
        grad[i + b:].addmm_(S[:, b:].T, Wi)             # (n - i - b, b) @ (b, d): the mirror tiles' rows
        grad[i:i + b].addmm_(S, rest)                   # (b, n - i) @ (n - i, d)
        del G, g, S
    pairs = n * (n - 1)
    return (total / pairs).to(W.dtype), grad.mul_(2 / pairs)


class JLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W, form, power, mu, path):
        value_and_grad = _jl_triton if path == "triton" else _jl_cpu
        value, grad = value_and_grad(W, form, power, mu)
        ctx.save_for_backward(grad)
        ctx.dtype = W.dtype
        return value.to(torch.promote_types(W.dtype, torch.float32))

    @staticmethod
    def backward(ctx, grad_value):
        (grad,) = ctx.saved_tensors
        return (grad * grad_value).to(ctx.dtype), None, None, None, None


def jl_penalty_sampled(W, n_sample, generator=None, form="atanh", power=4.0, margin=0.0):
    """An unbiased estimate of the JL mean from n_sample random rows i against all rows j != i; its gradient
    is an unbiased estimate of the full gradient. Cost n_sample/n of the exact penalty. W (n, d) -> ()"""
    n = W.shape[0]
    mu = jl_margin(form, power, margin, n, W.shape[1])  # the whole dictionary's bound, not the sample's
    device = generator.device if generator is not None else W.device  # sae.py's generator lives on W's device
    rows = torch.randperm(n, generator=generator, device=device)[:n_sample].to(W.device)  # (m,)
    W = W.to(torch.promote_types(W.dtype, torch.float32))
    G = W[rows] @ W.T                                     # (m, d) @ (d, n) -> (m, n)
    phi = jl_pairs_ref(G, form, power, mu)                # (m, n)
    phi = phi.scatter(1, rows[:, None], 0.0)              # a row with itself is no pair
    return phi.sum() / (len(rows) * (n - 1))


@torch.compiler.disable  # see COMPILE
def jl_penalty(W, sample=0, generator=None, form="atanh", power=4.0, margin=0.0):
    """The JL mean of W's rows (the caller normalises them) in one of JL_FORMS: exact, or estimated from `sample`
    rows (PyTorch on every path: a (sample, n) block)."""
    if sample and sample < W.shape[0]:
        return jl_penalty_sampled(W, sample, generator, form, power, margin)
    path = pick_path(W)
    if path == "reference":
        return jl_penalty_ref(W, form, power, margin)
    mu = jl_margin(form, power, margin, *W.shape)
    return JLPenalty.apply(W, form, power, mu, path)


# -----------------------------------------------------------------------------
# the architectures' small ops: selections and straight-through estimators, whose gradients torch's autograd does not
# give as the papers define them; PyTorch only (no hot spot here: each is elementwise or a top-k), each with its
# reference in the tests (exhaustive selections, gradients by hand)

def batch_topk_select(pre, k):
    """BatchTopK's selection: the k N largest positive entries of pre (N, d_sae). -> (indices (N, K), keep (N, K)
    bool, t), K the most any row keeps, t the smallest kept value. A flat top-(k N) of N d_sae entries costs 15x
    a per-row top-k on the CPU, so candidates come per row (4k, widened if some row keeps all of its own)."""
    N, m = pre.shape
    width = min(m, 4 * k)
    while True:
        values, indices = pre.topk(width, dim=1)  # (N, width), sorted
        t = values.flatten().topk(min(k * N, values.numel())).values[-1]
        if width == m or (values[:, -1] < t).all():  # no row can hold a kept entry beyond its candidates
            break
        width = min(m, 4 * width)
    keep = (values >= t) & (values > 0)
    K = max(int(keep.sum(dim=1).max()), 1)
    return indices[:, :K], keep[:, :K], t


def fsq_code(values, scale_log, levels):
    """Finite scalar quantisation of active values (N, K): bounded to [0, a) by a tanh(relu(v) / a), a = e^scale_log
    the feature's top level, then rounded to a (0, 1, ..., L - 1) / (L - 1), the rounding's gradient passed
    straight through (Mentzer et al. 2023). Level 0 is off: a small value rounds to an inactive feature."""
    a = scale_log.exp()
    u = torch.tanh(values.relu() / a) * (levels - 1)
    return a * (u + (u.round() - u).detach()) / (levels - 1)


def near_threshold(pre, theta, eps):
    """The rectangle kernel K((pre - theta) / eps) = 1[|pre - theta| < eps / 2] of both estimators below."""
    return ((pre - theta).abs() < eps / 2).to(pre.dtype)


class JumpReLU(torch.autograd.Function):
    """f = pre H(pre - theta); df/dpre = H, df/dtheta = -(theta / eps) K((pre - theta) / eps) with the rectangle
    kernel K(u) = 1[|u| < 1/2] (Rajamanoharan et al. 2024, eq. 11; the rule dictionary_learning and SAELens use)."""
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = near_threshold(pre, theta, ctx.eps)  # (N, d_sae)
        return grad * (pre > theta), -(theta / ctx.eps) * (near * grad).sum(dim=0), None


class Step(torch.autograd.Function):
    """H(pre - theta), the L0 term; dH/dtheta = -(1 / eps) K((pre - theta) / eps), dH/dpre = 0 (same paper)."""
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        return None, -(near_threshold(pre, theta, ctx.eps) * grad).sum(dim=0) / ctx.eps, None


# -----------------------------------------------------------------------------
# the CPU's dense matmul (no kernel): which dtype, which library; encode-ReLU-decode's CPU code, count_ones and
# sae.py's model layers call `linear`
# Two rules, each from a documented feature of the CPU and measured on both kinds this project runs on, at the
# SAE's shape (4096 x 768 @ 768 x 8192, 2 threads):
# - dtype: bf16 where the CPU multiplies bf16 natively, with AMX tiles (Intel Sapphire Rapids on) or AVX512-BF16
#   dot products (AMD Zen 4 on, Intel Cooper Lake): a bf16 matmul ran at 1,280 against 310 GFLOP/s in fp32 on an
#   Intel Xeon with AMX and at 351-445 against 164-222 on the development AMD EPYC (Zen 4, no AMX;
#   `python bench.py` prints both peaks). Elsewhere bf16 is emulated, slower than fp32: fp32 there.
#   `cpu_bf16_native()` is the test; sae.py's --dtype=auto reads it. Inputs are rounded to bf16, products summed
#   in fp32, the result rounded to bf16 (torch.autocast's contract); parameters and Adam stay fp32.
# - library for fp32: torch's fp32 matmul calls MKL, which runs its AVX-512 code on Intel processors only (it
#   checks the vendor) and AVX2 on AMD; oneDNN, which torch also bundles (torch.compile's CPU linear layers call
#   it through this same op), uses AVX-512 wherever the CPU has it. On the AMD EPYC oneDNN measured 375 against
#   200 GFLOP/s one day, 184-222 against 164-199 another (the host's speed varies; the ratio was always > 1);
#   on the Intel Xeon oneDNN was slower, 280 against MKL's 310. So: oneDNN for fp32 unless the CPU is Intel's.
#   bf16 goes through oneDNN wherever its bf16 kernels exist (AVX-512 or AVX-NE-CONVERT; torch's bf16 matmul on the
#   CPU calls them too; ours fuses the bias and the activation), else through torch's matmul (ONEDNN_BF16). Its
#   linear computes x @ weight^T + bias with an optional fused activation, reading strided views.
# SAE_NO_ONEDNN=1 keeps torch's matmul for everything.

def _onednn_works():
    if os.environ.get("SAE_NO_ONEDNN") == "1" or not torch.backends.mkldnn.is_available():
        return False
    try:  # a private op (torch/_inductor/mkldnn_ir.py calls it): check it exists and agrees with a plain matmul
        x, w = torch.randn(3, 5), torch.randn(4, 5)
        return torch.allclose(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], ""), x @ w.T, atol=1e-5)
    except (AttributeError, RuntimeError):
        return False


def _onednn_bf16_works():
    """oneDNN's bf16 kernels need AVX-512 (BW, VL and DQ) or AVX-NE-CONVERT: torch's own rule is
    torch.ops.mkldnn._is_mkldnn_bf16_supported(), and on an AVX2-only CPU (as some AMD EPYCs are) the bf16 linear
    fails to build ("could not create a primitive descriptor") and the fused multiply refuses ("bf16 path needs the
    cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"). So both ops we call are probed on a tiny input;
    where either fails, bf16 goes through torch's matmul (its own fallback: slower, still bf16's rounding)."""
    try:
        x, w = torch.randn(3, 5, dtype=torch.bfloat16), torch.randn(4, 5, dtype=torch.bfloat16)
        torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")
        torch.ops.mkldnn._linear_pointwise.binary(x, torch.ones(3, 4, dtype=torch.bfloat16), w, None, "mul")
        return True
    except (AttributeError, RuntimeError):
        return False


def cpu_vendor():
    """GenuineIntel, AuthenticAMD, ... from /proc/cpuinfo; "" where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def cpu_bf16_native():
    """True where the CPU has AMX tiles or AVX512-BF16 and oneDNN may use them (torch's own cpuinfo checks, and its
    rule for oneDNN's bf16, which also honours ONEDNN_MAX_CPU_ISA; private, so guarded)."""
    try:
        return bool((torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_works()                                   # the op
ONEDNN_FP32 = ONEDNN and cpu_vendor() != "GenuineIntel"    # for fp32 where MKL takes its AVX2 path
ONEDNN_BF16 = ONEDNN and _onednn_bf16_works()              # for bf16 where the CPU has oneDNN's bf16 kernels


def keep_freed_memory(keep=True):
    """glibc returns every freed block over its mmap threshold to the OS, so each step's fresh (N, d_sae)
    temporaries (oneDNN's outputs cannot be preallocated) page-fault in again: a fifth of a CPU SAE step was
    system time. Large blocks from the heap, kept when freed, are reused instead. keep=False: glibc's default
    thresholds (128 KiB) again. Linux/glibc only; a no-op elsewhere."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30 if keep else 128 * 1024)        # M_MMAP_THRESHOLD: blocks under 1 GiB from the heap
    libc.mallopt(-1, (1 << 31) - 1 if keep else 128 * 1024)  # M_TRIM_THRESHOLD: freed heap memory stays
    if not keep:
        libc.malloc_trim(0)


def linear(x, weight, bias=None, act="none", mul=None):
    """act(x @ weight^T + bias), times mul if given: x (M, K), weight (N, K), mul (M, N), any strides; act is none,
    relu, gelu_tanh or silu. Under CPU autocast to bf16, in bf16 as autocast would (the result bf16). oneDNN for
    CPU tensors that need no gradient (its op has no autograd), in bf16 where ONEDNN_BF16 or fp32 where ONEDNN_FP32, the product
    with mul fused into the matmul's epilogue (oneDNN's binary post-op: no extra pass over (M, N)); else torch.
    -> (M, N)"""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
    # not under torch.compile: Inductor lowers this op only with frozen weights (a crash: "assert w.get_name() in
    # V.graph.constants"); it lowers torch's matmul itself
    if ONEDNN and x.device.type == "cpu" and not needs_grad and not torch.compiler.is_compiling() and \
            ((dtype == torch.bfloat16 and ONEDNN_BF16) or (dtype == torch.float32 and ONEDNN_FP32)):
        x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, bias))
        if mul is not None and act == "none":
            return torch.ops.mkldnn._linear_pointwise.binary(x, mul.to(dtype), weight, bias, "mul")
        attr, algorithm = {"gelu_tanh": ("gelu", "tanh"), "silu": ("swish", "")}.get(act, (act, ""))  # oneDNN's names
        y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [None], algorithm)
        return y if mul is None else y.mul_(mul)
    y = x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)  # (M, K) @ (K, N)
    if act == "silu":
        y = F.silu(y)
    elif act != "none":
        y = y.relu_() if act == "relu" else F.gelu(y, approximate="tanh")
    return y if mul is None else y.mul_(mul)


def padded_width(d):
    """d_model + 1 (the column of l1 weights) rounded up to 32: AMX multiplies bf16 in tiles 32 wide along K, and
    at 769 columns oneDNN ran the decoder 1.3x slower than at 800 (4096 x 8192 @ 8192 x D)."""
    return (d + 1 + 31) // 32 * 32


_BLOCKS = {}


def block_indicator(n, dtype, block=256):
    """(ceil(n / block), n) 0/1: row c marks positions c*block to (c+1)*block - 1. Cached by (n, dtype)."""
    if (n, dtype) not in _BLOCKS:
        _BLOCKS[n, dtype] = (torch.arange(n) // block == torch.arange((n + block - 1) // block)[:, None]).to(dtype)
    return _BLOCKS[n, dtype]


def count_ones(mask):
    """A 0/1 (N, n) CPU tensor -> (per row (N,), per column (n,)) counts, int32, exact: summed by two matmuls with
    block indicators (one read of the mask each, 1.4 and 4.1 ms at 4096 x 8192 in bf16, against 12 and 19 ms for
    torch's sums, which cast all of it to fp32 first), in partial sums of at most 256, which bf16's 8 significant
    bits hold exactly (products summed in fp32), then summed in fp32."""
    N, n = mask.shape
    with torch.autocast("cpu", enabled=False):
        per_row = linear(mask, block_indicator(n, mask.dtype))     # (N, n) @ (n, ceil(n / 256))
        per_col = linear(block_indicator(N, mask.dtype), mask.T)  # (ceil(N / 256), N) @ (N, n)
    return per_row.float().sum(dim=1).int(), per_col.float().sum(dim=0).int()
