"""sae_kernels.py's tests: every op on both paths (the Triton kernels, interpreted here, and the CPU code) against its
PyTorch reference at ragged sizes, in fp32 and bf16; and every kernel compiled ahead of time for real GPUs.
The command: `TRITON_INTERPRET=1 python -m pytest -q` (all test files; docs/tests.md)."""
import itertools
import math
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sae
import sae_kernels
import triton
import triton.language as tl
from sae_kernels import JL_EPS, JL_FORMS, jl_penalty_ref, welch_bound
from conftest import CUDA, cpu_env, HERE, relative_error


# -----------------------------------------------------------------------------
# encode-ReLU-decode and the CPU matmul: every path against its reference at ragged sizes (no dimension a power
# of two); bf16; what CUDA alone runs

interpreted = pytest.mark.skipif(not sae_kernels.INTERPRET, reason="Triton kernels run on the CPU only with TRITON_INTERPRET=1 "
                                 "set before import (the README's test command)")


def sae_params(d, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * scale).requires_grad_()
            for shape, scale in (((d, s), 0.3), ((s,), 0.1), ((s, d), 0.3), ((d,), 0.1))]


def transcoder_params(d_in, d_out, s, seed=0):
    """A transcoder's (W_enc (d_in, s), b_enc, W_dec (s, d_out), b_dec (d_out,), b_in (d_in,)), needing gradients."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * scale).requires_grad_()
            for shape, scale in (((d_in, s), 0.3), ((s,), 0.1), ((s, d_out), 0.3), ((d_out,), 0.1), ((d_in,), 0.1))]


@pytest.mark.parametrize("transcoder", [False, True])
def test_encode_relu_decode_reference_against_numpy_closed_form(transcoder):
    """The reference's forward against float64 numpy, and its autograd gradients against the closed form: an SAE
    (b_dec also the input bias) and a transcoder (d_out != d_in, its own input bias b_in)."""
    N, d, s, d_out = 23, 13, 37, 17 if transcoder else 13
    x = torch.randn(N, d, dtype=torch.float64)
    params = [p.detach().double().requires_grad_() for p in (transcoder_params(d, d_out, s) if transcoder
                                                              else sae_params(d, s))]
    R, Q = torch.randn(N, d_out, dtype=torch.float64), torch.randn(N, s, dtype=torch.float64)
    x_hat, f = sae_kernels.encode_relu_decode_ref(x, *params[:4], b_in=params[4] if transcoder else None)[:2]
    ((x_hat * R).sum() + (f * Q).sum()).backward()  # dx_hat = R, df = Q
    W_enc, b_enc, W_dec, b_dec = (p.detach().numpy() for p in params[:4])
    b_in = params[4].detach().numpy() if transcoder else b_dec
    xn, Rn, Qn = x.numpy(), R.numpy(), Q.numpy()
    fn = np.maximum((xn - b_in) @ W_enc + b_enc, 0)
    np.testing.assert_allclose(f.detach().numpy(), fn, rtol=1e-12)
    np.testing.assert_allclose(x_hat.detach().numpy(), fn @ W_dec + b_dec, rtol=1e-12)
    dpre = (Rn @ W_dec.T + Qn) * (fn > 0)
    expected = {"W_enc": (xn - b_in).T @ dpre, "b_enc": dpre.sum(0), "W_dec": fn.T @ Rn,
                "b_dec": Rn.sum(0) - (0 if transcoder else W_enc @ dpre.sum(0)), "b_in": -W_enc @ dpre.sum(0)}
    for name, p in zip(("W_enc", "b_enc", "W_dec", "b_dec", "b_in"), params):
        np.testing.assert_allclose(p.grad.numpy(), expected[name], rtol=1e-10, atol=1e-12)


# the CPU path twice: its fp32 matmuls through torch (MKL, as on Intel) and through oneDNN (as on AMD)
@pytest.mark.parametrize("path,onednn_fp32", [pytest.param("triton", False, marks=interpreted), ("cpu", False),
                                              pytest.param("cpu", True, marks=pytest.mark.skipif(
                                                  not sae_kernels.ONEDNN, reason="no oneDNN in this torch build"))],
                         indirect=["path"])
@pytest.mark.parametrize("N,d,s", [(37, 45, 83), (5, 24, 100)])
@pytest.mark.parametrize("reads_f", [True, False])  # a loss on f itself, or (as sae_loss) on x_hat and l1 only
@pytest.mark.parametrize("scaled", [False, True])  # l1 weighted per latent (free decoder norms), with its gradient
def test_encode_relu_decode_matches_reference(path, onednn_fp32, N, d, s, reads_f, scaled, monkeypatch):
    monkeypatch.setattr(sae_kernels, "ONEDNN_FP32", onednn_fp32)
    x = torch.randn(N, d)
    ref_params, params = sae_params(d, s), sae_params(d, s)
    if scaled:  # the same weights twice, so that each copy collects its own gradient
        ref_params, params = ([*p, (torch.rand(s, generator=torch.Generator().manual_seed(1)) + 0.5).requires_grad_()]
                              for p in (ref_params, params))
    R, Q, P = torch.randn(N, d), torch.randn(N, s), torch.randn(N)  # upstream gradients for x_hat, f and l1
    outs_ref = sae_kernels.encode_relu_decode_ref(x, *ref_params[:4], scale=ref_params[4] if scaled else None)
    outs = sae_kernels.encode_relu_decode(x, *params[:4], scale=params[4] if scaled else None)
    assert outs[1].grad_fn is not None and "EncodeReluDecode" in type(outs[1].grad_fn).__name__
    for x_hat, f, l1, _, _ in (outs_ref, outs):
        ((x_hat * R).sum() + (l1 * P).sum() + ((f * Q).sum() if reads_f else 0)).backward()
    # fp32, sums of at most ~100 products: 1e-5 relative covers the summation order of blocked matmuls
    for a, b in zip(outs[:3], outs_ref[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    active = outs[1].detach() > 0  # f itself is checked against the reference above; the counts are exact
    assert torch.equal(outs[3], active.sum(dim=1, dtype=torch.int32))
    assert torch.equal(outs[4], active.sum(dim=0, dtype=torch.int32))
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-5)
    assert torch.equal(sae_kernels.encode_relu_decode(x, *params[:4])[1], outs[1])  # again: the same f


@pytest.mark.parametrize("path", [pytest.param("triton", marks=interpreted), "cpu"], indirect=True)
@pytest.mark.parametrize("scaled", [False, True])
def test_encode_relu_decode_of_a_transcoder_matches_reference(path, scaled):
    """d_out != d_in and an input bias of its own: forward, counts and every gradient (b_in's included) against the
    reference's autograd, at ragged sizes."""
    N, d_in, d_out, s = 29, 19, 45, 71
    x = torch.randn(N, d_in)
    ref_params, params = transcoder_params(d_in, d_out, s), transcoder_params(d_in, d_out, s)
    scales = [(torch.rand(s, generator=torch.Generator().manual_seed(1)) + 0.5).requires_grad_() if scaled else None
              for _ in range(2)]
    R, P = torch.randn(N, d_out), torch.randn(N)
    outs_ref = sae_kernels.encode_relu_decode_ref(x, *ref_params[:4], scale=scales[0], b_in=ref_params[4])
    outs = sae_kernels.encode_relu_decode(x, *params[:4], scale=scales[1], b_in=params[4])
    assert outs[0].shape == (N, d_out) and "EncodeReluDecode" in type(outs[1].grad_fn).__name__
    for x_hat, f, l1, _, _ in (outs_ref, outs):
        ((x_hat * R).sum() + (l1 * P).sum()).backward()
    for a, b in zip(outs[:3], outs_ref[:3]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    active = outs[1].detach() > 0
    assert active.any() and torch.equal(outs[4], active.sum(dim=0, dtype=torch.int32))
    for p, q in zip(params + scales[1:] * scaled, ref_params + scales[:1] * scaled):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-5)


def use_onednn(monkeypatch, onednn, dtype=torch.float32):
    """sae_kernels.linear through oneDNN (skipped, saying why, where this CPU cannot run it in `dtype`) or torch."""
    if onednn and not sae_kernels.ONEDNN:
        pytest.skip("oneDNN's linear is not available in this torch build")
    if onednn and dtype == torch.bfloat16 and not sae_kernels.ONEDNN_BF16:
        pytest.skip("oneDNN's bf16 kernels need AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; this CPU has neither")
    monkeypatch.setattr(sae_kernels, "ONEDNN", onednn)
    monkeypatch.setattr(sae_kernels, "ONEDNN_FP32", onednn)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("act", ["none", "relu", "gelu_tanh", "silu"])
def test_cpu_linear_matches_float64(onednn, act, monkeypatch):
    """sae_kernels.linear (oneDNN where it works, else torch) on contiguous and transposed operands, against numpy."""
    use_onednn(monkeypatch, onednn)  # for fp32 too, whatever the vendor rule picks on this CPU
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(37, 45, generator=g), torch.randn(83, 45, generator=g), torch.randn(83, generator=g)
    pre = x.double().numpy() @ w.double().numpy().T + b.double().numpy()
    expect = {"none": pre, "relu": np.maximum(pre, 0),
              "gelu_tanh": 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3))),
              "silu": pre / (1 + np.exp(-pre))}[act]
    for xx, ww in ((x, w), (x.T.contiguous().T, w.T.contiguous().T)):  # strided views of the same values
        y = sae_kernels.linear(xx, ww, b, act)
        assert y.shape == (37, 83) and y.dtype == torch.float32
        np.testing.assert_allclose(y.numpy(), expect, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(sae_kernels.linear(x, w).numpy(), x.double().numpy() @ w.double().numpy().T, atol=1e-4)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_linear_times_a_mask_matches_float64(onednn, dtype, monkeypatch):
    """linear(..., mul=m) = (x @ w^T + b) * m (oneDNN's fused binary post-op, or torch's multiply), with a 0/1 mask
    as ReLU's backward uses it, in fp32 and under bf16 autocast, against float64."""
    use_onednn(monkeypatch, onednn, dtype)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(37, 45, generator=g), torch.randn(83, 45, generator=g), torch.randn(83, generator=g)
    mask = (torch.rand(37, 83, generator=g) < 0.3).to(dtype)
    expect = (x.double() @ w.double().T + b.double()) * mask.double()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = sae_kernels.linear(x, w.T.contiguous().T, b, mul=mask)  # a transposed weight, as the SAE's backward passes it
    assert y.dtype == dtype and y.shape == (37, 83)
    assert torch.equal(y == 0, (mask == 0) | (expect == 0))  # exact zeros where the mask is 0
    assert relative_error(y, expect) < (BF16_TOLERANCE if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_count_ones_is_exact_past_bf16s_integers(onednn, dtype, monkeypatch):
    """sae_kernels.count_ones (the CPU path's l0 and fired counts, by matmuls) against integer sums, at counts up to
    ~900: past 256, where bf16 stops holding every integer, and with sizes that are not multiples of its 256-blocks."""
    use_onednn(monkeypatch, onednn, dtype)
    mask = torch.rand(1000, 700, generator=torch.Generator().manual_seed(0)) < torch.linspace(0, 1, 700)  # 0-100%
    per_row, per_col = sae_kernels.count_ones(mask.to(dtype))
    assert per_row.dtype == per_col.dtype == torch.int32
    assert torch.equal(per_row, mask.sum(dim=1, dtype=torch.int32)) and torch.equal(per_col, mask.sum(dim=0, dtype=torch.int32))
    assert per_col.max() > 900 and per_row.max() > 300


# bf16: inputs rounded to 8 significant bits (relative 2**-9), products summed in fp32, outputs rounded again: a
# matmul's whole-tensor relative error is about 2**-8; 1% leaves room for sums of a few hundred terms. An fp32
# result would be near 1e-7, which the tests tell apart by also asking for more than 1e-5 where they check the dtype
BF16_TOLERANCE = 0.01


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("act", ["none", "relu"])
def test_cpu_linear_under_bf16_autocast_runs_in_bf16(onednn, act, monkeypatch):
    """Under CPU autocast to bf16, sae_kernels.linear returns bf16 (as autocast's own matmul would), within bf16's
    error of float64, through oneDNN or torch."""
    use_onednn(monkeypatch, onednn, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(37, 45, generator=g), torch.randn(83, 45, generator=g), torch.randn(83, generator=g)
    pre = x.double() @ w.double().T + b.double()
    expect = pre.relu() if act == "relu" else pre
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sae_kernels.linear(x, w, b, act)
    assert y.dtype == torch.bfloat16 and y.shape == (37, 83)
    assert relative_error(y, expect) < BF16_TOLERANCE
    assert relative_error(y, expect) > 1e-5  # rounded: it did run in bf16, not fp32


def widen_bf16_dots(monkeypatch):
    """Triton 3.9's interpreter multiplies bf16 tl.dot operands as the uint16 integers that hold them (create_dot hands
    the storage to np.matmul; test_interpreter_multiplies_bf16_as_integers). Patched for a test: bf16 operands widened
    to fp32 first, exactly (a bf16 is an fp32's upper half), as a GPU's bf16 MMA multiplies them (products exact, sums
    in fp32)."""
    from triton.runtime import interpreter
    create_dot = interpreter.InterpreterBuilder.create_dot
    def widened(self, a, b, d, *args):
        widen = lambda h: interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32) \
            if h.dtype == tl.bfloat16 else h
        return create_dot(self, widen(a), widen(b), d, *args)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", widened)


def round_bf16_casts(monkeypatch):
    """Triton 3.9's interpreter casts fp32 to bf16 by dropping the low 16 bits (cast_impl passes no rounding mode),
    where a GPU rounds to nearest even (Triton's default for a narrowing cast: cvt.rn.bf16.f32); patched for a test:
    rounded by torch, which rounds to nearest even too (test_interpreter_truncates_fp32_to_bf16)."""
    from triton.runtime import interpreter
    create_fp_trunc = interpreter.InterpreterBuilder.create_fp_trunc
    def rounded(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return create_fp_trunc(self, src, dst_type)
        bf16 = torch.from_numpy(np.ascontiguousarray(src.data)).bfloat16()
        return interpreter.TensorHandle(bf16.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fp_trunc", rounded)


@pytest.mark.skipif(not sae_kernels.INTERPRET, reason="the interpreter runs under TRITON_INTERPRET=1 only")
def test_interpreter_truncates_fp32_to_bf16(monkeypatch):
    """The upstream bug round_bf16_casts works around, kept in view: 1 + 3 * 2^-9 (between the bf16s 1 and 1 + 2^-7,
    nearer the second) casts to 1 in the plain interpreter, to 1 + 2^-7 once patched, as torch (and a GPU) round it. When a Triton release rounds, the first assertion fails: the patch can go."""
    @triton.jit
    def cast(x_ptr, y_ptr):
        tl.store(y_ptr, tl.load(x_ptr).to(tl.bfloat16).to(tl.float32))
    x, y = torch.tensor([1 + 3 * 2**-9]), torch.zeros(1)
    cast[(1,)](x, y)
    assert y.item() == 1 and x.bfloat16().item() == 1 + 2**-7
    round_bf16_casts(monkeypatch)
    cast[(1,)](x, y)
    assert y.item() == 1 + 2**-7


@pytest.mark.skipif(not sae_kernels.INTERPRET, reason="the interpreter runs under TRITON_INTERPRET=1 only")
def test_interpreter_multiplies_bf16_as_integers(monkeypatch):
    """The upstream bug widen_bf16_dots works around, kept in view: a 32x32 bf16 product through _sae_matmul is
    off by orders of magnitude in the plain interpreter and exact (fp32 sums of exact products) once patched. When a
    Triton release fixes it, the first assertion fails: the patch can go."""
    A, B = torch.randn(32, 32).bfloat16(), torch.randn(32, 32).bfloat16()
    expect = A.double() @ B.double()
    assert relative_error(sae_kernels._sae_matmul(A, B, out_dtype=torch.float32), expect) > 1e3
    widen_bf16_dots(monkeypatch)
    assert relative_error(sae_kernels._sae_matmul(A, B, out_dtype=torch.float32), expect) < 1e-6


@interpreted
@pytest.mark.parametrize("reset", [True, False])
def test_the_autotuners_timing_runs_do_not_add_into_the_counts(monkeypatch, reset):
    """On a GPU the autotuner times every config of the matmul kernel at each new shape, running it several times
    on the caller's buffers; the counts, L1 sums and firings are accumulated with atomics, so unless it zeroes them
    (ACCUMULATED, its reset_to_zero) they come out summed over those runs. Here the interpreted
    kernel under an autotuner of two configs whose timing runs the kernel three times: with the kernel's reset list
    the stats are exact (against the float64 reference); without it (the control) they are not."""
    from triton.runtime.autotuner import Autotuner
    configs = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4),
               triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4)]
    def three_runs(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        return [1.0, 1.0, 1.0]
    kernel = sae_kernels._sae_matmul_kernel
    assert isinstance(kernel, Autotuner) and set(kernel.reset_to_zero) == set(sae_kernels.ACCUMULATED)
    tuned = triton.autotune(configs, key=["M", "N", "K"], reset_to_zero=sae_kernels.ACCUMULATED if reset else None,
                            do_bench=three_runs)(kernel.fn)
    monkeypatch.setattr(sae_kernels, "_sae_matmul_kernel", tuned)
    x, params = torch.randn(50, 24), sae_params(24, 70)
    _, f, l1, l0, fired = sae_kernels.encode_relu_decode(x, *params)
    f_ref = sae_kernels.encode_relu_decode_ref(*(t.detach().double() for t in (x, *params)))[1]
    exact = torch.equal(l0, (f_ref > 0).sum(1, dtype=torch.int32)) and \
        torch.equal(fired, (f_ref > 0).sum(0, dtype=torch.int32)) and relative_error(l1.detach(), f_ref.sum(1)) < 1e-5
    assert exact == reset and len(tuned.cache) == 2  # the timing ran, at both matmuls of the forward


# _sae_matmul's calls from encode-ReLU-decode, each by the arguments it sets, which are the kernel's flags (shift:
# SHIFT=1, with shift_rows SHIFT=2; bias HAS_BIAS; D HAS_D; row HAS_ROW; col HAS_COL; relu RELU; mask_by MASK_F;
# stats STATS; out_dtype sets none)
MATMUL_FLAGS_USED = {
    ("bias", "relu", "shift", "stats"),  # forward, the encoder: f = relu((x - b_dec) @ W_enc + b_enc), its counts
    ("bias",),                           # forward, the decoder: x_hat = f @ W_dec + b_dec
    # backward, dpre = (dx_hat @ W_dec^T [+ df] [+ dl1 [* scale]]) * (f > 0), as the loss reads f, l1, both or neither
    # beside x_hat, and l1 weighted or not
    ("mask_by",), ("D", "mask_by"), ("mask_by", "row"), ("D", "mask_by", "row"), ("col", "mask_by", "row"),
    ("D", "col", "mask_by", "row"),
    (),                                  # backward, dW_dec = f^T @ dx_hat
    ("shift", "shift_rows"),             # backward, dW_enc = (x - b_dec)^T @ dpre
}


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sae_matmul_kernel_matches_its_reference_at_every_flag_combination_used(dtype, monkeypatch):
    """_sae_matmul_kernel (interpreted) against sae_matmul_ref, its plain-torch specification, at every call
    encode-ReLU-decode makes: forward and backward of an SAE and a transcoder, with and without L1 weights, the loss
    reading each mix of x_hat, f and l1, every call recorded with its result and replayed through the reference; the
    calls cover MATMUL_FLAGS_USED exactly. fp32: the same products summed in another order, within 1e-5. bf16, under
    autocast as training runs it, the interpreter patched to multiply and round as a GPU does (widen_bf16_dots,
    round_bf16_casts): C within one bf16 step (2^-7 relative) of the reference's, the fp32 outputs within 1e-5."""
    if dtype == torch.bfloat16:
        widen_bf16_dots(monkeypatch)
        round_bf16_casts(monkeypatch)
    calls, matmul = [], sae_kernels._sae_matmul
    def recording_matmul(A, B, **kwargs):
        out = matmul(A, B, **kwargs)
        calls.append((A.detach().clone(), B.detach().clone(), kwargs, out))
        return out
    monkeypatch.setattr(sae_kernels, "_sae_matmul", recording_matmul)
    torch.manual_seed(0)
    N, d, s, d_out = 37, 45, 83, 29
    x = torch.randn(N, d)
    reads = (("x_hat",), ("x_hat", "f"), ("x_hat", "l1"), ("x_hat", "f", "l1"), ("l1",))
    for transcoder, scaled, read in itertools.product((False, True), (False, True), reads):
        params = transcoder_params(d, d_out, s) if transcoder else sae_params(d, s)
        scale = (torch.rand(s) + 0.5).requires_grad_() if scaled else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            x_hat, f, l1, _, _ = sae_kernels.encode_relu_decode(x, *params[:4], scale=scale,
                                                                b_in=params[4] if transcoder else None)
        outs = {"x_hat": x_hat, "f": f, "l1": l1}
        sum((outs[r].float() * torch.randn(outs[r].shape)).sum() for r in read).backward()
    flags_used = set()
    for A, B, kwargs, out in calls:
        assert A.dtype == B.dtype == dtype
        flags = (k for k, v in kwargs.items() if k != "out_dtype" and v is not None and v is not False)
        flags_used.add(tuple(sorted(flags)))
        ref = sae_kernels.sae_matmul_ref(A, B, **kwargs)
        (C, *stats), (C_ref, *stats_ref) = (out, ref) if kwargs.get("stats") else ((out,), (ref,))
        assert C.dtype == C_ref.dtype and C.shape == C_ref.shape
        tolerance = 1e-5 if C.dtype == torch.float32 else 2.0**-7
        torch.testing.assert_close(C, C_ref, atol=tolerance, rtol=tolerance)
        if stats:  # the L1 sums in fp32; the counts exact (no pre-activation within fp32's rounding of 0 here)
            torch.testing.assert_close(stats[0], stats_ref[0], atol=1e-5, rtol=1e-5)
            assert torch.equal(stats[1], stats_ref[1]) and torch.equal(stats[2], stats_ref[2])
    assert flags_used == MATMUL_FLAGS_USED


def test_float64_takes_the_reference_path():
    """The kernels multiply fp32, bf16 or fp16; a float64 call (an exact check) gets the reference's autograd graph,
    not a kernel (on a GPU, Triton does not compile an fp64 dot into the fp32 accumulator)."""
    x, params = torch.randn(6, 4, dtype=torch.float64), [p.detach().double().requires_grad_() for p in sae_params(4, 5)]
    x_hat, f = sae_kernels.encode_relu_decode(x, *params)[:2]
    assert type(f.grad_fn).__name__ == "ReluBackward0" and x_hat.dtype == torch.float64


@pytest.mark.parametrize("path", ["cpu", "triton", pytest.param("cuda", marks=CUDA)])
def test_bf16_encode_relu_decode_against_float64(monkeypatch, path):
    """Each path under autocast to bf16 (the Triton kernels' through the interpreter, as on a GPU under CUDA
    autocast): f and x_hat in bf16, l1 in fp32, each within BF16_TOLERANCE of float64 and not within 1e-5 of it (so
    it did multiply in bf16: autocast does not cast a custom Function's inputs, so without matmul_dtype the Triton
    path would multiply the fp32 parameters in fp32); every Triton matmul's operands bf16; every gradient fp32,
    within BF16_TOLERANCE of the float64 closed form taken at the active set our forward found (a pre-activation
    within bf16's rounding of 0 may take the other side of the ReLU, as in any bf16 forward: 0.04-0.06% of entries
    here, which moves W_enc's gradient by 2-3%); the counts exact for its own f. "cuda": the compiled kernels on a GPU.
    """
    if path == "triton" and not sae_kernels.INTERPRET:
        pytest.skip("the Triton path runs on CPU tensors under TRITON_INTERPRET=1 (the README's test command)")
    if path != "cuda":
        monkeypatch.setattr(sae_kernels, "INTERPRET", path == "triton")
    monkeypatch.setattr(sae_kernels, "NO_TRITON", False)
    if path == "triton":
        widen_bf16_dots(monkeypatch)
    operands, matmul = [], sae_kernels._sae_matmul
    def recording_matmul(A, B, *args, **kwargs):
        operands.append((A.dtype, B.dtype))
        return matmul(A, B, *args, **kwargs)
    monkeypatch.setattr(sae_kernels, "_sae_matmul", recording_matmul)
    N, d, s = 97, 45, 130
    device = "cuda" if path == "cuda" else "cpu"
    x, params = torch.randn(N, d).to(device), [p.detach().to(device).requires_grad_() for p in sae_params(d, s)]
    scale = (torch.rand(s, generator=torch.Generator().manual_seed(1)) + 0.5).to(device).requires_grad_()  # free norms
    R, P = torch.randn(N, d).to(device), torch.randn(N).to(device)  # upstream gradients of x_hat and l1
    with torch.autocast(device, dtype=torch.bfloat16):
        x_hat, f, l1, l0, fired = sae_kernels.encode_relu_decode(x, *params, scale=scale)
    assert f.dtype == torch.bfloat16 and x_hat.dtype == torch.bfloat16 and l1.dtype == torch.float32
    ((x_hat.float() * R).sum() + (l1 * P).sum()).backward()
    W_enc, b_enc, W_dec, b_dec = (p.detach().double() for p in params)
    xd, Rd, Pd, sd = x.double(), R.double(), P.double(), scale.detach().double()
    pre = (xd - b_dec) @ W_enc + b_enc
    for ours, ref in ((f, pre.relu()), (x_hat, pre.relu() @ W_dec + b_dec), (l1, pre.relu() @ sd)):
        assert relative_error(ours.detach(), ref) < BF16_TOLERANCE
    assert relative_error(f.detach(), pre.relu()) > 1e-5
    assert operands == ([(torch.bfloat16, torch.bfloat16)] * 5 if path != "cpu" else [])  # 2 forward, 3 backward
    active = f.detach() > 0
    f_ours = pre * active  # the float64 code on our forward's active set
    dpre = (Rd @ W_dec.T + Pd[:, None] * sd) * active
    expected = [(xd - b_dec).T @ dpre, dpre.sum(0), f_ours.T @ Rd, Rd.sum(0) - W_enc @ dpre.sum(0), Pd @ f_ours]
    for p, ref in zip([*params, scale], expected):
        assert p.grad.dtype == torch.float32
        assert relative_error(p.grad, ref) < BF16_TOLERANCE
    assert torch.equal(l0, active.sum(dim=1, dtype=torch.int32)) and torch.equal(fired, active.sum(dim=0, dtype=torch.int32))


@CUDA
def test_cuda_kernels_in_fp32_against_their_references():
    """Each op compiled on a GPU, in fp32, at sizes that are no multiple of any block, against its PyTorch reference
    (forward and autograd's gradients): encode-ReLU-decode with its counts and L1 weights, the sparse codes' decode
    and encode, the JL penalty. The CPU suite runs the same kernels interpreted; this is the compiled code."""
    g = torch.Generator().manual_seed(0)
    N, d, s, K = 1000, 200, 1500, 32
    cuda = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).cuda()
    leaves = lambda tensors: [t.detach().clone().requires_grad_() for t in tensors]
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    x, R, P = cuda(N, d), cuda(N, d), cuda(N)
    params = [cuda(d, s, scale=0.1), cuda(s, scale=0.1), cuda(s, d, scale=0.1), cuda(d, scale=0.1), cuda(s).abs() + 0.5]
    ours, ref = leaves(params), leaves(params)
    x_hat, f, l1, l0, fired = sae_kernels.encode_relu_decode(x, *ours[:4], scale=ours[4])
    ((x_hat * R).sum() + (l1 * P).sum()).backward()
    x_ref, f_ref = sae_kernels.encode_relu_decode_ref(x, *ref[:4])[:2]
    ((x_ref * R).sum() + (f_ref @ ref[4] * P).sum()).backward()
    close(x_hat, x_ref), close(f, f_ref), close(l1, f_ref @ ref[4])
    assert torch.equal(l0, (f > 0).sum(1, dtype=torch.int32)) and torch.equal(fired, (f > 0).sum(0, dtype=torch.int32))
    for a, b in zip(ours, ref):
        close(a.grad, b.grad)
    indices = torch.stack([torch.randperm(s, generator=g)[:K] for _ in range(N)]).cuda()
    values, W_enc, b_enc, W_dec, b_dec = cuda(N, K), *params[:4]
    ours, ref = leaves((values, W_dec, b_dec, W_enc, b_enc)), leaves((values, W_dec, b_dec, W_enc, b_enc))
    for (v, Wd, bd, We, be), op in ((ours, (sae_kernels.sparse_decode, sae_kernels.sparse_encode)),
                                    (ref, (sae_kernels.sparse_decode_ref, sae_kernels.sparse_encode_ref))):
        ((op[0](indices, v, Wd, bd) * R).sum() + (op[1](x, We, be, bd, indices) * values).sum()).backward()
    for a, b in zip(ours, ref):
        close(a.grad, b.grad)
    W = torch.nn.functional.normalize(cuda(s, d), dim=1).requires_grad_()  # the JL penalty: tensor cores, its bound
    value = sae_kernels.jl_penalty(W)
    value.backward()
    assert value.item() == pytest.approx(jl_penalty_ref(W.detach().cpu().double()).item(), rel=2e-5)
    assert within_tensor_core_bound(W.grad.cpu(), W.detach().cpu(), "atanh")


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_at_every_option_against_float64(dtype):
    """The compiled kernels at the options the fp32 test above leaves out, each against float64 on the CPU (an
    independent computation), forward and every gradient: the sparse codes' decode and encode at every K the gather
    kernels' BLOCK_K follows, pre given or not, in fp32 within 1e-4 (ieee products) and bf16 within BF16_TOLERANCE;
    in fp32 only (as training runs them), a transcoder's encode-ReLU-decode (d_out != d_in, its own input bias, stats
    and L1 weights; bf16 rounding flips pre-activations near 0 across the ReLU, which the bf16 test above handles)
    and the JL penalty in each form (random rows, and pairs at |cos| 0.9 to 0.9999), within its stated bound."""
    g = torch.Generator().manual_seed(0)
    tolerance = 1e-4 if dtype == torch.float32 else BF16_TOLERANCE
    N, d, s = 300, 72, 520
    draw = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def check(op, ref, inputs, upstream):  # op on CUDA copies in dtype, ref on float64 CPU copies: outputs, gradients
        ours = [t.to("cuda", dtype).requires_grad_() for t in inputs]
        theirs = [t.clone().requires_grad_() for t in inputs]
        out, out_ref = op(*ours), ref(*theirs)
        out, out_ref = (out, out_ref) if isinstance(out, tuple) else ((out,), (out_ref,))
        for o, r in zip(out, out_ref):
            assert o.is_cuda and relative_error(o.detach().double().cpu(), r.detach()) < tolerance
        sum((o.double().cpu() * u).sum() for o, u in zip(out, upstream)).backward()
        sum((r * u).sum() for r, u in zip(out_ref, upstream)).backward()
        for a, b in zip(ours, theirs):
            assert a.grad is not None and relative_error(a.grad.double().cpu(), b.grad) < tolerance

    for K in (1, 2, 3, 8, 16, 32):
        indices = torch.stack([torch.randperm(s, generator=g)[:K] for _ in range(N)])
        check(lambda v, W, b: sae_kernels.sparse_decode(indices.cuda(), v, W, b),
              lambda v, W, b: sae_kernels.sparse_decode_ref(indices, v, W, b),
              [draw(N, K), draw(s, d, scale=0.1), draw(d, scale=0.1)], [draw(N, d)])
        x, W_enc, b_enc, b_dec = draw(N, d), draw(d, s, scale=0.1), draw(s, scale=0.1), draw(d, scale=0.1)
        pre = (x - b_dec) @ W_enc + b_enc  # (N, d) @ (d, s): what a caller that has the dense pre-activations passes
        for given in (False, True):  # x gets no gradient (the activations): a constant here
            check(lambda W, b, bd: sae_kernels.sparse_encode(x.to("cuda", dtype), W, b, bd, indices.cuda(),
                                                             pre=pre.to("cuda", dtype) if given else None),
                  lambda W, b, bd: sae_kernels.sparse_encode_ref(x, W, b, bd, indices),
                  [W_enc, b_enc, b_dec], [draw(N, K)])
    if dtype != torch.float32:
        return
    d_out = d + 24
    x = draw(N, d)  # the activations: no gradient, a constant here
    inputs = [draw(d, s, scale=0.1), draw(s, scale=0.1), draw(s, d_out, scale=0.1), draw(d_out, scale=0.1),
              draw(d, scale=0.1), draw(s).abs() + 0.5]  # W_enc, b_enc, W_dec, b_dec, b_in, scale
    def transcoder(W_enc, b_enc, W_dec, b_dec, b_in, scale):
        y_hat, f, l1, _, _ = sae_kernels.encode_relu_decode(x.to("cuda", dtype), W_enc, b_enc, W_dec, b_dec,
                                                            scale=scale, b_in=b_in)
        return y_hat, f, l1
    def transcoder_ref(W_enc, b_enc, W_dec, b_dec, b_in, scale):
        f = torch.relu((x - b_in) @ W_enc + b_enc)  # (N, d) @ (d, s)
        return f @ W_dec + b_dec, f, f @ scale       # (N, s) @ (s, d_out); (N, s) @ (s,)
    check(transcoder, transcoder_ref, inputs, [draw(N, d_out), draw(N, s), draw(N)])
    for (form, kw), W in itertools.product(FORM_CASES, (F.normalize(draw(s, d), dim=1), near_duplicate_rows())):
        W_gpu = W.to("cuda", torch.float32).requires_grad_()  # the JL penalty on tensor cores: within its bound
        value = sae_kernels.jl_penalty(W_gpu, form=form, **kw)
        value.backward()
        assert value.item() == pytest.approx(autograd_ref(W_gpu.cpu(), form, **kw)[0].item(), rel=2e-5), (form, kw)
        assert within_tensor_core_bound(W_gpu.grad.cpu(), W_gpu.detach().cpu(), form, **kw), (form, kw)


# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) below AVX-512: how an AVX2-only CPU looks to oneDNN on any x86 machine
AVX2_CAPS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI")


def cpu_flags():
    """/proc/cpuinfo's flags (read here, not through torch's cpuinfo that sae_kernels asks); skips without it."""
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    return set(next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), []))


