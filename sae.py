"""
Sparse autoencoders on GPT-2 activations, in one file (after nanoGPT's train.py).

GPT-2 (our own forward, weights copied key for key from the Hugging Face checkpoint) reads FineWeb
tokens written by prepare.py; `GPT.harvest` returns the activations at one (layer, site) and computes
nothing past it. References: Bricken et al. 2023, "Towards Monosemanticity"
(transformer-circuits.pub/2023/monosemantic-features); Radford et al. 2019 (GPT-2).

$ python prepare.py
$ python sae.py --init_from=gpt2 --layer=6 --site=mlp_in
"""
import ast
import glob
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import read_shard

# -----------------------------------------------------------------------------
# config and command line

@dataclass
class HarvestConfig:
    init_from: str = "gpt2"           # a Hub id (gpt2, gpt2-medium, ...) or a local save_pretrained directory
    data_dir: str = "data/fineweb10B"  # shards written by prepare.py
    layer: int = 6                    # 0-indexed block; 6 is the middle of GPT-2 small
    site: str = "mlp_in"              # one of SITES
    batch_size: int = 8               # contexts per forward
    block_size: int = 128             # tokens per context
    max_iters: int = 20               # batches to harvest
    device: str = "auto"              # auto = cuda if available, else cpu


def parse_args(cfg, argv):
    """nanoGPT's configurator as a function: `--key=value` overrides (value read with ast.literal_eval,
    else kept as a string; its type must match the default) and `config/*.py` files of `key = value`
    lines. Returns a new dataclass; an unknown key raises ValueError listing the valid ones."""
    valid = {f.name: f for f in fields(cfg)}
    overrides = {}
    for arg in argv:
        if not arg.startswith("--"):  # a config file: plain `key = value` assignments
            tree = ast.parse(open(arg).read(), arg)
            pairs = [(node.targets[0].id, ast.literal_eval(node.value)) for node in tree.body
                     if isinstance(node, ast.Assign)]
        else:
            key, sep, value = arg[2:].partition("=")
            if not sep:
                raise ValueError(f"{arg}: expected --key=value")
            try:
                value = ast.literal_eval(value)
            except (SyntaxError, ValueError):
                pass  # not a Python literal: keep the string
            pairs = [(key, value)]
        for key, value in pairs:
            if key not in valid:
                raise ValueError(f"unknown config key '{key}'; valid keys: {', '.join(valid)}")
            default = getattr(cfg, key)
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # --lr=1 means 1.0
            if type(value) is not type(default):
                raise ValueError(f"--{key}={value!r}: expected {type(default).__name__}, got {type(value).__name__}")
            print(f"override: {key} = {value!r}")
            overrides[key] = value
    return replace(cfg, **overrides)


# -----------------------------------------------------------------------------
# GPT-2: nanoGPT's model with the Hugging Face module names, so loading is a key-for-key copy

SITES = ("resid_pre", "resid_mid", "mlp_in", "mlp_hidden", "mlp_out", "resid_post")  # in block order


@dataclass
class GPTConfig:
    block_size: int = 1024   # n_positions
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int = 0         # MLP width; 0 means 4 * n_embd, as in every GPT-2
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        self.n_inner = self.n_inner or 4 * self.n_embd


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs), flash where available
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new" (Hendrycks & Gimpel 2016, tanh form)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, site=None, edit=None):
        """x (B, T, C) -> residual after the block. At `site`, edit(act) is called on that activation and
        its return value replaces it: how harvesting stops, and how an SAE or a steering vector is spliced in."""
        at = lambda name, act: edit(act) if name == site else act
        x = at("resid_pre", x)
        x = at("resid_mid", x + self.attn(self.ln_1(x)))
        h = at("mlp_in", self.ln_2(x))                          # (B, T, C)
        h = at("mlp_hidden", self.mlp.gelu(self.mlp.c_fc(h)))   # (B, T, n_inner)
        h = at("mlp_out", self.mlp.c_proj(h))                   # (B, T, C)
        return at("resid_post", x + h)


