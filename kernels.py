"""
The SAE's two hot spots, each a section: docstring with the math and shapes, the PyTorch reference
(`<op>_ref`, the specification: every eps, clamp and dtype is decided there), and the op that sae.py
calls. The Triton kernels, their launchers and autograd wrappers go into the same sections (issue 4);
until then each op is its reference. `SAE_NO_TRITON=1` will force the references.
"""
import os

import torch

USE_TRITON = False  # TODO(issue 4): torch.cuda.is_available() or TRITON_INTERPRET=1, unless SAE_NO_TRITON=1


# -----------------------------------------------------------------------------
# encode-ReLU-decode
# x (N, d_model) -> f = relu((x - b_dec) @ W_enc + b_enc) (N, n_latents); x_hat = f @ W_dec + b_dec (N, d_model)

def encode_relu_decode_ref(x, W_enc, b_enc, W_dec, b_dec):
    """The SAE forward with a pre-encoder bias (Bricken et al. 2023): returns (x_hat, f)."""
    f = torch.relu((x - b_dec) @ W_enc + b_enc)  # (N, d_model) @ (d_model, n_latents) -> (N, n_latents)
    x_hat = f @ W_dec + b_dec                     # (N, n_latents) @ (n_latents, d_model) -> (N, d_model)
    return x_hat, f


encode_relu_decode = encode_relu_decode_ref


# -----------------------------------------------------------------------------
# JL penalty
# W (n, d) with unit-norm rows -> mean over i != j of atanh(min(|G_ij|, 1 - JL_EPS)), G = W @ W.T (n, n)

JL_EPS = 1e-4  # atanh(1 - 1e-4) = 4.95 and its slope 1/(1 - g^2) = 5e3: finite for (near-)duplicate rows


def jl_penalty_ref(W):
    """Dense reference: materialises G (n, n), in fp32 or wider. The value clamps |G| at 1 - JL_EPS; the gradient
    is that of atanh at the clamped value, sign(G)/(1 - min(|G|, 1-eps)^2), never 0, so duplicate rows
    are still pushed apart. Its gradient w.r.t. W is 2 S W / (n (n - 1)), S_ij = that slope, S_ii = 0."""
    n = W.shape[0]
    W = W.to(torch.promote_types(W.dtype, torch.float32))  # fp32 at least: bf16 rounds a cos of 0.998 to 1
    G = W @ W.T  # (n, d) @ (d, n) -> (n, n)
    g = G.abs()
    g = g - (g - g.clamp(max=1 - JL_EPS)).detach()  # value clamped, gradient taken at the clamped point
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=W.device)
    return torch.atanh(g)[off_diagonal].sum() / (n * (n - 1))


jl_penalty = jl_penalty_ref