def test_auto_dtype_follows_the_cpus_bf16_instructions():
    """--dtype=auto on the CPU: bf16 exactly where /proc/cpuinfo lists AMX or AVX512-BF16 and oneDNN is not capped
    below AVX-512; oneDNN for fp32 exactly where the CPU is not Intel's; oneDNN for bf16 exactly where the CPU has
    AVX-512 BW, VL and DQ or AVX-NE-CONVERT (what oneDNN's bf16 kernels need)."""
    flags, capped = cpu_flags(), os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in AVX2_CAPS
    native = bool({"amx_bf16", "amx_tile", "avx512_bf16"} & flags) and not capped
    assert sae.auto_dtype("cpu") == ("bfloat16" if native else "float32")
    assert sae.auto_dtype("cuda") == "bfloat16"
    intel = any(line.split(":", 1)[1].strip() == "GenuineIntel" for line in open("/proc/cpuinfo")
                if line.startswith("vendor_id"))
    assert sae_kernels.ONEDNN_FP32 == (sae_kernels.ONEDNN and not intel)
    onednn_bf16 = ({"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags) and not capped
    assert sae_kernels.ONEDNN_BF16 == (sae_kernels.ONEDNN and onednn_bf16)


def test_bf16_paths_work_on_an_avx2_cpu():
    """On an AVX2-only CPU oneDNN has no bf16 kernels, and every bf16 path must fall back to torch's
    matmul. This machine's oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA, and torch's own kernels at AVX2) is such a
    CPU: the bf16 and oneDNN tests run again there, in a fresh process (the cap is read once, when oneDNN loads),
    and the rule's test with them. Where the CPU is AVX2-only already, the suite itself is that run."""
    if not {"avx512bw", "avx512vl", "avx512dq"} <= cpu_flags() or \
            os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in AVX2_CAPS:
        pytest.skip("this CPU (or this run) is AVX2-only already: the suite's own bf16 tests are this test")
    env = {**cpu_env(), "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "test_sae_kernels.py"),
                        str(HERE / "test_sae.py"), "-k", "(bf16 or linear or count_ones or auto_dtype or bench_quick) and not avx2_cpu"],
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    summary = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 0 and " failed" not in summary, r.stdout[-3000:]
    assert re.search(r"\b(1[0-9]|[2-9][0-9]) passed", summary), summary  # the tests ran, not only their skips


def test_no_triton_forces_the_references(monkeypatch):
    monkeypatch.setattr(sae_kernels, "NO_TRITON", True)
    x_hat, f = sae_kernels.encode_relu_decode(torch.randn(3, 4), *sae_params(4, 5))[:2]
    assert type(f.grad_fn).__name__ == "ReluBackward0"
    W = torch.nn.functional.normalize(torch.randn(6, 4), dim=1).requires_grad_()
    assert "JLPenalty" not in type(sae_kernels.jl_penalty(W).grad_fn).__name__


# Python run in a process where `import triton` fails as where triton is not installed (macOS): a finder first on
# sys.meta_path refuses triton and every triton.* module
WITHOUT_TRITON = r"""
import importlib.abc, sys
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTriton())
"""

CPU_PATH_WITHOUT_TRITON = r"""
import json
import torch, torch.nn.functional as F
import sae, analyze, bench, sae_kernels
assert not sae_kernels.HAS_TRITON and not [m for m in sys.modules if m.split(".")[0] == "triton"]
torch.manual_seed(0)
N, d, m, K = 37, 13, 29, 4
model, x = sae.SAE(d, m), torch.randn(N, d)
out = model(x)  # the fused encode-ReLU-decode's CPU code
jl = sae_kernels.jl_penalty(model.dictionary())  # the blocked CPU code
((out.x_hat - x).square().sum() + out.l1.sum() + jl).backward()
params = (model.W_enc, model.b_enc, model.W_dec, model.b_dec)
W_enc, b_enc, W_dec, b_dec = plain = [p.detach().clone().requires_grad_() for p in params]
f = torch.relu((x - b_dec) @ W_enc + b_enc)  # (N, d) @ (d, m)
x_hat = f @ W_dec + b_dec                    # (N, m) @ (m, d)
U = F.normalize(W_dec, dim=1)
jl_plain = torch.atanh((U @ U.T).abs()[~torch.eye(m, dtype=torch.bool)]).mean()  # (m, d) @ (d, m); no |cos| near 1
((x_hat - x).square().sum() + f.sum() + jl_plain).backward()
close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
for ours, theirs in [(out.x_hat, x_hat), (out.f, f), (out.l1, f.sum(1)), (jl, jl_plain),
                     *((p.grad, q.grad) for p, q in zip(params, plain))]:
    close(ours, theirs)
assert torch.equal(out.l0, (f > 0).sum(1, dtype=torch.int32))
indices, values = torch.rand(N, m).topk(K, dim=1).indices, torch.randn(N, K)  # the sparse codes' CPU code
close(sae_kernels.sparse_decode(indices, values, W_dec.detach(), b_dec.detach()),
      torch.zeros(N, m).scatter(1, indices, values) @ W_dec.detach() + b_dec.detach())
close(sae_kernels.sparse_encode(x, W_enc.detach(), b_enc.detach(), b_dec.detach(), indices),
      ((x - b_dec.detach()) @ W_enc.detach() + b_enc.detach()).gather(1, indices))
sae_kernels.INTERPRET = True  # as TRITON_INTERPRET=1 asks: the Triton path, which cannot run
try:
    sae_kernels.encode_relu_decode(x, W_enc.detach(), b_enc.detach(), W_dec.detach(), b_dec.detach())
    raise AssertionError("the Triton path ran without triton")
except RuntimeError as e:
    print(json.dumps(str(e)))
"""


def test_without_triton_sae_imports_and_the_cpu_path_runs():
    """triton is optional: in a process where `import triton` fails, sae, analyze and bench import; a tiny SAE's forward
    and backward (encode-ReLU-decode's CPU code) with a JL penalty on its dictionary, and the sparse codes' ops, run
    through sae_kernels' public functions and match plain torch within fp32's rounding (1e-4 for sums of <= 37
    terms); and asking for the Triton path (TRITON_INTERPRET=1) stops with a one-line error saying what to do."""
    r = subprocess.run([sys.executable, "-c", WITHOUT_TRITON + CPU_PATH_WITHOUT_TRITON], cwd=HERE, env=cpu_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    message = json.loads(r.stdout.strip().splitlines()[-1])
    assert "\n" not in message and "triton is not installed" in message and "SAE_NO_TRITON=1" in message, message


TRITON_POINTEE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
                  torch.int64: "i64"}


def triton_type(value):
    """Triton's signature type of one launch argument, as its JIT would type it (without its specialisations)."""
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_POINTEE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    return {float: "fp32"}[type(value)]


def drive_every_launcher():
    """Every op with a Triton path, in each dtype a launcher can receive (fp32; bf16 and fp16 tensors as callers
    under autocast may pass), with every option: encode-ReLU-decode with and without per-latent L1 weights, its
    backward reached through x_hat, f and l1, and a transcoder's (d_out != d_in, b_in); the sparse codes at every K up
    to 32 (the gather kernels' BLOCK_K follows K), pre given or not; the JL penalty."""
    g = torch.Generator().manual_seed(0)
    N, d, s = 96, 40, 136
    param = lambda dtype, *shape: torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(N, d, generator=g).to(dtype)
        for scaled, reads in itertools.product((False, True), ("x_hat", "f", "l1")):
            scale = torch.rand(s, generator=g).to(dtype).requires_grad_() if scaled else None
            x_hat, f, l1, _, _ = sae_kernels.encode_relu_decode(
                x, param(dtype, d, s), param(dtype, s), param(dtype, s, d), param(dtype, d), scale=scale)
            read = {"x_hat": 0, "f": f.float().sum(), "l1": l1.float().sum()}[reads]
            (x_hat.float().sum() + read).backward()
        d_out = d + 24  # a transcoder: d_out != d_in, its own input bias
        x_hat, _ = sae_kernels.encode_relu_decode(x, param(dtype, d, s), param(dtype, s), param(dtype, s, d_out),
                                                  param(dtype, d_out), b_in=param(dtype, d))[:2]
        x_hat.float().sum().backward()
        for K in (1, 2, 3, 8, 16, 32):
            idx = torch.stack([torch.randperm(s, generator=g)[:K] for _ in range(N)])
            W_enc, b_enc, b_dec = param(dtype, d, s), param(dtype, s), param(dtype, d)
            sae_kernels.sparse_decode(idx, param(dtype, N, K), param(dtype, s, d), b_dec).float().sum().backward()
            for pre in (None, torch.randn(N, s, generator=g).to(dtype)):
                sae_kernels.sparse_encode(x, W_enc, b_enc, b_dec, idx, pre=pre).float().sum().backward()
        for form in sae_kernels.JL_FORMS:  # FORM is a constexpr: one compile each
            sae_kernels.jl_penalty(param(dtype, s, d), form=form).backward()


def jit_function(kernel):
    """The JITFunction of a kernel (an Autotuner wraps one)."""
    from triton.runtime.autotuner import Autotuner
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def record_gpu_launches():
    """-> (kernels {name: JITFunction or Autotuner}, [(name, signature items, constexpr items)]): the distinct launches
    drive_every_launcher makes when the launchers take their CUDA path (pick_path "triton", INTERPRET false)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    kernels = {name: k for name, k in vars(sae_kernels).items()  # *_kernel: launched; other jit functions
               if isinstance(k, (JITFunction, Autotuner)) and name.endswith("_kernel")}  # (_mma_bf16) inline in them
    launches = {}

    class Recorder:  # kernel[grid](*args, **constexprs): records the launch, runs nothing
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                jit = jit_function(kernels[self.name])
                signature = {n: triton_type(a) for n, a in zip(jit.arg_names, args)} | {n: "constexpr" for n in kwargs}
                launches[(self.name, tuple(signature.items()), tuple(sorted(kwargs.items())))] = None
            return launch

    saved = {name: getattr(sae_kernels, name) for name in ("INTERPRET", "NO_TRITON", "pick_path", *kernels)}
    try:
        sae_kernels.INTERPRET, sae_kernels.NO_TRITON, sae_kernels.pick_path = False, False, lambda t: "triton"
        for name in kernels:
            setattr(sae_kernels, name, Recorder(name))
        drive_every_launcher()
    finally:
        for name, value in saved.items():
            setattr(sae_kernels, name, value)
    return kernels, list(launches)


def compile_job(job):
    """One (kernel, signature, constexprs, options, capability) -> (job, shared memory bytes or None, error or None)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    name, signature, constexprs, options, capability = job
    kernel = getattr(sae_kernels, name)
    try:
        compiled = triton.compile(ASTSource(jit_function(kernel), dict(signature), constexprs=dict(constexprs)),
                                  target=GPUTarget("cuda", capability, 32), options=dict(options))
        return job, compiled.metadata.shared, None
    except Exception as e:  # reported per job: one failure must not hide the others
        return job, None, f"{type(e).__name__}: {str(e).splitlines()[-1][:300] if str(e) else ''}"


def compile_for_gpus():
    """Run in a process without TRITON_INTERPRET (the interpreter replaces triton.language): records the launches,
    compiles them for every GPU_TARGETS capability on 2 processes, prints one JSON report. Every launch compiles at
    its first autotune config, and every config compiles at each dtype's launch with the largest shared memory at
    the first config, so each kernel, signature, constexpr set, config and dtype compiles for each target, at
    half the full product's cost. Shared memory is mostly the A and B tiles the software pipeline stages (a
    config's and a dtype's); the epilogues add scratch (at 128x128x32 in fp32: 64 KB bare, 80 KB with the most).
    Triton caches each compile ($TRITON_CACHE_DIR)."""
    from concurrent.futures import ProcessPoolExecutor
    from triton.runtime.autotuner import Autotuner
    t0 = time.time()
    kernels, launches = record_gpu_launches()
    configs = {name: k.configs if isinstance(k, Autotuner) else [None] for name, k in kernels.items()}

    def job(launch, config, capability):
        name, signature, constexprs = launch
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {}
        constexprs = {**dict(constexprs), **(config.kwargs if config else {})}
        return name, signature, tuple(sorted(constexprs.items())), tuple(sorted(options.items())), capability

    firsts = [(launch, cc) for launch in launches for cc in GPU_TARGETS]
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(compile_job, [job(launch, configs[launch[0]][0], cc) for launch, cc in firsts]))
        heaviest = {}  # (kernel, dtype, capability) -> (launch, shared memory at the first config), autotuned only
        for (launch, cc), (_, shared, _) in zip(firsts, results):
            key = (launch[0], data_dtype(dict(launch[1])), cc)
            if len(configs[launch[0]]) > 1 and (shared or 0) >= heaviest.get(key, (None, -1))[1]:
                heaviest[key] = (launch, shared or 0)
        results += pool.map(compile_job, [job(launch, config, cc) for (name, _, cc), (launch, _) in heaviest.items()
                                          for config in configs[name][1:]])
    report = {"kernels": sorted(kernels), "launches": len(launches), "seconds": time.time() - t0,
              "configs": {name: [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in cs]
                          for name, cs in configs.items() if cs[0] is not None},
              "compiles": [{"kernel": job[0], "signature": dict(job[1]), "constexprs": dict(job[2]),
                            "options": dict(job[3]), "capability": job[4], "shared": shared, "error": error}
                           for job, shared, error in results]}
    print(json.dumps(report))


# -----------------------------------------------------------------------------
# sparse codes (sparse_decode, sparse_encode): both paths against the dense references

PATHS = [pytest.param("triton", marks=interpreted), "cpu"]


SIZES = [(37, 23, 101, 5), (50, 70, 130, 19)]  # N, d, n_latents, K: the second loops over K and d in the kernels


def sparse_code(N, m, K, hot=7, seed=0, dtype=torch.float32):
    """indices (N, K) int64, distinct within a row, and values (N, K): latent `hot` is chosen by three rows in four
    (more rows than one block of the scatter holds); every third row ends in two padding entries of value 0, one
    repeating the row's first index and one at latent 0."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(m - 1, generator=g)[:K] for _ in range(N)])  # (N, K) in [0, m - 1)
    indices += (indices >= hot).long()  # skips `hot`, so that setting it below keeps rows distinct
    indices[torch.arange(N) % 4 != 0, 0] = hot
    values = torch.randn(N, K, generator=g, dtype=dtype)
    pad = torch.arange(N) % 3 == 0
    indices[pad, -1], indices[pad, -2] = indices[pad, 0], 0
    values[pad, -2:] = 0
    return indices, values


def dense_params(d, m, seed=1):
    g = torch.Generator().manual_seed(seed)
    shapes = (((d, m), 0.3), ((m,), 0.1), ((m, d), 0.3), ((d,), 0.1))  # W_enc, b_enc, W_dec, b_dec
    return [torch.randn(*shape, generator=g) * scale for shape, scale in shapes]


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("N,d,m,K", SIZES)
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_decode_matches_reference(path, N, d, m, K, bias):
    indices, values = sparse_code(N, m, K)
    _, _, W_dec, b_dec = dense_params(d, m)
    R = torch.randn(N, d)  # the upstream gradient dx_hat
    results = []
    for fn in (sae_kernels.sparse_decode_ref, sae_kernels.sparse_decode):
        leaves = [t.clone().requires_grad_() for t in (values, W_dec, b_dec)]
        x_hat = fn(indices, leaves[0], leaves[1], leaves[2] if bias else None)
        (x_hat * R).sum().backward()
        results.append((x_hat, leaves))
    assert "SparseDecode" in type(x_hat.grad_fn).__name__
    (x_ref, ref), (x_hat, ours) = results
    # fp32: sums of at most K = 19 products (forward), 70 (dvalues) or 28 rows of the hot latent (dW_dec): 1e-5
    torch.testing.assert_close(x_hat, x_ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("values", "W_dec", "b_dec"), ours, ref):
        if name == "b_dec" and not bias:
            assert a.grad is None
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("N,d,m,K", SIZES)
@pytest.mark.parametrize("given_pre", [True, False])
def test_sparse_encode_matches_reference(path, N, d, m, K, given_pre):
    indices, _ = sparse_code(N, m, K)
    W_enc, b_enc, _, b_dec = dense_params(d, m)
    x = torch.randn(N, d)
    Q = torch.randn(N, K)  # the upstream gradient dvalues, nonzero at padding too: repeated indices sum
    pre = ((x - b_dec) @ W_enc + b_enc) if given_pre else None  # (N, m), no gradient, as the caller's
    results = []
    for fn in (sae_kernels.sparse_encode_ref, sae_kernels.sparse_encode):
        leaves = [t.clone().requires_grad_() for t in (W_enc, b_enc, b_dec)]
        values = fn(x, *leaves, indices, pre=pre) if fn is sae_kernels.sparse_encode else fn(x, *leaves, indices)
        (values * Q).sum().backward()
        results.append((values, leaves))
    assert "SparseEncode" in type(values.grad_fn).__name__
    (v_ref, ref), (values, ours) = results
    # fp32: dot products over d <= 70 (forward, db_dec over m = 130) and sums over <= 28 rows (dW_enc): 1e-5
    torch.testing.assert_close(values, v_ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("W_enc", "b_enc", "b_dec"), ours, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
    assert ours[0].grad.stride() == W_enc.stride()  # the transposed scatter lands in W_enc's layout


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_sparse_encode_pre_is_the_recomputed_gather(path):
    """pre= gathers what recomputing gives; the backward never reads the forward's values, so its gradients are
    the same bits."""
    N, d, m, K = SIZES[1]
    indices, _ = sparse_code(N, m, K)
    W_enc, b_enc, _, b_dec = dense_params(d, m)
    x = torch.randn(N, d)
    pre = sae_kernels.linear(x - b_dec, W_enc.T, b_enc)  # (N, m), as sae.SAE.pre computes it (oneDNN where it works)
    grads = []
    for given in (pre, None):
        leaves = [t.clone().requires_grad_() for t in (W_enc, b_enc, b_dec)]
        values = sae_kernels.sparse_encode(x, *leaves, indices, pre=given)
        values.square().sum().backward()
        grads.append((values.detach(), [p.grad for p in leaves]))
    (v_pre, g_pre), (v_new, g_new) = grads
    torch.testing.assert_close(v_pre, v_new, atol=1e-5, rtol=1e-5)  # two fp32 dot products of 70 terms
    # dvalues = 2 values differ by those roundings only, so the gradients agree to the same tolerance
    for a, b in zip(g_pre, g_new):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_sparse_ops_compose_a_transcoder(path):
    """A k-sparse transcoder's step: sparse_encode reads x (N, d_in) shifted by b_in, sparse_decode writes (N, d_out)
    from W_dec (m, d_out), d_out != d_in; the composition and every gradient against the dense reference's autograd."""
    N, d_in, d_out, m, K = 21, 19, 45, 71, 5
    indices, _ = sparse_code(N, m, K)
    g = torch.Generator().manual_seed(3)
    x, R = torch.randn(N, d_in, generator=g), torch.randn(N, d_out, generator=g)
    params = [torch.randn(*shape, generator=g) * 0.3 for shape in ((d_in, m), (m,), (d_in,), (m, d_out), (d_out,))]
    results = []
    for encode, decode in ((sae_kernels.sparse_encode_ref, sae_kernels.sparse_decode_ref),
                           (sae_kernels.sparse_encode, sae_kernels.sparse_decode)):
        W_enc, b_enc, b_in, W_dec, b_dec = leaves = [p.clone().requires_grad_() for p in params]
        y_hat = decode(indices, encode(x, W_enc, b_enc, b_in, indices).relu(), W_dec, b_dec)  # (N, d_out)
        (y_hat * R).sum().backward()
        results.append((y_hat, leaves))
    (y_ref, ref), (y_hat, ours) = results
    assert y_hat.shape == (N, d_out) and "SparseDecode" in type(y_hat.grad_fn).__name__
    torch.testing.assert_close(y_hat, y_ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("W_enc", "b_enc", "b_in", "W_dec", "b_dec"), ours, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-5, msg=lambda msg: f"d{name}: {msg}")


def test_sparse_ops_gradcheck_float64(monkeypatch):
    """The CPU path's gradients against finite differences (independent of the dense references), in float64."""
    monkeypatch.setattr(sae_kernels, "INTERPRET", False)
    monkeypatch.setattr(sae_kernels, "NO_TRITON", False)
    N, d, m, K = 9, 4, 11, 3
    indices, values = sparse_code(N, m, K, dtype=torch.float64)
    W_enc, b_enc, W_dec, b_dec = (p.double().requires_grad_() for p in dense_params(d, m))
    x = torch.randn(N, d, dtype=torch.float64)
    decode = lambda v, W, b: sae_kernels.sparse_decode(indices, v, W, b)
    assert torch.autograd.gradcheck(decode, (values.requires_grad_(), W_dec, b_dec))
    encode = lambda W, be, bd: sae_kernels.sparse_encode(x, W, be, bd, indices)
    assert torch.autograd.gradcheck(encode, (W_enc, b_enc, b_dec))


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_sparse_primitives_and_their_references_against_loops(path):
    """The three primitives (the kernels' launchers, interpreted, or the CPU code) and their references (gather_sum_ref,
    gather_dot_ref, scatter_outer_ref) against plain Python loops over the entries: a check that shares neither's
    scatter or gather. Repeated indices (the padding) included."""
    N, d, m, K = 13, 10, 17, 4
    indices, values = sparse_code(N, m, K)
    A, W = torch.randn(N, d), torch.randn(m, d)
    gather_sum, gather_dot, scatter = torch.zeros(N, d), torch.zeros(N, K), torch.zeros(m, d, dtype=torch.float64)
    for n in range(N):
        for j in range(K):
            i = indices[n, j]
            gather_sum[n] += values[n, j] * W[i]
            gather_dot[n, j] = (A[n].double() @ W[i].double()).float()
            scatter[i] += values[n, j].double() * A[n].double()
    ours = {name: getattr(sae_kernels, f"_{name}_{path}") for name in ("gather_sum", "gather_dot", "scatter_outer")}
    refs = {name: getattr(sae_kernels, f"{name}_ref") for name in ("gather_sum", "gather_dot", "scatter_outer")}
    # fp32 sums of at most K = 4 products (gather_sum), d = 10 (gather_dot), 10 rows of a latent (scatter): 1e-5
    for fns in (ours, refs):
        torch.testing.assert_close(fns["gather_sum"](indices, values, W), gather_sum, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fns["gather_dot"](A, W, indices), gather_dot, atol=1e-5, rtol=1e-5)
        out = fns["scatter_outer"](indices, values, A, m)
        assert out.dtype == torch.float32 and out.shape == (m, d)
        torch.testing.assert_close(out, scatter.float(), atol=1e-5, rtol=1e-5)
        unused = torch.ones(m, dtype=torch.bool)
        unused[indices.reshape(-1)] = False
        assert unused.any() and (out[unused] == 0).all()  # latents no row chose: zero rows, written (out is not zeroed)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("wants", ["W", "b_enc", "b_dec"])
def test_sparse_ops_give_only_the_gradients_asked_for(path, wants):
    """One parameter of each op requires a gradient: it gets the same gradient as when all do, the others none."""
    N, d, m, K = SIZES[0]
    indices, values = sparse_code(N, m, K)
    W_enc, b_enc, W_dec, b_dec = dense_params(d, m)
    x, R, Q = torch.randn(N, d), torch.randn(N, d), torch.randn(N, K)
    def grads(encode_leaves, decode_leaves):
        (sae_kernels.sparse_encode(x, *encode_leaves, indices) * Q).sum().backward()
        (sae_kernels.sparse_decode(indices, *decode_leaves) * R).sum().backward()
        return [p.grad for p in (*encode_leaves, *decode_leaves)]
    every = grads([t.clone().requires_grad_() for t in (W_enc, b_enc, b_dec)],
                  [t.clone().requires_grad_() for t in (values, W_dec, b_dec)])
    encode_asks = {"W": (True, False, False), "b_enc": (False, True, False), "b_dec": (False, False, True)}[wants]
    decode_asks = {"W": (False, True, False), "b_enc": (True, False, False), "b_dec": (False, False, True)}[wants]
    one = grads([t.clone().requires_grad_(a) for t, a in zip((W_enc, b_enc, b_dec), encode_asks)],
                [t.clone().requires_grad_(a) for t, a in zip((values, W_dec, b_dec), decode_asks)])
    for g, g_all, asked in zip(one, every, encode_asks + decode_asks):
        assert (g is None) != asked
        if asked:
            assert torch.equal(g, g_all)


def test_no_triton_forces_the_sparse_references(monkeypatch):
    monkeypatch.setattr(sae_kernels, "NO_TRITON", True)
    indices, values = sparse_code(5, 11, 3)
    W_enc, b_enc, W_dec, b_dec = (p.requires_grad_() for p in dense_params(4, 11))
    assert type(sae_kernels.sparse_decode(indices, values, W_dec, b_dec).grad_fn).__name__ == "AddBackward0"
    values = sae_kernels.sparse_encode(torch.randn(5, 4), W_enc, b_enc, b_dec, indices)
    assert type(values.grad_fn).__name__ == "GatherBackward0"


# -----------------------------------------------------------------------------
# the JL penalty: the reference against loops and autograd, both paths against it, the sampled estimate, and why
# the atanh mean collapses an overcomplete dictionary

@pytest.mark.parametrize("n,d", [(37, 11), (64, 8)])
def test_jl_reference_against_dense_loops_and_autograd(n, d):
    torch.manual_seed(n)
    W = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    W[5] = W[3]  # a duplicate row: |cos| = 1 is clamped, and still pushed apart
    W.requires_grad_(True)
    value = jl_penalty_ref(W)
    value.backward()
    Wn = W.detach().numpy()
    G = Wn @ Wn.T
    off = ~np.eye(n, dtype=bool)
    g = np.minimum(np.abs(G), 1 - JL_EPS)
    assert value.item() == pytest.approx(np.arctanh(g[off]).mean(), rel=1e-6)
    S = np.where(off, np.sign(G) / (1 - g ** 2), 0.0)  # the slope at the clamped value
    expected_grad = 2 * S @ Wn / (n * (n - 1))
    np.testing.assert_allclose(W.grad.numpy(), expected_grad, rtol=1e-5, atol=1e-9)
    assert np.isfinite(value.item()) and np.abs(W.grad[5].numpy()).sum() > 0
    # away from the clamp the reference is exactly atanh's derivative: check with finite differences
    V = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).requires_grad_(True)
    assert torch.autograd.gradcheck(jl_penalty_ref, (V,))