class StopForward(Exception):
    """Raised by harvest's edit at the site, so that nothing past it is computed."""
    def __init__(self, act):
        self.act = act


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2 (https://paperswithcode.com/method/weight-tying)

    def forward(self, idx, layer=None, site=None, edit=None):
        """idx (B, T) token ids -> logits (B, T, vocab). With (layer, site, edit), edit(act) replaces the
        activation at that site of that block (see Block.forward)."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"context of {T} tokens, the model has {self.config.block_size} positions"
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, site, edit) if i == layer else block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)

    def harvest(self, idx, layer, site):
        """idx (B, T) -> the activation at (layer, site): (B, T, n_embd), or (B, T, n_inner) for
        mlp_hidden. Computes nothing past that site."""
        check_site(self.config, layer, site)
        def stop(act):
            raise StopForward(act)
        try:
            self(idx, layer, site, stop)
        except StopForward as e:
            return e.act
        raise AssertionError("unreachable: the forward always passes the site")

    @classmethod
    def from_pretrained(cls, name_or_path):
        """A Hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or any GPT-2 repo) or a local directory in
        save_pretrained's layout: config.json + model.safetensors or pytorch_model.bin."""
        config_file, weights_file = find_checkpoint(name_or_path)
        hf = json.load(open(config_file))
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{config_file}: activation_function {hf['activation_function']!r}; only GPT-2's "
                             f"tanh GELU is supported")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError(f"{config_file}: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                             f"are not supported")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], n_inner=hf.get("n_inner") or 4 * hf["n_embd"],
                           layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
        if weights_file.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd_hf = load_file(weights_file)
        else:
            sd_hf = torch.load(weights_file, map_location="cpu", weights_only=True)
        model = cls(config)
        load_hf_state_dict_(model, sd_hf, weights_file)
        return model.eval()


def find_checkpoint(name_or_path):
    """-> (config.json, weights file) from a local directory, or fetched from the Hub with huggingface_hub."""
    if os.path.isdir(name_or_path):
        config_file = os.path.join(name_or_path, "config.json")
        if not os.path.exists(config_file):
            raise ValueError(f"{name_or_path}: no config.json; expected a directory written by save_pretrained")
        for weights in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(name_or_path, weights)):
                return config_file, os.path.join(name_or_path, weights)
        raise ValueError(f"{name_or_path}: neither model.safetensors nor pytorch_model.bin")
    from huggingface_hub import hf_hub_download  # comes with datasets
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    import huggingface_hub.utils.logging
    huggingface_hub.utils.logging.set_verbosity_error()  # no retry chatter: one line when offline
    try:
        return hf_hub_download(name_or_path, "config.json"), hf_hub_download(name_or_path, "model.safetensors")
    except LocalEntryNotFoundError:
        raise ValueError(f"could not fetch GPT-2 '{name_or_path}' from the Hugging Face Hub (offline, and not "
                         f"in the local cache); pass a local directory written by save_pretrained") from None
    except RepositoryNotFoundError:
        raise ValueError(f"'{name_or_path}' is neither a local directory nor a model on the Hugging Face Hub") from None


CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@torch.no_grad()
def load_hf_state_dict_(model, sd_hf, source):
    """Copies a Hugging Face GPT-2 state dict into `model`. Accepts both key layouts: the Hub's original
    gpt2 files (h.0.attn.c_attn.weight, with attn.bias/attn.masked_bias mask buffers) and save_pretrained's
    (transformer.h.0...). HF stores c_attn, c_proj and c_fc as Conv1D, (in, out): transposed for nn.Linear."""
    sd_hf = {k.removeprefix("transformer."): v for k, v in sd_hf.items()}
    sd_hf = {k: v for k, v in sd_hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal masks
    lm_head = sd_hf.pop("lm_head.weight", None)
    if lm_head is not None and "wte.weight" in sd_hf and not torch.equal(lm_head, sd_hf["wte.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight; GPT-2 ties them")
    sd = model.state_dict()
    keys = [k for k in sd if k != "lm_head.weight"]  # tied to wte.weight
    missing, unexpected = sorted(set(keys) - set(sd_hf)), sorted(set(sd_hf) - set(keys))
    if missing or unexpected:
        raise ValueError(f"{source}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
                         f"{' (and more)' if len(missing) > 5 or len(unexpected) > 5 else ''}")
    for k in keys:
        w = sd_hf[k].t() if k.endswith(CONV1D_WEIGHTS) else sd_hf[k]
        if w.shape != sd[k].shape:
            raise ValueError(f"{source}: {k} has shape {tuple(w.shape)}, config.json implies {tuple(sd[k].shape)}")
        sd[k].copy_(w)


def check_site(config, layer, site):
    if site not in SITES:
        raise ValueError(f"unknown site '{site}'; valid sites: {', '.join(SITES)}")
    if not 0 <= layer < config.n_layer:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{config.n_layer - 1}")


def site_width(config, site):
    return config.n_inner if site == "mlp_hidden" else config.n_embd


# -----------------------------------------------------------------------------
# token loader over prepare.py's shards

class DataLoaderLite:
    """Yields (B, T) int64 token batches from the shards of one split. Rank r of W starts at B*T*r and
    strides B*T*W (nanoGPT/llm.c), moving to the next shard, and past the last back to the first."""

    def __init__(self, data_dir, split, B, T, process_rank=0, num_processes=1):
        self.B, self.T, self.rank, self.world = B, T, process_rank, num_processes
        self.shards = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.bin")))
        if not self.shards:
            raise ValueError(f"no {split} shards (*_{split}_*.bin) in {data_dir}; HINT: run prepare.py first")
        self.lengths = [len(read_shard(path)) for path in self.shards]  # validates every header up front
        if max(self.lengths) < B * T * num_processes:
            raise ValueError(f"{data_dir}: the largest {split} shard has {max(self.lengths)} tokens, fewer than "
                             f"one step of {B}x{T}x{num_processes} ranks; prepare more tokens")
        self.reset()

    def reset(self):
        self.shard, self.pos = 0, self.B * self.T * self.rank
        self.tokens = read_shard(self.shards[0])

    def state_dict(self):
        return {"shard": self.shard, "pos": self.pos}

    def load_state_dict(self, state):
        self.shard, self.pos = state["shard"], state["pos"]
        self.tokens = read_shard(self.shards[self.shard])

    def next_batch(self):
        n = self.B * self.T
        while self.pos + n > len(self.tokens):  # the rest of this shard is short of a step: next shard
            self.shard = (self.shard + 1) % len(self.shards)
            self.pos, self.tokens = n * self.rank, read_shard(self.shards[self.shard])
        batch = torch.from_numpy(self.tokens[self.pos:self.pos + n].astype(np.int64)).view(self.B, self.T)
        self.pos += n * self.world
        return batch


# -----------------------------------------------------------------------------
# main: harvest activations and report their statistics (training comes with the SAE)

if __name__ == "__main__":
    import time
    try:
        cfg = parse_args(HarvestConfig(), sys.argv[1:])
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        model = GPT.from_pretrained(cfg.init_from).to(device)
        check_site(model.config, cfg.layer, cfg.site)
        if cfg.block_size > model.config.block_size:
            raise ValueError(f"--block_size={cfg.block_size}: the model has {model.config.block_size} positions")
        loader = DataLoaderLite(cfg.data_dir, "train", cfg.batch_size, cfg.block_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    n, total, sq, t0 = 0, 0.0, 0.0, time.time()
    with torch.no_grad(), ctx:
        for it in range(cfg.max_iters):
            acts = model.harvest(loader.next_batch().to(device), cfg.layer, cfg.site).float()  # (B, T, d)
            n, total, sq = n + acts[..., 0].numel(), total + acts.norm(dim=-1).sum().item(), sq + acts.pow(2).sum().item()
    dt = time.time() - t0
    print(f"layer {cfg.layer} {cfg.site}: {n:,} activations of width {acts.size(-1)}, mean norm {total / n:.3f}, "
          f"rms {math.sqrt(sq / n / acts.size(-1)):.4f}, {n / dt:,.0f} tok/s on {device}")