def dense_mean_max_cos(W):
    """Mean over rows of the largest |cos| with another row, from the dense Gram matrix (a reference, in W's dtype)."""
    W = torch.nn.functional.normalize(W, dim=1)
    return (W @ W.T).abs().fill_diagonal_(0).max(dim=1).values.mean().item()  # (n, d) @ (d, n) -> (n, n)


def dense_max_cos(W):
    """The largest |cos| of any pair of rows."""
    W = F.normalize(W, dim=1)
    return (W @ W.T).abs().fill_diagonal_(0).max().item()  # (n, d) @ (d, n) -> (n, n)


@pytest.fixture
def one_thread():
    """For the tests of small tensors (256 x 256): a second thread gains nothing there, and with the host's other core
    busy OpenMP's barriers made each elementwise op 36x slower (abs and pow of 256 x 256 float64: 15.8 ms on two
    threads, 0.44 ms on one), the toy test 12 s -> 4 min."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit_rows(n, d, seed=0, duplicate=True):
    """Random unit rows; with duplicate, rows 3 and 5 equal, row 9 within 1e-4 of them (past atanh's clamp), and rows
    0 and 1 the first two axes, so G_01 = 0 exactly (where sign(G) = 0 and every form's slope must be 0)."""
    W = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)
    if duplicate:
        W[5] = W[3]
        W[9] = F.normalize(W[3] + 1e-4 * torch.randn(d, generator=torch.Generator().manual_seed(seed + 1)), dim=0)
        W[0], W[1] = torch.eye(d)[0], torch.eye(d)[1]
    return W


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("n,d", [(70, 33), (37, 11), (129, 50)])
def test_jl_penalty_matches_reference(path, n, d, monkeypatch):
    round_bf16_casts(monkeypatch)  # the Triton path rounds as a GPU does
    W_ref, W = unit_rows(n, d).requires_grad_(), unit_rows(n, d).requires_grad_()
    value_ref, value = jl_penalty_ref(W_ref), sae_kernels.jl_penalty(W)
    assert "JLPenalty" in type(value.grad_fn).__name__
    (3.0 * value_ref).backward()
    (3.0 * value).backward()  # the backward scales the saved gradient
    if path == "triton":  # tensor cores: the value as fp32's, the gradient within its stated bound
        assert value.item() == pytest.approx(value_ref.item(), rel=2e-5)
        assert within_tensor_core_bound(W.grad, W, "atanh", scale=3.0) and W.grad[5].abs().sum() > 0
        return
    # fp32: G entries are dot products of <= 50 terms, so 1e-5 relative. Past the clamp the slope 1/(1 - g^2)
    # at g = 1 - 1e-4 is 5e3 and fp32's rounding of 1 - g^2 (2e-4) is 3e-4 relative (an FMA rounds once,
    # torch twice): rows 3, 5 and 9, the near-duplicates, get 1e-3 of their largest entry
    torch.testing.assert_close(value, value_ref, atol=1e-6, rtol=1e-5)
    near = torch.zeros(n, dtype=torch.bool)
    near[[3, 5, 9]] = True
    torch.testing.assert_close(W.grad[~near], W_ref.grad[~near], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(W.grad[near], W_ref.grad[near], atol=1e-3 * W_ref.grad[near].abs().max().item(), rtol=0)
    assert torch.isfinite(value) and torch.isfinite(W.grad).all() and W.grad[5].abs().sum() > 0


@pytest.mark.parametrize("block", [7, 32, 1000])
def test_jl_blocked_is_exact_for_any_block(block):
    W = unit_rows(61, 19, seed=3).double()  # float64: the blocked sums against the dense ones, tightly
    Wr = W.clone().requires_grad_()
    jl_penalty_ref(Wr).backward()
    value, grad = sae_kernels._jl_cpu(W, block=block)
    assert value.item() == pytest.approx(jl_penalty_ref(W).item(), rel=1e-12)
    torch.testing.assert_close(grad, Wr.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_jl_penalty_trains_like_the_dense_reference_under_adam(path):
    """The penalty the JL comparisons train with (sae_kernels.jl_penalty, exact) takes Adam along the same path as the
    dense autograd reference: 40 steps of a toy reconstruction + JL loss on unit-norm rows, same start, same data."""
    n, d = 48, 12
    x = torch.randn(256, d, generator=torch.Generator().manual_seed(1))
    start = 0.3 * torch.randn(n, d, generator=torch.Generator().manual_seed(2))

    def train(jl):
        W = torch.nn.Parameter(start.clone())
        optimizer = torch.optim.Adam([W], lr=3e-3)
        for _ in range(40):
            U = torch.nn.functional.normalize(W, dim=1)
            recon = torch.relu(x @ U.T) @ U  # (256, d) @ (d, n) -> (256, n); @ (n, d) -> (256, d)
            loss = (recon - x).square().mean() + 3.0 * jl(U)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return W.detach()

    ours, reference = train(sae_kernels.jl_penalty), train(jl_penalty_ref)
    assert (ours - start).abs().max() > 0.05  # it moved
    # the kernel's gradient is within TC_GRAD_BOUND (2^-7) of its terms, and Adam's step is about lr per entry
    # whatever the gradient's size: 40 steps of 3e-3 move at most 40 * 3e-3 * 2^-7 = 1e-3 apart (measured 2.3e-4)
    atol = 1e-3 if path == "triton" else 1e-5
    torch.testing.assert_close(ours, reference, atol=atol, rtol=1e-4)


def test_jl_sampled_follows_the_exact_penalty_under_sgd_not_under_adam():
    """docs/results.md "the JL penalty, measured": the sampled estimate is unbiased, so plain SGD on it follows SGD on the
    exact penalty; Adam does not, since it divides each coordinate by its gradient's running RMS and an
    intermittent gradient (a row's own-side term arrives m/n of the time, n/m times larger) has a larger RMS for
    the same mean. JL alone on n = 8 d unit rows, 200 steps, float64 dense references."""
    n, d, m = 256, 32, 32
    init = 0.1 * torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def train(optimizer_class, lr, sample):
        W = torch.nn.Parameter(init.clone())
        optimizer, rows = optimizer_class([W], lr=lr), torch.Generator().manual_seed(1)
        for _ in range(200):
            U = torch.nn.functional.normalize(W, dim=1)
            loss = sae_kernels.jl_penalty_sampled(U, sample, rows) if sample else jl_penalty_ref(U)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return dense_mean_max_cos(W.detach())

    start = dense_mean_max_cos(init)
    sgd_exact, sgd_sampled = train(torch.optim.SGD, 30.0, 0), train(torch.optim.SGD, 30.0, m)
    adam_exact, adam_sampled = train(torch.optim.Adam, 1e-3, 0), train(torch.optim.Adam, 1e-3, m)
    assert sgd_exact > start + 0.2 and adam_exact > start + 0.2  # both optimizers collapse rows on the exact one
    assert abs(sgd_sampled - sgd_exact) < 0.05                 # SGD: the estimate trains like the exact penalty
    assert adam_exact - adam_sampled > 0.15                    # Adam: it does not (here it collapses more slowly)


def test_jl_sampled_is_unbiased():
    n, d, m, draws = 64, 12, 8, 2000
    W = unit_rows(n, d, seed=4, duplicate=False)
    Wr = W.clone().requires_grad_()
    exact = jl_penalty_ref(Wr)
    exact.backward()
    g = torch.Generator().manual_seed(0)
    values, grads = [], []
    for _ in range(draws):
        Ws = W.clone().requires_grad_()
        v = sae_kernels.jl_penalty(Ws, sample=m, generator=g)
        v.backward()
        values.append(v.item())
        grads.append(Ws.grad)
    values, grads = torch.tensor(values), torch.stack(grads)
    # the mean of 2000 draws lies within 4 standard errors of the exact value (fails by chance ~1 in 15,000)
    assert abs(values.mean() - exact.item()) < 4 * values.std() / draws ** 0.5
    stderr = grads.std(dim=0) / draws ** 0.5
    assert ((grads.mean(dim=0) - Wr.grad).abs() < 5 * stderr + 1e-7).float().mean() > 0.99
    full = sae_kernels.jl_penalty(W, sample=n)  # all rows: no sampling
    assert full.item() == pytest.approx(exact.item(), rel=1e-5)


def test_jl_mean_rewards_clusters_of_duplicates_when_rows_outnumber_dimensions():
    """Why JL collapses an overcomplete dictionary (docs/results.md "the JL penalty, measured"): the mean of
    atanh |cos| over pairs acts like an L1 penalty on the Gram matrix, so with n = 8 d rows it is lower for 8
    copies of an orthonormal basis (each row exactly orthogonal to all but its 7 duplicates) than for random
    rows, and Adam on the exact penalty alone, from random rows, drives rows together: the penalty falls below
    even the copies' value while the mean max |cos| climbs to 0.9. Dense float64 reference throughout."""
    d, copies = 32, 8
    n = d * copies
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0]
    clusters = jl_penalty_ref(basis.repeat(copies, 1)).item()
    assert clusters == pytest.approx((copies - 1) * np.arctanh(1 - JL_EPS) / (n - 1), rel=1e-9)  # 7 duplicates a row
    random_rows = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    assert clusters < 0.95 * jl_penalty_ref(random_rows).item()

    W = torch.nn.Parameter(0.1 * torch.randn(n, d, dtype=torch.float64))
    optimizer = torch.optim.Adam([W], lr=3e-3)  # the experiments' rate
    start = dense_mean_max_cos(W.detach())
    for _ in range(200):
        loss = jl_penalty_ref(F.normalize(W, dim=1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = F.normalize(W.detach(), dim=1)
    assert jl_penalty_ref(end).item() < clusters  # it found something lower than the copies
    assert start < 0.6 and dense_mean_max_cos(end) > 0.85  # by collapsing rows onto each other


# the forms: power (the p-frame potential) and welch (the squared excess over the Welch bound) beside
# atanh, against numpy loops over pairs, autograd on the dense reference, and closed forms

# each form's settings, as the tests parametrise them: (form, keyword arguments)
FORM_CASES = [("atanh", {}), ("power", {"power": 1.0}), ("power", {"power": 2.0}), ("power", {"power": 2.5}),
              ("power", {"power": 4.0}), ("welch", {}), ("welch", {"margin": 0.3})]
FORM_IDS = ["atanh", "p1", "p2", "p2.5", "p4", "welch", "welch0.3"]


def numpy_penalty(W, form, power=4.0, margin=0.0):
    """The definition, pair by pair in float64 numpy: value = mean over i != j of phi(|G_ij|), and the gradient
    2 / (n (n - 1)) sum_j sign(G_ij) phi'(|G_ij|) W_j (np.sign(0) = 0: no slope at G_ij = 0). -> (value, grad (n, d))"""
    W = W.detach().double().numpy()
    n, d = W.shape
    welch, gerzon = (math.sqrt((n - d) / (d * (n - 1))) if n > d else 0.0), d * (d + 1) / 2  # Welch 1974
    levenshtein = math.sqrt((3 * n - d * d - 2 * d) / ((d + 2) * (n - d))) if n > gerzon else 0.0  # past Gerzon's
    mu = margin if margin > 0 else (welch if n <= gerzon else levenshtein)
    total, grad = 0.0, np.zeros_like(W)
    for i in range(n):
        for j in range(i + 1, n):
            G = float(W[i] @ W[j])
            g = abs(G)
            if form == "atanh":
                c = min(g, 1 - JL_EPS)
                phi, slope = math.atanh(c), 1 / (1 - c * c)
            elif form == "power":
                phi, slope = g ** power, power * g ** (power - 1)  # 0 ** 0 = 1 at p = 1, times sign 0 below
            else:
                phi, slope = max(g - mu, 0.0) ** 2, 2 * max(g - mu, 0.0)
            total += 2 * phi  # the pair (i, j) and its mirror (j, i)
            grad[i] += np.sign(G) * slope * W[j]
            grad[j] += np.sign(G) * slope * W[i]
    pairs = n * (n - 1)
    return total / pairs, torch.from_numpy(grad * 2 / pairs)


def autograd_ref(W, form, **kw):
    """(value, grad) of the dense reference in float64, by autograd."""
    Wr = W.detach().double().requires_grad_()
    value = jl_penalty_ref(Wr, form, **kw)
    value.backward()
    return value.detach(), Wr.grad


# The tensor-core kernel's stated bound (sae_kernels, "JL penalty"): each gradient entry within TC_GRAD_BOUND of M,
# the sum of its terms' magnitudes, the terms S_ij W_jk each rounded twice to bf16 (2u + u^2, u = 2^-8)
TC_GRAD_BOUND = 2.0**-7 + 2.0**-16


def pair_slopes(G, form, d, power=4.0, margin=0.0):
    """Each off-diagonal pair's phi(|G_ij|) and its slope S_ij = sign(G_ij) phi'(|G_ij|) (float64, by autograd on
    jl_pairs_ref), G (n, n) from rows in d dimensions; the diagonal is 0 in both. -> (phi, S)"""
    n = G.shape[0]
    G = G.detach().double().requires_grad_()
    phi = sae_kernels.jl_pairs_ref(G, form, power, sae_kernels.jl_margin(form, power, margin, n, d))
    phi = phi * ~torch.eye(n, dtype=torch.bool)
    phi.sum().backward()
    return phi.detach(), G.grad


def tensor_core_emulation(W, form, split=True, **kw):
    """The JL penalty as the tensor-core kernel computes it, in float64: G from W's bf16 split (three products, each
    exact; split=False: hi @ hi^T alone, one bf16 pass), the slopes times 2 / (n (n - 1)) rounded to bf16 (to nearest
    even), times hi. -> (value, grad)"""
    n, d = W.shape
    hi, lo = (t.double() for t in sae_kernels.split_bf16(W.detach().float()))
    G = hi @ lo.T + lo @ hi.T + hi @ hi.T if split else hi @ hi.T  # (n, d) @ (d, n) -> (n, n), each
    phi, S = pair_slopes(G, form, d, **kw)
    pairs = n * (n - 1)
    return phi.sum().item() / pairs, (S * (2 / pairs)).bfloat16().double() @ hi  # (n, n) @ (n, d)


def term_magnitudes(W, form, **kw):
    """M = 2 / (n (n - 1)) |S| @ |W| (float64, S the exact slopes): each gradient entry's sum of its terms'
    magnitudes, the scale of the tensor-core kernel's bound."""
    W = W.detach().double()
    n, d = W.shape
    return pair_slopes(W @ W.T, form, d, **kw)[1].abs() @ W.abs() * (2 / (n * (n - 1)))  # (n, n) @ (n, d)


def within_tensor_core_bound(grad, W, form, scale=1.0, **kw):
    """Whether every entry of grad (scale times the penalty's gradient) lies within TC_GRAD_BOUND * M of float64's."""
    exact = scale * autograd_ref(W, form, **kw)[1]
    return bool(((grad.double() - exact).abs() <= TC_GRAD_BOUND * scale * term_magnitudes(W, form, **kw) + 1e-15).all())


# -----------------------------------------------------------------------------
# each form against the references, on both paths

@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("n,d", [(70, 33), (37, 11), (129, 50)])
@pytest.mark.parametrize("form,kw", FORM_CASES, ids=FORM_IDS)
def test_jl_form_matches_dense_reference_and_numpy_loops(path, n, d, form, kw, monkeypatch):
    round_bf16_casts(monkeypatch)  # the Triton path rounds as a GPU does
    W32 = unit_rows(n, d).requires_grad_()
    value = sae_kernels.jl_penalty(W32, form=form, **kw)
    assert "JLPenalty" in type(value.grad_fn).__name__  # the kernel or the blocked path, not the reference
    (3.0 * value).backward()  # the backward scales the saved gradient
    value_ref, grad_ref = autograd_ref(W32, form, **kw)
    value_np, grad_np = numpy_penalty(W32, form, **kw)
    assert value_ref.item() == pytest.approx(value_np, rel=1e-12)  # the reference is the definition (float64)
    torch.testing.assert_close(grad_ref, grad_np, atol=1e-15, rtol=1e-10)
    if path == "triton":  # tensor cores: G from the bf16 split as good as fp32's (measured <= 7e-6 relative on the
        # value), each gradient entry within its stated bound (measured <= 0.006 of M, the bound 0.0078)
        assert value.item() == pytest.approx(value_np, rel=2e-5)
        assert within_tensor_core_bound(W32.grad, W32, form, scale=3.0, **kw)
        assert torch.isfinite(W32.grad).all() and W32.grad[5].abs().sum() > 0
        return
    # fp32 against float64: G's entries are dot products of <= 50 terms (1e-7 relative), the value a sum of <= 16k
    # pairs: measured <= 2e-7 relative, so 2e-6. Each gradient entry is a sum of n terms of either sign, so its error
    # scales with the largest entry, not its own: measured <= 4e-7 of the largest, so 1e-5 of it
    assert value.item() == pytest.approx(value_np, rel=2e-6)
    grad, expect = W32.grad.double(), 3.0 * grad_np
    scale = expect.abs().max().item()
    near = torch.zeros(n, dtype=torch.bool)
    if form == "atanh":  # past the clamp the slope 1/(1 - g^2) = 5e3 and fp32 rounds 1 - g^2 (2e-4) to 3e-4 relative
        near[[3, 5, 9]] = True
        torch.testing.assert_close(grad[near], expect[near], atol=1e-3 * expect[near].abs().max().item(), rtol=0)
    torch.testing.assert_close(grad[~near], expect[~near], atol=1e-5 * scale, rtol=1e-4)
    assert torch.isfinite(W32.grad).all() and W32.grad[5].abs().sum() > 0  # no NaN from g = 0 (log2 0 at p = 1)


@pytest.mark.parametrize("block", [7, 32, 1000])
@pytest.mark.parametrize("form,kw", FORM_CASES, ids=FORM_IDS)
def test_jl_form_blocked_is_exact_for_any_block(block, form, kw):
    W = unit_rows(61, 19, seed=3).double()  # float64: the blocked sums against the dense ones, tightly
    mu = sae_kernels.jl_margin(form, kw.get("power", 4.0), kw.get("margin", 0.0), *W.shape)
    value, grad = sae_kernels._jl_cpu(W, block=block, form=form, power=kw.get("power", 4.0), mu=mu)
    value_ref, grad_ref = autograd_ref(W, form, **kw)
    assert value.item() == pytest.approx(value_ref.item(), rel=1e-12)
    assert value.item() == pytest.approx(numpy_penalty(W, form, **kw)[0], rel=1e-12)
    torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=1e-10)


@interpreted
@pytest.mark.parametrize("form,kw", FORM_CASES, ids=FORM_IDS)
def test_jl_kernel_matches_its_tensor_core_emulation(form, kw, monkeypatch):
    """The interpreted kernel against tensor_core_emulation, an independent float64 computation of the same roundings
    (the bf16 split, exact products, the slopes rounded to bf16): the value within 5e-6 (fp32's sums), the gradient
    within 1e-6 of its largest entry. At atanh's near-duplicates (rows 3, 5, 9: past the clamp, the slope 5e3) fp32's
    slope and float64's may round to neighbouring bf16s: those rows within TC_GRAD_BOUND of M."""
    round_bf16_casts(monkeypatch)
    monkeypatch.setattr(sae_kernels, "INTERPRET", True)
    W = unit_rows(70, 33).requires_grad_()
    value = sae_kernels.jl_penalty(W, form=form, **kw)
    value.backward()
    value_tc, grad_tc = tensor_core_emulation(W, form, **kw)
    assert value.item() == pytest.approx(value_tc, rel=5e-6)
    near = torch.zeros(70, dtype=torch.bool)
    near[[3, 5, 9]] = form == "atanh"
    error = (W.grad.double() - grad_tc).abs()
    assert error[~near].max() <= 1e-6 * grad_tc.abs().max()
    assert (error[near] <= TC_GRAD_BOUND * term_magnitudes(W, form, **kw)[near]).all()


def near_duplicate_rows(n=96, d=40, seed=0):
    """Random unit rows (float64) but for four pairs at |cos| 0.9, 0.99, 0.999 and 0.9999: rows 2k and 2k + 1."""
    W = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)
    for k, c in enumerate([0.9, 0.99, 0.999, 0.9999]):
        u = W[2 * k]
        v = F.normalize(W[2 * k + 1] - (W[2 * k + 1] @ u) * u, dim=0)  # a unit vector orthogonal to u
        W[2 * k + 1] = c * u + (1 - c * c) ** 0.5 * v
    return W


@pytest.mark.parametrize("form,kw", FORM_CASES, ids=FORM_IDS)
def test_the_gram_needs_the_bf16_split_where_slopes_jump(form, kw):
    """The error analysis behind the kernel's precision, on emulations (float64, no kernel): with G from the bf16
    split, every form's gradient is within TC_GRAD_BOUND of M at pairs up to |cos| 0.9999, the value within 1e-5.
    With one bf16 pass (G off by up to 2^-7), the forms whose slope jumps or is steep miss it: atanh (sign flips of
    its slope near G = 0, and 1 / (1 - g^2) near 1: measured 1.2 M), power at p = 1 (the sign flips) and welch at a
    margin of 0.3 (pairs near the hinge), and every value moves 1e-4 to 1e-3; the smooth ones (p >= 2, welch at the
    Welch bound, whose hinge no pair of this draw nears) stay within it."""
    W = near_duplicate_rows()
    value = autograd_ref(W, form, **kw)[0].item()
    bound = TC_GRAD_BOUND * term_magnitudes(W, form, **kw)
    exact = autograd_ref(W, form, **kw)[1]
    value_split, grad_split = tensor_core_emulation(W, form, **kw)
    assert value_split == pytest.approx(value, rel=1e-5)
    assert ((grad_split - exact).abs() <= bound).all()
    value_one, grad_one = tensor_core_emulation(W, form, split=False, **kw)
    jumps = form == "atanh" or kw in ({"power": 1.0}, {"margin": 0.3})
    assert ((grad_one - exact).abs() <= bound).all() != jumps
    assert abs(value_one / value - 1) > 5e-5  # measured 1.1e-4 (p = 1) to 8.4e-4 (atanh)


def test_jl_forms_defaults():
    """jl_penalty(W) is the atanh form; power defaults to 4; welch's margin to the Welch bound."""
    W = unit_rows(40, 13).double()
    assert sae_kernels.jl_penalty(W).item() == sae_kernels.jl_penalty(W, form="atanh").item()
    assert jl_penalty_ref(W, "power").item() == jl_penalty_ref(W, "power", power=4.0).item()
    bound = welch_bound(40, 13)
    assert jl_penalty_ref(W, "welch").item() == jl_penalty_ref(W, "welch", margin=bound).item()
    assert JL_FORMS == ("atanh", "power", "welch")


def test_no_triton_forces_the_reference_for_every_form(monkeypatch):
    """SAE_NO_TRITON=1 hands each form's settings to jl_penalty_ref."""
    monkeypatch.setattr(sae_kernels, "NO_TRITON", True)
    W = unit_rows(30, 7).double().requires_grad_()
    for form, kw in FORM_CASES:
        value = sae_kernels.jl_penalty(W, form=form, **kw)
        assert "JLPenalty" not in type(value.grad_fn).__name__
        assert value.item() == pytest.approx(numpy_penalty(W, form, **kw)[0], rel=1e-12), (form, kw)


# -----------------------------------------------------------------------------
# the forms at n = 8 d (4,608 rows in R^576), against closed forms

def abs_moment(d, q):
    """E|t|^q for t one coordinate of a uniform unit vector in R^d: Gamma(d/2) Gamma((q+1)/2) / (sqrt(pi) Gamma((d+q)/2))
    (the density of t is proportional to (1 - t^2)^((d-3)/2)); q = 2 gives 1/d, q = 4 gives 3/(d(d+2))."""
    return math.exp(math.lgamma(d / 2) + math.lgamma((q + 1) / 2) - math.lgamma((d + q) / 2)) / math.sqrt(math.pi)


def excess_moment(d, mu, q, points=400_001):
    """E relu(|t| - mu)^q for the same t, by the trapezoid rule on [mu, 1] of the density 2 c (1 - t^2)^((d-3)/2)."""
    t = np.linspace(mu, 1, points)
    log_c = math.lgamma(d / 2) - math.lgamma((d - 1) / 2) - 0.5 * math.log(math.pi)
    density = np.zeros_like(t)  # 0 at t = 1 for d > 3
    density[:-1] = 2 * np.exp(log_c + (d - 3) / 2 * np.log1p(-t[:-1] ** 2))
    return np.trapezoid((t - mu) ** q * density, t)


def test_jl_forms_at_eight_times_overcomplete_duplicates_against_random_rows():
    """n = 4,608 rows in d = 576 (8 d): 8 stacked copies of an orthonormal basis against random unit rows, float64,
    dense reference. Copies: each row has 7 duplicates (|cos| = 1) and is orthogonal to the rest, so the power mean
    is 7/(n - 1) at every p and welch's 7 (1 - mu)^2/(n - 1). Random rows: the mean over pairs of phi(|cos|) of
    pairwise independent pairs (cos_ij and cos_ik are independent given row i, and neither depends on it), so it is
    E phi within 5 standard errors sqrt(Var phi / (n (n-1)/2)), from the moments of a uniform unit vector."""
    copies, d = 8, 576
    n = copies * d
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    stacked = basis.repeat(copies, 1)                                              # (n, d)
    rows = F.normalize(torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), dim=1)
    pairs = n * (n - 1) / 2
    mu = welch_bound(n, d)
    assert mu == pytest.approx(math.sqrt(4032 / (576 * 4607)), rel=1e-15) and round(mu, 3) == 0.039
    measured = {}
    for p in (1.0, 2.0, 4.0):
        dup, rnd = jl_penalty_ref(stacked, "power", power=p).item(), jl_penalty_ref(rows, "power", power=p).item()
        mean, var = abs_moment(d, p), abs_moment(d, 2 * p) - abs_moment(d, p) ** 2
        assert dup == pytest.approx(7 / (n - 1), rel=1e-9)  # 1.52e-3
        assert abs(rnd - mean) < 5 * math.sqrt(var / pairs), (p, rnd, mean)
        measured[p] = dup, rnd
    assert abs_moment(d, 2) == pytest.approx(1 / d) and abs_moment(d, 4) == pytest.approx(3 / (d * (d + 2)))
    assert abs(measured[1.0][1] - 0.0333) < 5e-4 and measured[1.0][0] < measured[1.0][1] / 20  # p = 1 prefers copies
    # p = 2: the frame potential's minimum over unit rows is (n/d - 1)/(n - 1) (tight frames); the copies are one
    assert measured[2.0][0] == pytest.approx((n / d - 1) / (n - 1), rel=1e-9) and measured[2.0][0] <= measured[2.0][1]
    assert measured[2.0][1] == pytest.approx(1 / d, rel=2e-3) and measured[2.0][1] / measured[2.0][0] < 1.15
    assert measured[4.0][1] == pytest.approx(9.0e-6, rel=0.01) and measured[4.0][0] > 100 * measured[4.0][1]
    dup, rnd = jl_penalty_ref(stacked, "welch").item(), jl_penalty_ref(rows, "welch").item()
    assert excess_moment(d, 0.0, 2) == pytest.approx(1 / d, rel=1e-9)  # the quadrature is that accurate
    mean, var = excess_moment(d, mu, 2), excess_moment(d, mu, 4) - excess_moment(d, mu, 2) ** 2
    assert dup == pytest.approx(7 * (1 - mu) ** 2 / (n - 1), rel=1e-9)  # 1.40e-3
    assert abs(rnd - mean) < 5 * math.sqrt(var / pairs), (rnd, mean)   # 3.0e-4
    assert dup > 4 * rnd


def etf(name):
    """Equiangular tight frames, unit rows: every |cos| equals the Welch bound. The Mercedes-Benz frame (3 in R^2),
    the tetrahedron's 4 vertex lines and the icosahedron's 6 diagonals (R^3)."""
    phi = (1 + 5 ** 0.5) / 2
    rows = {"mercedes": [[math.cos(a), math.sin(a)] for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)],
            "tetrahedron": [[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]],
            "icosahedron": [[0, 1, phi], [0, 1, -phi], [1, phi, 0], [1, -phi, 0], [phi, 0, 1], [-phi, 0, 1]]}[name]
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)


@pytest.mark.parametrize("name,bound", [("mercedes", 1 / 2), ("tetrahedron", 1 / 3), ("icosahedron", 5 ** -0.5)])
def test_jl_forms_at_equiangular_tight_frames(name, bound):
    """welch is 0 exactly at the spread optimum and > 0 off it; the Welch bound is each ETF's |cos|."""
    W = etf(name)
    n, d = W.shape
    assert welch_bound(n, d) == pytest.approx(bound, rel=1e-15) and dense_max_cos(W) == pytest.approx(bound, rel=1e-15)
    assert jl_penalty_ref(W, "welch").item() < 1e-30
    moved = F.normalize(W + 0.01 * torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=1)
    assert jl_penalty_ref(moved, "welch").item() > 1e-8


def test_jl_power_prefers_the_icosahedron_to_duplicates_above_p_2():
    """6 unit rows in R^3: the icosahedron's diagonals (|cos| = 1/sqrt 5 for every pair) against two copies of an
    orthonormal basis (each row 1 duplicate, 4 orthogonal rows). p = 1 prefers the copies (1/5 < 1/sqrt 5); p = 2
    ties (both tight frames: (n/d - 1)/(n - 1) = 1/5); p = 4 prefers the icosahedron (1/25 < 1/5), which reaches the
    lower bound (n * 3/(d (d+2)) - 1)/(n - 1) of sum_ij G_ij^4 >= n^2 E t^4 (Welch 1974: a projective 2-design)."""
    ico, copies = etf("icosahedron"), torch.eye(3, dtype=torch.float64).repeat(2, 1)
    power = lambda W, p: jl_penalty_ref(W, "power", power=p).item()
    assert power(copies, 1) == pytest.approx(1 / 5) and power(ico, 1) == pytest.approx(5 ** -0.5)
    assert power(copies, 2) == pytest.approx(1 / 5) and power(ico, 2) == pytest.approx(1 / 5)
    assert power(copies, 4) == pytest.approx(1 / 5) and power(ico, 4) == pytest.approx(1 / 25)
    assert power(ico, 4) == pytest.approx((6 * 3 / (3 * 5) - 1) / 5)
    assert jl_penalty_ref(copies, "welch").item() == pytest.approx((1 - 5 ** -0.5) ** 2 / 5)


def penalty_alone(n, d, form="welch", steps=1500, seed=0, init=None, **kw):
    """Unit rows after Adam (lr 1e-2) on one form of the penalty alone, from random rows (or init), float32, the dense
    reference: where each form's minimiser takes a dictionary. -> rows (n, d)"""
    start = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) if init is None else init
    W = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([W], lr=1e-2)
    for _ in range(steps):
        loss = jl_penalty_ref(F.normalize(W, dim=1), form, **kw)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return F.normalize(W.detach(), dim=1)


def test_welch_keeps_rows_apart_at_its_default_margin(one_thread):
    """Past n = d (d + 1) / 2 (256 rows in R^16, past 136) the Welch bound cannot be met, and welch at it prefers
    duplicates: Adam on welch alone, from rows spread by power p = 4, lowers welch's value while pairing rows up (93
    pairs past |cos| 0.9, measured). At the default margin (coherence_bound: Levenshtein's here, 0.333 against
    Welch's 0.243) no pair passes 0.9 and the rows end more spread than p = 4 leaves them. Under the Gerzon bound
    (100 rows in R^16) the default is Welch's, and no pair passes 0.9 from random rows either. (At 1024
    in R^32 from random rows: at Welch's bound a pair at 1.000, mean max |cos| 0.69 after 5000 steps; at the default
    0.53 and 0.39, p = 4 0.49 and 0.41: `penalty_alone(1024, 32, margin=...)`.)"""
    n, d = 256, 16
    pairs = lambda U: (F.normalize(U, dim=1) @ F.normalize(U, dim=1).T).abs().fill_diagonal_(0)  # (n, n)
    spread = penalty_alone(n, d, "power", power=4.0)
    welch = lambda U, margin=0.0: jl_penalty_ref(U, "welch", margin=margin).item()
    at_welch = penalty_alone(n, d, init=spread, margin=welch_bound(n, d))
    assert sae_kernels.coherence_bound(n, d) > welch_bound(n, d) + 0.05
    assert pairs(spread).max() < 0.7
    assert welch(at_welch, welch_bound(n, d)) < welch(spread, welch_bound(n, d))  # the form prefers the duplicates
    assert (pairs(at_welch) > 0.9).sum() // 2 >= 50
    at_default = penalty_alone(n, d, init=spread)
    assert pairs(at_default).max() < 0.9 and pairs(at_default).max(1).values.mean() < pairs(spread).max(1).values.mean()
    assert welch(at_default) < welch(spread)
    assert sae_kernels.coherence_bound(100, d) == welch_bound(100, d)
    assert pairs(penalty_alone(100, d)).max() < 0.9


def test_coherence_bound_is_welchs_up_to_the_gerzon_bound_and_levenshteins_past_it():
    """At n = d (d + 1) / 2 both bounds are 1 / sqrt(d + 2) (the switch is continuous); past it Levenshtein's is the
    larger (a bound on more rows); and the bound is a bound, near the best packings: the 6 diagonals of the
    icosahedron in R^3 (n = 6 = the Gerzon bound) meet it; the best 7 lines in R^3 (the cube's 3 axes and 4
    diagonals, largest |cos| 1/sqrt 3 = 0.577; Conway, Hardin and Sloane 1996, "Packing lines, planes, etc.") lie
    just above Levenshtein's 0.548, well above Welch's 0.471."""
    for d in (3, 16, 32, 768):
        gerzon = d * (d + 1) // 2
        assert sae_kernels.coherence_bound(gerzon, d) == pytest.approx((d + 2) ** -0.5, rel=1e-12)
        assert sae_kernels.coherence_bound(4 * gerzon, d) > welch_bound(4 * gerzon, d)
    assert dense_max_cos(etf("icosahedron")) == pytest.approx(sae_kernels.coherence_bound(6, 3), rel=1e-12)
    seven = torch.cat([torch.eye(3, dtype=torch.float64), etf("tetrahedron")])  # the tetrahedron's = the cube's diagonals
    assert dense_max_cos(seven) == pytest.approx(3 ** -0.5, rel=1e-12)
    assert sae_kernels.coherence_bound(7, 3) == pytest.approx(0.3 ** 0.5)  # (21 - 9 - 6) / (5 * 4)
    assert 3 ** -0.5 > sae_kernels.coherence_bound(7, 3) > welch_bound(7, 3) + 0.07


# -----------------------------------------------------------------------------
# a toy overcomplete dictionary under each form

def test_power_and_welch_spread_an_overcomplete_dictionary_where_atanh_collapses_it(one_thread):
    """n = 8 d unit rows (256 in R^32) under Adam (float64, dense reference, 200 steps at the experiments' 3e-3):
    a toy ReLU reconstruction alone pulls rows together a little (mean max |cos| 0.51 -> 0.62). Adding power (p = 4)
    or welch at any coefficient from 1e-2 (no effect) to 1e3 (dominates) never does worse than the reconstruction
    alone, lowers the mean max |cos| as the coefficient grows, to within 2x of the Welch bound (0.166) once it
    dominates, and never makes a duplicate; atanh makes it worse at 1 and collapses rows at 1e3, as does power at p = 1
    (below p = 2 duplicates of a basis score best: test_jl_power_prefers_the_icosahedron_to_duplicates_above_p_2)."""
    n, d = 256, 32
    x = torch.randn(512, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    init = 0.1 * torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def train(coeff, form="atanh", **kw):
        W = torch.nn.Parameter(init.clone())
        optimizer = torch.optim.Adam([W], lr=3e-3)
        for _ in range(200):
            U = F.normalize(W, dim=1)
            # (512, d) @ (d, n) -> (512, n); @ (n, d) -> (512, d); spread rows return n/(2d) x without the 2d/n
            recon = torch.relu(x @ U.T) @ U * (2 * d / n)
            loss = (recon - x).square().mean() + (coeff * jl_penalty_ref(U, form, **kw) if coeff else 0.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return dense_mean_max_cos(W.detach()), dense_max_cos(W.detach())

    start, alone, bound = dense_mean_max_cos(init), train(0)[0], welch_bound(n, d)
    assert start < 0.55 and alone > start + 0.05
    coeffs = (1e-2, 1.0, 1e2, 1e3)
    for form, kw in (("power", {"power": 4.0}), ("welch", {})):
        runs = [train(c, form, **kw) for c in coeffs]
        means = [m for m, _ in runs]
        assert all(m <= alone + 0.01 for m in means), (form, means)                       # never worse than none
        assert all(a <= b + 0.01 for a, b in zip(means[1:], means)), (form, means)        # down as the coeff grows
        assert all(top < 0.9 for _, top in runs), (form, runs)                            # no pair near duplicate
        for m, top in runs[2:]:  # dominating: spread, near the bound
            assert m < start - 0.15 and m < 2 * bound and top < 0.4, (form, runs)
    at_one, dominated = train(1.0), train(1e3)
    assert at_one[0] > alone + 0.03                             # atanh pulls rows together even at 1
    assert dominated[0] > 0.85 and dominated[1] > 0.98          # and collapses them when it dominates (0.994)
    l1 = train(1e3, "power", power=1.0)                         # so does p = 1, an L1 penalty on G too (0.978)
    assert l1[0] > 0.85 and l1[1] > 0.98


# -----------------------------------------------------------------------------
# the sampled estimate, bad settings

@pytest.mark.parametrize("form,kw", [("power", {"power": 4.0}), ("power", {"power": 1.0}), ("welch", {})],
                         ids=["p4", "p1", "welch"])
def test_jl_sampled_is_unbiased_for_every_form(form, kw, one_thread):
    n, d, m, draws = 64, 12, 8, 1000
    W = unit_rows(n, d, seed=4, duplicate=False)
    exact, exact_grad = autograd_ref(W, form, **kw)
    g = torch.Generator().manual_seed(0)
    values, grads = [], []
    for _ in range(draws):
        Ws = W.clone().requires_grad_()
        v = sae_kernels.jl_penalty(Ws, sample=m, generator=g, form=form, **kw)
        v.backward()
        values.append(v.item())
        grads.append(Ws.grad)
    values, grads = torch.tensor(values, dtype=torch.float64), torch.stack(grads).double()
    # the mean of 1000 draws lies within 4 standard errors of the exact value (fails by chance ~1 in 15,000)
    assert abs(values.mean() - exact.item()) < 4 * values.std() / draws ** 0.5
    stderr = grads.std(dim=0) / draws ** 0.5
    assert ((grads.mean(dim=0) - exact_grad).abs() < 5 * stderr + 1e-7).double().mean() > 0.99
    full = sae_kernels.jl_penalty(W, sample=n, form=form, **kw)  # all rows: no sampling
    assert full.item() == pytest.approx(exact.item(), rel=1e-5)


def test_jl_forms_reject_bad_settings():
    W = unit_rows(10, 4, duplicate=False)
    calls = (lambda **kw: sae_kernels.jl_penalty(W, **kw), lambda **kw: jl_penalty_ref(W, **kw),
             lambda **kw: sae_kernels.jl_penalty_sampled(W, 4, **kw), lambda **kw: sae_kernels.jl_penalty(W, 4, **kw))
    for call in calls:
        with pytest.raises(ValueError, match=r"^JL form 'l2': valid values are atanh, power, welch$"):
            call(form="l2")
        for power in (0.5, 0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match=r"^JL power .*: valid values are >= 1"):
                call(form="power", power=power)
        for margin in (-0.1, 1.0):
            with pytest.raises(ValueError, match=r"^JL margin .*: valid values are 0 \(coherence_bound: the Welch or Levenshtein bound\) or"):
                call(form="welch", margin=margin)
    assert welch_bound(4, 4) == 0.0 and welch_bound(3, 7) == 0.0  # n <= d: the rows can all be orthogonal


# -----------------------------------------------------------------------------
# the Triton kernels compiled for real GPUs, ahead of time, with no GPU

# the shared memory one block may use (the opt-in maximum), bytes, by compute capability: A100 (8.0), consumer
# Ampere (8.6), Ada: L4, L40, RTX 40 (8.9), H100/H200 (9.0). CUDA C++ Programming Guide, "Technical Specifications
# per Compute Capability"
GPU_TARGETS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def data_dtype(signature):
    """The dtype of a launch's data: its first floating-point pointer's type."""
    return next(t for t in signature.values() if t in ("*fp32", "*bf16", "*fp16"))


@pytest.fixture(scope="session")
def gpu_compiles():
    """compile_for_gpus's report, once a session, in a fresh process; Triton's cache in ~/.cache/gpt_sae/triton
    keeps the cubins between runs (a cold run takes minutes, a warm one seconds: docs/tests.md)."""
    env = {**cpu_env(), "TRITON_CACHE_DIR": os.environ.get("TRITON_CACHE_DIR") or
           os.path.expanduser("~/.cache/gpt_sae/triton"), "TRITON_DEFAULT_FP_FUSION": "1"}  # Triton 3.9's default
    r = subprocess.run([sys.executable, "-c", "import test_sae_kernels; test_sae_kernels.compile_for_gpus()"], cwd=HERE, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_triton_kernel_compiles_for_every_gpu(gpu_compiles):
    """Every kernel of sae_kernels, every launch its launchers make (fp32, bf16, fp16; each constexpr set), every
    autotune config: a cubin for sm_80, sm_86, sm_89 and sm_90."""
    compiles = gpu_compiles["compiles"]
    failed = [c for c in compiles if c["error"]]
    assert not failed, "\n".join(f"{c['kernel']} sm_{c['capability']} {c['constexprs']} {c['signature']}: "
                                 f"{c['error']}" for c in failed[:10])
    assert {c["kernel"] for c in compiles} == set(gpu_compiles["kernels"]) == \
        {"_sae_matmul_kernel", "_gather_sum_kernel", "_gather_dot_kernel", "_scatter_outer_kernel", "_jl_fwd_bwd_kernel"}
    for kernel in gpu_compiles["kernels"]:
        for cc in GPU_TARGETS:
            dtypes = {data_dtype(c["signature"]) for c in compiles if c["kernel"] == kernel and c["capability"] == cc}
            assert dtypes == ({"*bf16"} if kernel == "_jl_fwd_bwd_kernel" else {"*fp32", "*bf16", "*fp16"}), (kernel, cc)
    for kernel, configs in gpu_compiles["configs"].items():  # the autotuned: each config, each dtype, each target
        for cc in GPU_TARGETS:
            for dtype in ({"*bf16"} if kernel == "_jl_fwd_bwd_kernel" else ("*fp32", "*bf16", "*fp16")):
                blocks = [k for k in configs[0] if k.startswith("BLOCK")]  # the config's constexprs
                done = [{k: c["constexprs"][k] for k in blocks} | c["options"]
                        for c in compiles if c["kernel"] == kernel and c["capability"] == cc
                        and data_dtype(c["signature"]) == dtype]
                assert all(config in done for config in configs), (kernel, cc, dtype)
    gathers = {c["constexprs"]["BLOCK_K"] for c in compiles if c["kernel"] == "_gather_sum_kernel"}
    assert gathers == {1, 2, 4, 8, 16, 32}  # every BLOCK_K the launcher picks (the next power of 2 of K, to 32)


def test_every_launch_fits_each_gpus_shared_memory(gpu_compiles):
    """Each fixed-config launch fits every target's shared memory; each autotuned launch keeps at least one config
    that fits (Triton's autotuner skips a config that does not: the list needs no pruning while one fits)."""
    fits = {}
    for c in gpu_compiles["compiles"]:
        key = (c["kernel"], json.dumps(c["signature"]),
               json.dumps({k: v for k, v in c["constexprs"].items() if not k.startswith("BLOCK_")}), c["capability"])
        fits.setdefault(key, []).append(c["shared"] <= GPU_TARGETS[c["capability"]])
    assert all(any(ok) for ok in fits.values()), [key for key, ok in fits.items() if not any(ok)][:5]
    fixed = [c for c in gpu_compiles["compiles"] if c["kernel"] not in gpu_compiles["configs"]]
    assert all(c["shared"] <= GPU_TARGETS[c["capability"]] for c in fixed), \
        [(c["kernel"], c["capability"], c["shared"]) for c in fixed if c["shared"] > GPU_TARGETS[c["capability"]]][:5]


def test_the_matmul_autotuner_keeps_the_configs_that_fit_an_a100_and_an_h100(gpu_compiles):
    """configs_that_fit, the matmul autotuner's prune, against the compiled kernels' shared memory: every config it
    keeps for a dtype fits sm_80's and sm_90's, every one it drops fits no sm_80 (the fp32 configs at BLOCK_K 64), and
    it keeps at least one for each dtype."""
    configs = {json.dumps(c, sort_keys=True): c for c in gpu_compiles["configs"]["_sae_matmul_kernel"]}
    widths = {"*fp32": torch.float32, "*bf16": torch.bfloat16, "*fp16": torch.float16}
    for dtype, torch_dtype in widths.items():
        triton_configs = [triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK")},
                                        num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs.values()]
        kept = sae_kernels.configs_that_fit(triton_configs, {"a_ptr": torch.empty(0, dtype=torch_dtype)})
        assert kept, dtype
        kept = [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in kept]
        for c in gpu_compiles["compiles"]:
            if c["kernel"] != "_sae_matmul_kernel" or data_dtype(c["signature"]) != dtype or c["capability"] not in (80, 90):
                continue
            config = {k: v for k, v in c["constexprs"].items() if k.startswith("BLOCK")} | c["options"]
            if config in kept:
                assert c["shared"] <= GPU_TARGETS[c["capability"]], (dtype, config, c["capability"], c["shared"])
            elif c["capability"] == 80:
                assert c["shared"] > GPU_TARGETS[80], (dtype, config, c["shared"])


def test_sae_matmul_refuses_offsets_past_int32():
    """The matmul kernel computes offsets in int32: a result of 2^31 elements or more would wrap around and write
    elsewhere, so the launcher refuses it, before allocating anything."""
    with pytest.raises(AssertionError, match="int32 offsets"):
        sae_kernels._sae_matmul(torch.empty(2**16, 8), torch.empty(8, 2**15))  # C: 2^31 elements
    assert sae_kernels.int32_offsets_fit(torch.empty(2**10, 2**10).T, torch.empty(1).expand(2**20, 2**20))  # stride 0
