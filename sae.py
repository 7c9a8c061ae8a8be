"""
Sparse autoencoders on language-model activations, in one file (after nanoGPT's train.py).

GPT-2 or a Llama-family model (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2: our own forwards, weights
copied key for key from the Hugging Face checkpoint) reads the tokens prepare.py wrote with its tokenizer;
`harvest` returns the activations at one (layer, site) and computes nothing past it; a shuffling buffer
(or the activation cache, harvested once to disk) feeds them to an SAE trained with an L1, a JL (mean atanh |cos|
between dictionary rows) or a hybrid loss through the ops of sae_kernels.py; with --target_site, a transcoder that
reads one site and predicts a later one (the MLP's output from its input), and with --cross_layer a cross-layer
transcoder whose layer-l features write every later layer's target. Around it: evaluation
(FVU, L0, CE loss recovered, KL), dead-feature resampling, checkpoints and exact resume, data-parallel
runs, several SAEs on one pass (sweeps). What reads a trained SAE (export to SAELens, steering, feature
dashboards, plots, the LoRA fine-tune) is analyze.py's, which imports this file (never the other way round).
References: Bricken et al. 2023, "Towards Monosemanticity" (transformer-circuits.pub/2023/monosemantic-features);
Radford et al. 2019 (GPT-2); Touvron et al. 2023 (Llama).

$ python prepare.py
$ python sae.py --loss=hybrid
$ python sae.py --loss=sparsity,jl,hybrid --out_dir=out/compare   # three SAEs on one GPT-2 pass
$ python sae.py --mode=cache --init_from=HuggingFaceTB/SmolLM2-135M --data_dir=data/smollm2 --layer=15 --cache_dir=acts
$ python sae.py --acts=acts --loss=sparsity,hybrid           # SAEs on the cache, evaluated through SmolLM2
$ torchrun --standalone --nproc_per_node=8 sae.py --loss=hybrid
"""
import ast
import glob
import itertools
import json
import math
import os
import sys
import time
import dataclasses
from dataclasses import asdict, dataclass, fields, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from sae_kernels import JL_FORMS, ONEDNN_BF16, JumpReLU, Step, batch_topk_select, check_jl_form, cpu_bf16_native, \
    encode_relu_decode, fsq_code, jl_penalty, keep_freed_memory, linear, sparse_decode, sparse_encode
from prepare import hub_file, read_shard, write_atomic

# -----------------------------------------------------------------------------
# config and command line: TrainConfig's fields are the flags (docs/flags.md), set by config files and
# --key=value as nanoGPT's configurator sets them; a sweep expands into one config per SAE

@dataclass
class TrainConfig:
    # run
    init_from: str = "gpt2"            # GPT-2 or Llama-family Hub id or save_pretrained dir, scratch (random GPT-2), resume
    data_dir: str = "data/fineweb10B"  # shards from prepare.py, tokenized with the model's tokenizer
    out_dir: str = "out"               # ckpt.pt and log.jsonl
    acts: str = ""                     # train on an activation cache DIR (--mode=cache) or PATH.npy (N, d_in), not the model
    eval_only: bool = False            # evaluate out_dir/ckpt.pt and exit
    mode: str = "train"                # train; cache (activations to disk); analyze.py's modes read trained SAEs
    cache_dir: str = ""                # --mode=cache writes the activation cache here
    cache_tokens: int = 2**22          # ... this many train activations (position 0 not counted with exclude_pos0)
    cache_dtype: str = "float16"       # ... stored as float16 (half the disk) or float32
    cache_shard_tokens: int = 2**18    # ... about this many activations a shard file
    ckpt: str = ""                     # the checkpoint that eval_only and analyze.py read; "" = out_dir/ckpt.pt
    seed: int = 1337
    device: str = "auto"               # auto = cuda if available, else cpu
    dtype: str = "auto"                # autocast dtype of the matmuls (parameters, Adam: fp32); auto = bfloat16 on CUDA
                                       # and on CPUs with AMX or AVX512-BF16, else float32 (docs/training.md "precision")
    compile: bool = False              # torch.compile the SAE
    # the model and the site
    layer: int = 6                     # 0-indexed block; 6 is the middle of GPT-2 small, 15 of SmolLM2-135M
    layers: str = ""                   # several layers from one forward, an SAE or transcoder each: all, a range 0-29
                                       # or a list 3,7,11 ("" = --layer alone); each in out_dir/layerNN (docs/training.md)
    cross_layer: bool = False          # with --layers and --target_site: one cross-layer transcoder, layer l's features
                                       # writing every target l' >= l (docs/training.md "cross-layer transcoders")
    clt_topk_scope: str = "layer"      # cross_layer topk, batchtopk, matryoshka: k per source layer, or all: the top
                                       # k L over every layer's features (per token for topk, over the batch else)
    site: str = "mlp_in"               # one of SITES
    target_site: str = ""              # a transcoder's: the later site of the same layer it predicts from --site's
                                       # activation (mlp_out from mlp_in); "" = --site, an SAE (docs/training.md)
    block_size: int = 128              # tokens per context
    harvest_batch: int = 32            # contexts per forward of the model
    n_layer: int = 12                  # scratch only: the random GPT-2's size
    n_head: int = 12
    n_embd: int = 768
    # activations
    buffer_tokens: int = 2**18         # shuffling buffer, per rank; 800 MiB at d_in 768 in fp32
    normalize: bool = True             # scale activations to E|x| = sqrt(d_in), estimated at start
    exclude_pos0: bool = True          # drop position 0, whose norm is an outlier in GPT-2 (and Llamas: attention sink)
    # the SAE and its loss
    arch: str = "relu"                 # relu, topk, batchtopk, jumprelu, matryoshka, fsq, vae (docs/training.md "architectures")
    d_sae: int = 8192                  # features
    b_dec_init: str = "geometric_median"  # or mean, zeros: b_dec from a first sample of activations
    w_dec_init: str = "random"         # or data: dictionary rows start as distinct samples of that first sample, from b_dec
    skip: bool = False                 # transcoders: + x_in @ W_skip^T, a linear path from input to target (skip transcoder)
    loss: str = "sparsity"             # sparsity: the architecture's sparsity term (relu: L1; jumprelu: L0; vae: KL; none for
                                       # the k-sparse ones); jl: the JL penalty instead; hybrid: both
    l1_coeff: float = 5.0              # on mean_batch sum_features f; Anthropic's April 2024 update uses 5 at E|x| = sqrt(d)
    sparsity_warmup_iters: int = 1000  # the sparsity coefficient (l1, l0 or kl) ramps linearly from 0
    l1_by_decoder_norm: bool = True    # relu: L1 of f_i |W_dec,i|, free decoder norms (Anthropic, April 2024), folded at
                                       # export; False: unit-norm rows, plain L1 (2023) (docs/training.md "the ReLU recipe")
    init_norm: float = 0.0             # the encoder columns' initial norm (W_enc = init_norm W_dec^T, unit rows), and the
                                       # free decoder rows' too; 0 = the architecture's default (INIT_NORM, docs/training.md)
    k: int = 32                        # topk, fsq: active features per token; batchtopk, matryoshka: per token on average
    k_aux: int = 256                   # AuxK: the k_aux largest pre-activations of dead features fit the residual
    auxk_coeff: float = 1 / 32         # ... with this weight (Gao et al. 2024); 0 = off. Dead: see dead_window
    k_anneal_iters: int = 0            # k-sparse: k starts at k_anneal_start x k and falls linearly to k over these
    k_anneal_start: float = 4.0        # iterations (evaluated and saved at k throughout); 0 = off (docs/training.md)
    threshold_rate: float = 0.01       # batchtopk, matryoshka: EMA rate of the inference threshold (docs/training.md)
    l0_coeff: float = 1.0              # jumprelu: on mean_batch L0
    jumprelu_bandwidth: float = 0.05   # jumprelu: width of the straight-through kernel, in normalised units
    jumprelu_init_threshold: float = 0.1  # jumprelu: every threshold's start
    jumprelu_sparsity: str = "step"    # jumprelu: step (L0, Rajamanoharan et al. 2024) or tanh (sum_i tanh(c f_i |W_dec,i|),
                                       # Anthropic, January 2025; SAELens's jumprelu_sparsity_loss_mode), both by l0_coeff
    jumprelu_tanh_scale: float = 4.0   # jumprelu, tanh: c (SAELens's jumprelu_tanh_scale)
    pre_act_loss_coeff: float = 0.0    # jumprelu: + this x mean_batch sum_dead relu(theta_i - pre_i) |W_dec,i| (Anthropic's
                                       # anti-dead term, on dead features as SAELens); 0 = off; Anthropic used 3e-6
    matryoshka_prefixes: tuple = ()    # matryoshka: nested dictionary sizes; () = d_sae x (1, 3, 7, 15, 32) / 32
    fsq_levels: int = 8                # fsq: levels of each active feature's code, 0 (off) included
    kl_coeff: float = 1.0              # vae: on mean_batch sum_features KL(q(z_i | x) || prior)
    vae_prior_mean: float = -1.0       # vae: the prior N(m, 1) per feature; f = relu(z), so m < 0 favours f = 0
    jl_coeff: float = 1000.0           # on the JL mean; its pull on one row is ~2 jl_coeff / d_sae (docs/flags.md)
    jl_on: str = "dec"                 # dec: rows of W_dec; enc: columns of W_enc
    jl_start_mult: float = 10.0        # JL coefficient starts at this multiple of jl_coeff ...
    jl_decay_iters: int = 2000         # ... and decays (cosine) to jl_coeff over these iterations
    jl_sample: int = 0                 # 0 = exact JL; else an unbiased estimate from this many rows a step (it does
                                       # not train like the exact penalty: docs/results.md "the JL penalty, measured")
    jl_form: str = "atanh"             # the pair term of |cos|: atanh (the default), power (|cos|^p) or welch
                                       # (relu(|cos| - mu)^2): docs/training.md "the JL penalty's forms"
    jl_power: float = 4.0              # power: p (>= 1; above 2 duplicates cost more than spread rows)
    jl_margin: float = 0.0             # welch: mu; 0 = the Welch bound, past d (d + 1) / 2 rows Levenshtein's
    # optimization
    max_iters: int = 20000
    batch_size: int = 4096             # activations per step, all ranks
    micro_batches: int = 1             # each rank's batch in this many pieces, their gradients summed (memory)
    lr: float = 1e-4                   # Adam
    lr_enc: float = 0.0                # encoder (W_enc, b_enc) learning rate; 0 = lr
    lr_dec: float = 0.0                # decoder (W_dec, b_dec) learning rate; 0 = lr
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_iters: int = 0              # linear lr warmup
    decay: str = "constant"            # constant, cosine (to min_lr_frac * lr at max_iters), or linear (over the last decay_frac)
    decay_frac: float = 0.2
    min_lr_frac: float = 0.0
    grad_clip: float = 0.0             # max global gradient norm; 0 = off
    # tracking and resampling
    dead_window: int = 10_000_000      # tokens without a firing after which a feature is dead
    dense_threshold: float = 0.1       # firing frequency above which a feature counts as dense
    resample_iters: tuple = (5000, 10000, 15000)  # resample dead features at these iterations; () = never
    resample_samples: int = 2**14      # inputs scored for resampling
    # evaluation and logging
    eval_interval: int = 1000
    eval_tokens: int = 2**15           # fixed slice of the val shard (or held-out rows of --acts)
    eval_block_size: int = 0           # evaluation's context length (metrics by position bucket too); 0 = block_size
    log_interval: int = 10
    wandb_log: bool = False            # also log to Weights & Biases (pip install wandb; WANDB_MODE=offline: to disk)
    wandb_project: str = "gpt_sae"     # ... one W&B run per SAE, named after its out_dir, grouped by the sweep's


LOSSES, JL_ON, DECAYS = ("sparsity", "jl", "hybrid"), ("dec", "enc"), ("constant", "cosine", "linear")
# flags renamed for what they do: the old names are read on the command line, in config files and in saved configs
# (checkpoints, logs), so every earlier command and run still works
RENAMED_KEYS = {"l1_warmup_iters": "sparsity_warmup_iters", "jl_warmup_mult": "jl_start_mult",
                "jl_warmup_iters": "jl_decay_iters"}
RENAMED_VALUES = {"loss": {"l1": "sparsity"}}  # --loss=l1 meant the architecture's sparsity term, L1 or not
renamed_value = lambda key, value: RENAMED_VALUES.get(key, {}).get(value, value) if isinstance(value, str) else value
JUMPRELU_SPARSITY, CLT_TOPK_SCOPES = ("step", "tanh"), ("layer", "all")
MODES = ("train", "cache")  # sae.py's; analyze.py's read trained SAEs and logs
B_DEC_INITS = ("geometric_median", "mean", "zeros")
W_DEC_INITS = ("random", "data")


def parse_overrides(cfg, argv, strict=True):
    """nanoGPT's configurator as a function: `--key=value` (value read with ast.literal_eval, else kept as a
    string; its type must match the default) and `config/*.py` files of `key = value` lines, in order.
    A key of SWEEPABLE may take several values (`--loss=sparsity,jl`, `--l1_coeff=[1, 5]`): a list, one SAE per
    combination (expand_sweep). Returns {key: value or list}; an unknown key raises ValueError listing the valid ones
    (strict=False: is left out)."""
    valid = {f.name for f in fields(cfg)}
    overrides = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(config_help(cfg))
            sys.exit(0)
        if not arg.startswith("--"):  # a config file: plain `key = value` assignments
            if not os.path.isfile(arg):
                raise ValueError(f"{arg}: no such config file (flags are --key=value)")
            pairs = []
            for node in ast.parse(open(arg).read(), arg).body:
                if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)):
                    raise ValueError(f"{arg}:{node.lineno}: expected `key = value`")
                try:  # constant expressions such as 2**14 are allowed in files; names and calls are not
                    value = eval(compile(ast.Expression(node.value), arg, "eval"), {"__builtins__": {}})
                except Exception as e:
                    raise ValueError(f"{arg}:{node.lineno}: cannot evaluate the value ({e})") from None
                pairs.append((node.targets[0].id, value))
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
            key = RENAMED_KEYS.get(key, key)
            if key not in valid and not strict:
                continue
            if key not in valid:
                raise ValueError(f"unknown config key '{key}'; valid keys: {', '.join(sorted(valid))}")
            default = getattr(cfg, key)
            if key in SWEEPABLE and isinstance(default, str) and isinstance(value, str) and "," in value:
                value = value.split(",")  # --loss=sparsity,jl,hybrid
            if key in SWEEPABLE and isinstance(value, (list, tuple)):
                values = list(dict.fromkeys(renamed_value(key, coerce(key, v, default)) for v in value))  # in order,
                # repeats dropped
                overrides[key] = values if len(values) > 1 else values[0]
            else:
                overrides[key] = renamed_value(key, coerce(key, value, default))
    return overrides


def config_help(cfg):
    """Every flag of the config's dataclass with its default and its comment in the source, by section."""
    import inspect
    lines = [f"usage: python {os.path.basename(sys.argv[0])} [config/FILE.py ...] [--key=value ...]"]
    names = {f.name for f in fields(cfg)}
    source = [line for klass in reversed(type(cfg).__mro__) if dataclasses.is_dataclass(klass)
              for line in inspect.getsource(klass).splitlines()[1:]]
    for line in source:
        code, _, comment = line.strip().partition("#")
        name = code.split(":")[0].strip()
        if not code and comment and not line.startswith("     "):  # a section comment, at the fields' indent
            lines.append(f"\n{comment.strip()}:")
        elif not code and comment:                  # the previous flag's comment, continued
            lines.append(" " * 41 + comment.strip())
        elif name in names:
            lines.append(f"  --{name}={getattr(cfg, name)!r}".ljust(40) + f" {comment.strip()}")
    return "\n".join(lines)


def coerce(key, value, default):
    """value in the type of the default, or a ValueError naming both."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # --lr=1 means 1.0
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)  # --resample_iters=[100, 200]
    if isinstance(default, str) and isinstance(value, (int, tuple)) and not isinstance(value, bool) and \
            all(isinstance(v, int) for v in (value if isinstance(value, tuple) else (value,))):
        value = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)  # --layers=3,7,11 and --layers=5
    if type(value) is not type(default):
        raise ValueError(f"--{key}={value!r}: expected {type(default).__name__}, got {type(value).__name__}")
    return value


# keys that may differ between the SAEs of one process: they share the model's forward, the buffer and the batches
L1_KEYS = ("l1_coeff", "sparsity_warmup_iters")
JL_KEYS = ("jl_coeff", "jl_on", "jl_start_mult", "jl_decay_iters", "jl_sample", "jl_form", "jl_power", "jl_margin")
JL_FORM_KEYS = {"jl_power": "power", "jl_margin": "welch"}  # read by that form only
AUXK_KEYS = ("k", "k_aux", "auxk_coeff", "k_anneal_iters", "k_anneal_start")
ARCH_KEYS = {  # the keys each architecture reads, its sparsity coefficient first (none for the k-sparse ones)
    "relu": ("l1_coeff", "l1_by_decoder_norm"), "topk": AUXK_KEYS, "batchtopk": AUXK_KEYS + ("threshold_rate",),
    "matryoshka": AUXK_KEYS + ("threshold_rate", "matryoshka_prefixes"), "fsq": AUXK_KEYS + ("fsq_levels",),
    "jumprelu": ("l0_coeff", "jumprelu_bandwidth", "jumprelu_init_threshold", "jumprelu_sparsity", "jumprelu_tanh_scale",
                 "pre_act_loss_coeff"), "vae": ("kl_coeff", "vae_prior_mean")}
ARCHS = tuple(ARCH_KEYS)
K_SPARSE = ("topk", "batchtopk", "matryoshka", "fsq")  # a code of about k features a token, decoded by gathering rows
SPARSITY_COEFF = {"relu": "l1_coeff", "jumprelu": "l0_coeff", "vae": "kl_coeff"}


# --init_norm=0: each architecture's initial encoder norm (and relu's free decoder rows'). relu starts at 0.1, SAELens
# 6's decoder_init_norm: at 1 the tied init reconstructs with FVU 13 (half of the features on), and on SmolLM2 that
# start was still 0.09 FVU behind at L0 40 after 2,000 steps (docs/training.md "the ReLU recipe"). The k-sparse
# ones start tied at 1, as OpenAI's and dictionary_learning's TopK do; jumprelu and vae too (not measured at 0.1)
INIT_NORM = {arch: 0.1 if arch == "relu" else 1.0 for arch in ARCHS}
SWEEPABLE = ("arch", "loss", "d_sae", "b_dec_init", "w_dec_init", "skip", "init_norm", "lr", "lr_enc", "lr_dec", "beta1", "beta2", "grad_clip") + \
    L1_KEYS + JL_KEYS + tuple(dict.fromkeys(k for keys in ARCH_KEYS.values() for k in keys if k != "matryoshka_prefixes"))


def unused_keys(run):
    """The swept keys an SAE does not read: other architectures' keys, the JL keys without JL (and another form's),
    the sparsity coefficient (and its warmup) with --loss=jl."""
    arch, loss = run.get("arch", TrainConfig.arch), run.get("loss", TrainConfig.loss)
    read = set(ARCH_KEYS[arch]) | ({"sparsity_warmup_iters"} if arch in SPARSITY_COEFF else set())
    if loss == "jl":
        read -= {SPARSITY_COEFF.get(arch), "sparsity_warmup_iters"}
    if loss != "sparsity":
        form = run.get("jl_form", TrainConfig.jl_form)
        read |= {k for k in JL_KEYS if JL_FORM_KEYS.get(k, form) == form}
    return {k for keys in (*ARCH_KEYS.values(), L1_KEYS, JL_KEYS) for k in keys} - read


def expand_sweep(overrides):
    """{key: value or list} -> [(name, {key: value})], one per combination of the listed values, in order. A
    combination that differs from an earlier one only in keys its SAE does not read (jl_coeff for an l1 SAE, k
    for a relu one) is the same SAE and is dropped. The name spells the swept values the SAE reads:
    "hybrid-l1_coeff5.0", "topk-k16"; it is "" when nothing is swept."""
    axes = [k for k, v in overrides.items() if isinstance(v, list)]
    runs, names = [], set()
    for combo in itertools.product(*(overrides[k] for k in axes)):
        run = {**overrides, **dict(zip(axes, combo))}
        if run.get("loss") == "jl" and run.get("arch", TrainConfig.arch) in K_SPARSE:
            run["loss"] = "hybrid"  # a k-sparse SAE has no sparsity term: JL alone is JL with its k, hybrid's SAE
        unused = unused_keys(run)
        run = {k: v for k, v in run.items() if not (k in axes and k in unused)}  # swept for others: the default
        name = "-".join(str(run[k]) if k in ("arch", "loss", "jl_form") else f"{k}{run[k]}" for k in axes if k not in unused)
        if name not in names:
            names.add(name)
            runs.append((name, run))
    return runs


def check_config(cfg, world_size=1):
    """Invariants of a config, as one-line ValueErrors listing what is valid."""
    for key, valid in (("arch", ARCHS), ("loss", LOSSES), ("jl_on", JL_ON), ("decay", DECAYS), ("b_dec_init", B_DEC_INITS),
                       ("w_dec_init", W_DEC_INITS), ("cache_dtype", CACHE_DTYPES),
                       ("jl_form", JL_FORMS), ("jumprelu_sparsity", JUMPRELU_SPARSITY),
                       ("clt_topk_scope", CLT_TOPK_SCOPES)):
        if getattr(cfg, key) not in valid:
            raise ValueError(f"--{key}={getattr(cfg, key)!r}: valid values are {', '.join(valid)}")
    check_jl_form(cfg.jl_form, cfg.jl_power, cfg.jl_margin)  # --jl_power < 1 or a margin outside [0, 1)
    if cfg.site not in SITES:
        raise ValueError(f"--site={cfg.site!r}: valid sites are {', '.join(SITES)}")
    if cfg.target_site and cfg.target_site not in SITES:
        raise ValueError(f"--target_site={cfg.target_site!r}: valid sites are {', '.join(SITES)} ('' = --site: an SAE)")
    if is_transcoder(cfg) and SITES.index(cfg.target_site) < SITES.index(cfg.site):
        raise ValueError(f"--target_site={cfg.target_site} comes before --site={cfg.site} in a block "
                         f"({' -> '.join(SITES)}): a transcoder predicts a later site of its layer from an earlier one")
    if cfg.skip and not is_transcoder(cfg):
        raise ValueError("--skip=True is a transcoder's linear path: set --target_site (e.g. --site=mlp_in "
                         "--target_site=mlp_out)")
    if is_transcoder(cfg) and (cfg.acts.endswith(".npy") or os.path.isfile(cfg.acts)):
        raise ValueError(f"--acts={cfg.acts}: a .npy holds one site; a transcoder trains on an activation cache of both "
                         f"(--mode=cache --site={cfg.site} --target_site={cfg.target_site} --cache_dir=DIR)")
    if cfg.layers and (cfg.acts.endswith(".npy") or os.path.isfile(cfg.acts)):
        raise ValueError(f"--acts={cfg.acts}: a .npy holds one layer; several layers train on the model's harvest or on "
                         f"an activation cache of them all (--mode=cache --layers={cfg.layers} --cache_dir=DIR)")
    if cfg.cross_layer:
        check_cross_layer(cfg)
    if cfg.w_dec_init == "data" and cfg.resample_samples < cfg.d_sae:
        raise ValueError(f"--w_dec_init=data takes a row of the first sample for each feature: it needs "
                         f"--resample_samples >= --d_sae ({cfg.resample_samples} < {cfg.d_sae})")
    if cfg.w_dec_init == "data" and cfg.cross_layer:
        raise ValueError("--w_dec_init=data starts one layer's dictionary; a --cross_layer transcoder's is random")
    if cfg.batch_size % world_size:
        raise ValueError(f"--batch_size={cfg.batch_size} must divide evenly over {world_size} ranks")
    if cfg.micro_batches < 1 or cfg.batch_size % (world_size * cfg.micro_batches):
        raise ValueError(f"--micro_batches={cfg.micro_batches} must be >= 1 and divide the per-rank batch "
                         f"({cfg.batch_size} // {world_size})")
    per_rank = cfg.batch_size // world_size
    if not cfg.acts and (cfg.buffer_tokens % (2 * per_rank) or cfg.buffer_tokens % 4):
        raise ValueError(f"--buffer_tokens={cfg.buffer_tokens} must be a multiple of 4 and of 2 x {per_rank} (the "
                         f"per-rank batch): half the buffer is served between refills, in quarters")
    if cfg.mode == "cache" and (not cfg.cache_dir or cfg.acts):
        raise ValueError("--mode=cache needs --cache_dir=DIR (and no --acts): it harvests the model into DIR")
    for key in ("d_sae", "max_iters", "batch_size", "block_size", "harvest_batch", "eval_interval", "eval_tokens",
                "log_interval", "dead_window", "resample_samples", "cache_tokens", "cache_shard_tokens"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"--{key} must be positive")
    if cfg.arch in K_SPARSE and not 0 < cfg.k <= cfg.d_sae:
        raise ValueError(f"--k={cfg.k} must be in 1..d_sae ({cfg.d_sae})")
    if cfg.arch == "fsq" and cfg.fsq_levels < 2:
        raise ValueError(f"--fsq_levels={cfg.fsq_levels}: at least 2 (off and one level on)")
    if cfg.arch == "jumprelu" and (cfg.jumprelu_bandwidth <= 0 or cfg.jumprelu_init_threshold <= 0):
        raise ValueError("--jumprelu_bandwidth and --jumprelu_init_threshold must be positive")
    if cfg.arch == "matryoshka":
        prefixes = matryoshka_prefixes(cfg.matryoshka_prefixes, cfg.d_sae)
        if list(prefixes) != sorted(set(prefixes)) or prefixes[0] <= 0 or prefixes[-1] != cfg.d_sae:
            raise ValueError(f"--matryoshka_prefixes={cfg.matryoshka_prefixes}: increasing sizes, the last d_sae "
                             f"({cfg.d_sae})")
    if cfg.exclude_pos0 and cfg.block_size < 2:
        raise ValueError("--block_size must be at least 2 with --exclude_pos0=True")


CLT_ARCHS = ("relu", "jumprelu", "topk", "batchtopk", "matryoshka")  # fsq and vae: no cross-layer meaning defined here


def check_cross_layer(cfg):
    """--cross_layer's refusals, each one line: it needs a later --target_site, --layers (at least 2: run_layers), an
    activation cache or the model's harvest (a .npy holds one site of one layer), an architecture of CLT_ARCHS and
    the architecture's own sparsity."""
    if not is_transcoder(cfg):
        raise ValueError("--cross_layer=True predicts each layer's --target_site from its --site: set a later "
                         "--target_site (e.g. --site=mlp_in --target_site=mlp_out)")
    if not cfg.layers:
        raise ValueError("--cross_layer=True needs --layers naming at least 2 layers (e.g. --layers=all)")
    if cfg.acts.endswith(".npy") or os.path.isfile(cfg.acts):
        raise ValueError(f"--acts={cfg.acts}: a .npy holds one site of one layer; a cross-layer transcoder trains on "
                         f"the model's harvest or an activation cache of every layer (--mode=cache --layers=...)")
    if cfg.arch not in CLT_ARCHS:
        raise ValueError(f"--arch={cfg.arch} has no cross-layer transcoder here: {', '.join(CLT_ARCHS)}")
    if cfg.loss != "sparsity":
        raise ValueError(f"--loss={cfg.loss}: a cross-layer transcoder trains with --loss=sparsity (its architecture's "
                         f"sparsity term); the JL penalty is not defined over its decoders")


def is_transcoder(cfg):
    """Whether cfg trains a transcoder: a target site other than the one it reads."""
    return cfg.target_site not in ("", cfg.site)


def sites_of(cfg):
    """The sites a run harvests, in block order: (site,) for an SAE, (site, target_site) for a transcoder, whose
    rows are the two activations side by side, (N, d_in + d_out)."""
    return (cfg.site, cfg.target_site) if is_transcoder(cfg) else (cfg.site,)


def parse_layers(spec, n_layer):
    """--layers: all, a range a-b, a list a,b,c, or ranges in a list (0-3,7) -> the sorted distinct layers, each in
    0..n_layer-1."""
    if spec.strip() == "all":
        return list(range(n_layer))
    layers = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        first, dash, last = part.partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())) or dash and int(last) < int(first):
            raise ValueError(f"--layers={spec}: expected all, a range a-b or a list a,b,c of layers (0-indexed)")
        layers.update(range(int(first), int(last if dash else first) + 1))
    if not layers:
        raise ValueError(f"--layers={spec!r} names no layer: all, a range a-b or a list a,b,c")
    outside = [layer for layer in sorted(layers) if layer >= n_layer]
    if outside:
        raise ValueError(f"--layers={spec}: layer {outside[0]} is out of range: the model has layers 0..{n_layer - 1}")
    return sorted(layers)


def model_n_layer(cfg):
    """The number of blocks of the model a run reads, from its config.json (no weights read)."""
    if cfg.init_from == "scratch":
        return cfg.n_layer
    hf, _ = read_hf_config(cfg.init_from)
    return hf.get("n_layer") or hf["num_hidden_layers"]  # GPT-2's name, the Llama family's


# -----------------------------------------------------------------------------
# tokens: prepare.py's shards, read in steps that stride over the ranks (train) or as fixed contexts (val)

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
        # the position of rank 0: the same state restores every rank, each adding its own offset
        return {"shard": self.shard, "pos": self.pos - self.B * self.T * self.rank}

    def load_state_dict(self, state):
        self.shard, self.pos = state["shard"], state["pos"] + self.B * self.T * self.rank
        self.tokens = read_shard(self.shards[self.shard])

    def next_batch(self):
        n = self.B * self.T
        while self.pos + n > len(self.tokens):  # the rest of this shard is short of a step: next shard
            self.shard = (self.shard + 1) % len(self.shards)
            self.pos, self.tokens = n * self.rank, read_shard(self.shards[self.shard])
        batch = torch.from_numpy(self.tokens[self.pos:self.pos + n].astype(np.int64)).view(self.B, self.T)
        self.pos += n * self.world
        return batch


def check_tokenizer(data_dir, spec):
    """Refuses token shards that another tokenizer than the model's (spec) wrote: prepare.json's record of
    the shards' tokenizer against the model's, by name, else by fingerprint (the same vocabulary, however named)."""
    from prepare import load_tokenizer, read_tokenizer_record
    record = read_tokenizer_record(data_dir)
    if record is None or record["spec"] == spec:
        return
    theirs = record.get("fingerprint") or load_tokenizer(record["spec"]).fingerprint()
    if theirs != load_tokenizer(spec).fingerprint():
        raise ValueError(f"{data_dir} holds tokens of {record['spec']}, but the model reads {spec}'s; HINT: "
                         f"python prepare.py --tokenizer={spec} --out_dir=<a new directory>")


def val_contexts(data_dir, block_size, n_tokens, what):
    """The first n_tokens // block_size whole contexts of the val split, each once: (n, block_size) int64.
    A shorter split gives what it holds, said in one line (evaluation and dashboards never repeat a context)."""
    shards = sorted(glob.glob(os.path.join(data_dir, "*_val_*.bin")))
    if not shards:
        raise ValueError(f"no val shards (*_val_*.bin) in {data_dir}; HINT: run prepare.py first")
    tokens = np.concatenate([read_shard(path) for path in shards])
    want, have = max(1, n_tokens // block_size), len(tokens) // block_size
    if have == 0:
        raise ValueError(f"{data_dir}: the val split has {len(tokens)} tokens, fewer than one context of {block_size}")
    if have < want:
        print(f"{what}: the val split holds {have} contexts of {block_size} tokens ({have * block_size:,} of the "
              f"{n_tokens:,} asked for); using each once")
    n = min(want, have)
    return torch.from_numpy(tokens[:n * block_size].astype(np.int64)).view(n, block_size)


# -----------------------------------------------------------------------------
# models: GPT-2, the Llama family and Gemma, with the Hugging Face module names, so loading is a key-for-key copy.
# Each reads (B, T) token ids and gives logits; at one (layer, site) an `edit` function sees the activation
# and returns its replacement: how harvesting stops early, and how an SAE or a steering vector is spliced in.

SITES = ("resid_pre", "resid_mid", "mlp_in", "mlp_hidden", "mlp_out", "resid_post")  # in block order


class StopForward(Exception):
    """Raised by harvest's edit at the site, so that nothing past it is computed."""
    def __init__(self, act):
        self.act = act


class Linear(nn.Linear):
    """nn.Linear through sae_kernels.linear, with an optional fused activation: oneDNN's AVX-512 matmul on the CPU
    when nothing needs its gradient (harvesting, evaluation, generation), where torch's fp32 matmul takes MKL's
    AVX2 path on AMD processors."""

    def forward(self, x, act="none"):
        y = linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias, act)  # (B*T, in) @ (in, out)
        return y.view(*x.shape[:-1], y.shape[-1])


class LanguageModel(nn.Module):
    """What sae.py and analyze.py ask of a model, whatever its family: `forward(idx, layer, site, edit, head)` ->
    logits, `blocks`, `final_norm`, `lm_head`, `down_proj(layer)` (the matrix from mlp_hidden to the residual)."""

    def harvest(self, idx, layer, sites):
        """idx (B, T) -> the activation at (layer, site): (B, T, n_embd), or (B, T, n_inner) for mlp_hidden; sites a
        tuple of sites of the layer in block order (a transcoder's input and target): their activations side by side,
        (B, T, sum of their widths); layer a tuple of layers (--layers): each layer's sites side by side, in layer
        order, (B, T, len(layers) * sum of the widths). Computes nothing past the last."""
        sites = (sites,) if isinstance(sites, str) else tuple(sites)
        for l, site in itertools.product(layers_of(layer), sites):
            check_site(self.config, l, site)
        acts, n_acts = [], len(layers_of(layer)) * len(sites)
        def stop(act):  # called at each (layer, site) in forward order: the last one ends the forward
            acts.append(act)
            if len(acts) == n_acts:
                raise StopForward(torch.cat(acts, dim=-1) if len(acts) > 1 else act)
            return act
        try:
            self(idx, layer, sites, stop)
        except StopForward as e:
            return e.act
        raise AssertionError("unreachable: the forward always passes the site")


def layers_of(layer):
    """A forward's edited layers as a tuple: (layer,) for one, () for None, a tuple of them as it is."""
    return () if layer is None else (layer,) if isinstance(layer, int) else tuple(layer)


class SiteBlock(nn.Module):
    """A pre-norm block with the six SITES in block order, the same in every family, which name their parts:
    attend (norm and attention, and Gemma's norm after it), mlp_norm (whose output is mlp_in), mlp.hidden and mlp_out
    (the MLP's two halves; Gemma's mlp_out ends in its post-MLP norm)."""

    def forward(self, x, *rope, site=None, edit=None):
        """x (B, T, C) -> the residual after the block; rope: the Llama family's (cos, sin). At `site` (or at each of
        a tuple of sites, in block order), edit(act) is called on that activation and its return value replaces it."""
        sites = site if isinstance(site, tuple) else (site,)
        at = lambda name, act: edit(act) if name in sites else act
        x = at("resid_pre", x)
        x = at("resid_mid", x + self.attend(x, *rope))
        h = at("mlp_in", self.mlp_norm(x))        # (B, T, C)
        h = at("mlp_hidden", self.mlp.hidden(h))  # (B, T, n_inner)
        h = at("mlp_out", self.mlp_out(h))        # (B, T, C)
        return at("resid_post", x + h)


# --- GPT-2 (Radford et al. 2019): nanoGPT's model

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
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = Linear(config.n_embd, config.n_embd)

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
        self.c_fc, self.c_proj = Linear(config.n_embd, config.n_inner), Linear(config.n_inner, config.n_embd)

    def hidden(self, x):
        """GPT-2's "gelu_new" (Hendrycks & Gimpel 2016, tanh form) fused into c_fc: (B, T, C) -> (B, T, n_inner)."""
        return self.c_fc(x, act="gelu_tanh")


class Block(SiteBlock):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    mlp_norm = property(lambda self: self.ln_2)  # the norm whose output is mlp_in
    attend = lambda self, x: self.attn(self.ln_1(x))
    mlp_out = property(lambda self: self.mlp.c_proj)


class GPT(LanguageModel):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2 (https://paperswithcode.com/method/weight-tying)
        self.apply(self._init_weights)  # for init_from=scratch; from_pretrained overwrites every weight

    blocks = property(lambda self: self.h)
    final_norm = property(lambda self: self.ln_f)
    down_proj = lambda self, layer: self.h[layer].mlp.c_proj.weight  # (C, n_inner)

    def _init_weights(self, module):
        # GPT-2's init (nanoGPT): N(0, 0.02) weights, zero biases, LayerNorm at identity
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, layer=None, site=None, edit=None, head=True):
        """idx (B, T) token ids -> logits (B, T, vocab). With (layer, site, edit), edit(act) replaces the
        activation at that site of that block (see Block.forward). head=False: the final norm's output
        (B, T, C) instead, for callers that apply lm_head a slice of positions at a time."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"context of {T} tokens, the model has {self.config.block_size} positions"
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        edited = layers_of(layer)  # with harvest's tuple of layers, edit is called at each
        for i, block in enumerate(self.h):
            x = block(x, site=site, edit=edit) if i in edited else block(x)
        x = self.ln_f(x)
        return self.lm_head(x) if head else x  # (B, T, vocab) or (B, T, C)

    @classmethod
    def from_pretrained(cls, name_or_path):
        """A Hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or any GPT-2 repo) or a local directory in
        save_pretrained's layout: config.json + model.safetensors or pytorch_model.bin."""
        hf, config_file, weights_files = find_checkpoint(name_or_path)
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{config_file}: activation_function {hf['activation_function']!r}; only GPT-2's "
                             f"tanh GELU is supported")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError(f"{config_file}: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                             f"are not supported")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], n_inner=hf.get("n_inner") or 4 * hf["n_embd"],
                           layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
        model = cls(config)
        load_gpt2_state_dict_(model, read_weights(weights_files), weights_files[0])
        return model.eval()


CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@torch.no_grad()
def load_gpt2_state_dict_(model, sd_hf, source):
    """Copies a Hugging Face GPT-2 state dict into `model`. Accepts both key layouts: the Hub's original
    gpt2 files (h.0.attn.c_attn.weight, with attn.bias/attn.masked_bias mask buffers) and save_pretrained's
    (transformer.h.0...). HF stores c_attn, c_proj and c_fc as Conv1D, (in, out): transposed for nn.Linear."""
    sd_hf = {k.removeprefix("transformer."): v for k, v in sd_hf.items()}
    sd_hf = {k: v for k, v in sd_hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal masks
    lm_head = sd_hf.pop("lm_head.weight", None)
    if lm_head is not None and "wte.weight" in sd_hf and not torch.equal(lm_head, sd_hf["wte.weight"]):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight; GPT-2 ties them")
    copy_state_dict_(model, {k: v.t() if k.endswith(CONV1D_WEIGHTS) else v for k, v in sd_hf.items()}, source,
                     skip=("lm_head.weight",))  # tied to wte.weight


# --- the Llama family: Llama 2/3/3.1/3.2, SmolLM/SmolLM2, TinyLlama, Mistral, Qwen2, Qwen3 (Touvron et al. 2023;
# modeling_llama.py, modeling_mistral.py, modeling_qwen2.py, modeling_qwen3.py in transformers; ../shared/notes/llama.md)

LLAMA_FAMILY = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "Qwen3ForCausalLM": "qwen3"}
GPT2_FAMILY = {"GPT2LMHeadModel": "gpt2"}


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3      # grouped-query attention: query head h reads key/value head h // (9 / 3)
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = None         # None, or llama3's {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False      # a bias on q, k, v and o (Llama's attention_bias)
    qkv_bias: bool = False            # a bias on q, k, v only (Qwen2)
    qk_norm: bool = False             # RMSNorm over each head of q and k, before the rotary embedding (Qwen3)
    mlp_bias: bool = False
    sliding_windows: tuple = ()       # per layer: attend to the last w keys, the query's own included; 0 = all

    # the names the rest of sae.py reads, as GPTConfig spells them
    n_layer = property(lambda self: self.num_hidden_layers)
    n_embd = property(lambda self: self.hidden_size)
    n_inner = property(lambda self: self.intermediate_size)
    block_size = property(lambda self: self.max_position_embeddings)

    @classmethod
    def from_hf(cls, hf, source):
        """From a config.json dict; an option we do not implement is a ValueError naming it."""
        family = LLAMA_FAMILY.get((hf.get("architectures") or [""])[0]) or hf.get("model_type")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r}; only SiLU (SwiGLU) is supported")
        rope = hf.get("rope_parameters") or {}  # transformers 5 writes theta and scaling here
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        scaling_type = scaling and scaling.get("rope_type", scaling.get("type"))  # "type" in older files
        if scaling_type not in (None, "default", "llama3"):
            raise ValueError(f"{source}: rope scaling {scaling_type!r} is not supported (only llama3's, and none)")
        if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(f"{source}: partial_rotary_factor is not supported")
        n_layer, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
        window = hf.get("sliding_window") or 0
        if family in ("qwen2", "qwen3"):  # Qwen2 and 3 slide only where layer_types says, or from max_window_layers on
            window = window if hf.get("use_sliding_window") else 0
            types = hf.get("layer_types") or ["sliding_attention" if window and i >= hf.get("max_window_layers", 28)
                                              else "full_attention" for i in range(n_layer)]
            windows = tuple(window if t == "sliding_attention" else 0 for t in types)
        else:
            windows = (window,) * n_layer if family == "mistral" else (0,) * n_layer
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                   num_hidden_layers=n_layer, num_attention_heads=heads,
                   num_key_value_heads=hf.get("num_key_value_heads") or heads,
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                   rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                   rope_scaling=scaling if scaling_type == "llama3" else None,
                   max_position_embeddings=hf.get("max_position_embeddings", 2048),
                   tie_word_embeddings=hf.get("tie_word_embeddings", False),  # transformers' default
                   attention_bias=family != "mistral" and hf.get("attention_bias", False), qkv_bias=family == "qwen2",
                   qk_norm=family == "qwen3", mlp_bias=family == "llama" and hf.get("mlp_bias", False),
                   sliding_windows=windows)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), in fp32 and cast back before the gain, as
    transformers' LlamaRMSNorm does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    gain = property(lambda self: self.weight)  # what multiplies the normalised input (GemmaRMSNorm: 1 + weight)

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_inv_freq(config):
    """Rotary inverse frequencies (Su et al. 2021), (head_dim/2,) fp32, with llama3's rescaling (Meta's
    Llama 3.1: long wavelengths divided by `factor`, a smooth ramp between; at every length, not only long ones)."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if config.rope_scaling:
        s = config.rope_scaling
        factor, low, high, old = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                                  s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv_freq = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq


def rope_table(inv_freq, T, dtype):
    """(cos, sin) of the rotary angles of positions 0..T-1, each (T, head_dim): computed in fp32, cast to dtype."""
    freqs = torch.arange(T, device=inv_freq.device).float()[:, None] * inv_freq  # (T, hd/2), fp32
    emb = torch.cat((freqs, freqs), dim=-1)                                       # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the two halves of the head: the rotary pairing of Hugging Face's weights."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, config, window, norm=RMSNorm):
        super().__init__()
        self.n_head, self.n_kv, self.hd, self.window = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim, window)
        # Gemma scales by query_pre_attn_scalar^-0.5 (head_dim^-0.5 elsewhere) and Gemma 2 caps the logits softly
        self.scale, self.softcap = getattr(config, "attn_scale", None), getattr(config, "attn_softcap", None)
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = Linear(config.hidden_size, self.n_head * self.hd, bias=qkv_bias)
        self.k_proj = Linear(config.hidden_size, self.n_kv * self.hd, bias=qkv_bias)
        self.v_proj = Linear(config.hidden_size, self.n_kv * self.hd, bias=qkv_bias)
        self.o_proj = Linear(self.n_head * self.hd, config.hidden_size, bias=config.attention_bias)
        if config.qk_norm:  # Qwen3, Gemma 3: one gain of head_dim, shared by every head
            self.q_norm, self.k_norm = norm(self.hd, config.rms_norm_eps), norm(self.hd, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x, cos, sin):
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.hd)  # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)    # (B, T, n_kv, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)          # (B, nh, T, hd), (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin  # rotary, (T, hd) broadcast
        k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))  # (B, nh, T, hd): GQA
        window = self.window and T > self.window
        if window or self.softcap:
            i = torch.arange(T, device=x.device)  # key j is seen by query i when j <= i (and i - window < j)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window if window else True)  # (T, T)
        if self.softcap:  # Gemma 2: logits cap * tanh(logits / cap), which scaled_dot_product_attention cannot do
            att = q @ k.transpose(-2, -1) * (self.scale or self.hd ** -0.5)  # (B, nh, T, hd) @ (B, nh, hd, T)
            att = (torch.tanh(att / self.softcap) * self.softcap).masked_fill(~mask, float("-inf"))
            y = torch.softmax(att.float(), dim=-1).to(q.dtype) @ v  # (B, nh, T, T) @ (B, nh, T, hd)
        elif window:  # Mistral, Gemma's sliding layers
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, nh, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, H, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj, self.up_proj, self.down_proj = Linear(C, H, bias=bias), Linear(C, H, bias=bias), Linear(H, C, bias=bias)

    act = "silu"  # GemmaMLP: gelu_tanh

    def hidden(self, x):
        """SwiGLU (Shazeer 2020): silu(x W_gate) * (x W_up), (B, T, C) -> (B, T, H) (GeGLU with tanh GELU for Gemma);
        the activation fused into gate_proj."""
        return self.gate_proj(x, act=self.act) * self.up_proj(x)


class LlamaBlock(SiteBlock):
    def __init__(self, config, window=0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    mlp_norm = property(lambda self: self.post_attention_layernorm)
    attend = lambda self, x, cos, sin: self.self_attn(self.input_layernorm(x), cos, sin)
    mlp_out = property(lambda self: self.mlp.down_proj)


class Llama(LanguageModel):
    config_class = LlamaConfig  # Gemma's: GemmaConfig
    text_weights = staticmethod(lambda sd: sd)  # a checkpoint's weights as this class names them (see Gemma's)

    def __init__(self, config):
        super().__init__()
        self.config = config
        windows = config.sliding_windows or (0,) * config.num_hidden_layers
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList([LlamaBlock(config, w) for w in windows]),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)  # never in a checkpoint
        for module in self.modules():  # a random init for tests (from_pretrained overwrites every weight)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    blocks = property(lambda self: self.model.layers)
    final_norm = property(lambda self: self.model.norm)
    down_proj = lambda self, layer: self.model.layers[layer].mlp.down_proj.weight  # (C, H)

    def forward(self, idx, layer=None, site=None, edit=None, head=True):
        """idx (B, T) -> logits (B, T, vocab); (layer, site, edit, head) as in GPT.forward."""
        x = self.model.embed_tokens(idx)                                              # (B, T, C)
        cos, sin = rope_table(self.inv_freq, idx.size(1), x.dtype)
        edited = layers_of(layer)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, site=site, edit=edit) if i in edited else block(x, cos, sin)
        x = self.model.norm(x)
        return self.lm_head(x) if head else x  # (B, T, vocab) or (B, T, C)

    @classmethod
    def from_pretrained(cls, name_or_path):
        """A Hub id (HuggingFaceTB/SmolLM2-135M, meta-llama/Llama-3.2-1B, mistralai/Mistral-7B-v0.1,
        Qwen/Qwen2-0.5B, Qwen/Qwen3-0.6B, ...) or a local save_pretrained directory, sharded or not. Weights become fp32."""
        hf, config_file, weights_files = find_checkpoint(name_or_path)
        model = cls(cls.config_class.from_hf(hf, config_file))
        sd = {k: v for k, v in read_weights(weights_files).items() if not k.endswith("rotary_emb.inv_freq")}
        sd = cls.text_weights(sd)
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # transformers ties it to the embedding whatever the file holds
        copy_state_dict_(model, sd, weights_files[0], skip=("lm_head.weight",) if model.config.tie_word_embeddings else ())
        return model.eval()


# --- Gemma 2 and Gemma 3 (Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size"; 2025,
# "Gemma 3 Technical Report"; modeling_gemma2.py, modeling_gemma3.py in transformers): the Llama block with norms
# after attention and after the MLP as well as before, RMSNorm gains of (1 + w), GeGLU, embeddings times sqrt(d),
# queries scaled by query_pre_attn_scalar^-0.5, sliding-window layers among global ones; Gemma 2 caps attention and
# final logits softly (cap * tanh(x / cap)); Gemma 3 normalises q and k per head and rotates its sliding layers with
# their own base. Its sites: resid_mid = x + post_attention_layernorm(attention), mlp_in = pre_feedforward_layernorm's
# output, mlp_out = post_feedforward_layernorm(down_proj(...)), what the MLP adds to the residual.

GEMMA_FAMILY = {"Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3"}


@dataclass
class GemmaConfig(LlamaConfig):
    family: str = "gemma2"
    attn_scale: float = 0.125         # query_pre_attn_scalar^-0.5
    attn_softcap: float = 0.0         # Gemma 2's attn_logit_softcapping (0: none)
    final_softcap: float = 0.0        # Gemma 2's final_logit_softcapping (0: none)
    rope_local_theta: float = 0.0     # Gemma 3: the sliding layers' base (0: rope_theta for all)
    rope_factor: float = 1.0          # Gemma 3: the global layers' linear rope scaling

    @classmethod
    def from_hf(cls, hf, source):
        """From a config.json dict (transformers 4's keys or 5's; a multimodal Gemma 3's text_config, its text model);
        an option we do not implement is a ValueError."""
        family = GEMMA_FAMILY.get((hf.get("architectures") or [""])[0]) or \
            {"gemma2": "gemma2", "gemma3_text": "gemma3"}.get(hf.get("model_type"))
        if "text_config" in hf:  # Gemma3ForConditionalGeneration: the top model ties (or not), whatever text_config says
            hf = {**hf["text_config"], "tie_word_embeddings": hf.get("tie_word_embeddings", True)}
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"{source}: hidden_activation {act!r}; only tanh GELU (GeGLU) is supported")
        n_layer, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
        pattern = hf.get("sliding_window_pattern") or (2 if family == "gemma2" else 6)  # every pattern-th is global
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                          for i in range(n_layer)]
        windows = tuple(hf["sliding_window"] if t == "sliding_attention" else 0 for t in types)
        rope = hf.get("rope_parameters") or {}
        global_rope = rope.get("full_attention", rope) if family == "gemma3" else rope  # v5: per layer type
        scaling = hf.get("rope_scaling") or (global_rope if global_rope.get("rope_type", "default") != "default" else {})
        scaling_type = scaling.get("rope_type", scaling.get("type", "default"))
        if scaling_type not in ("default", "linear") or (scaling_type == "linear" and family != "gemma3"):
            raise ValueError(f"{source}: rope scaling {scaling_type!r} is not supported for {family}")
        theta = global_rope.get("rope_theta", hf.get("rope_theta", 10000.0 if family == "gemma2" else 1e6))
        local = rope.get("sliding_attention", {}).get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                   num_hidden_layers=n_layer, num_attention_heads=heads,
                   num_key_value_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or 256,
                   rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
                   max_position_embeddings=hf.get("max_position_embeddings", 8192),
                   tie_word_embeddings=hf.get("tie_word_embeddings", True), attention_bias=hf.get("attention_bias", False),
                   qk_norm=family == "gemma3", sliding_windows=windows, family=family,
                   attn_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5,
                   attn_softcap=hf.get("attn_logit_softcapping") or 0.0,
                   final_softcap=hf.get("final_logit_softcapping") or 0.0,
                   rope_local_theta=local if family == "gemma3" else 0.0,
                   rope_factor=scaling.get("factor", 1.0) if scaling_type == "linear" else 1.0)


class GemmaRMSNorm(RMSNorm):
    """x / sqrt(mean(x^2) + eps) * (1 + weight), the gain applied in fp32 before the cast (transformers' Gemma2RMSNorm:
    the weight starts at 0)."""

    gain = property(lambda self: 1.0 + self.weight)

    def __init__(self, dim, eps):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)  # a gain of 1

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight.float())).type_as(x)


class GemmaMLP(LlamaMLP):
    act = "gelu_tanh"


class GemmaBlock(SiteBlock):
    def __init__(self, config, window=0):
        super().__init__()
        C, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm, self.post_attention_layernorm = GemmaRMSNorm(C, eps), GemmaRMSNorm(C, eps)
        self.self_attn = LlamaAttention(config, window, norm=GemmaRMSNorm)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = GemmaRMSNorm(C, eps), GemmaRMSNorm(C, eps)
        self.mlp = GemmaMLP(config)
        self.sliding = window > 0

    mlp_norm = property(lambda self: self.pre_feedforward_layernorm)
    attend = lambda self, x, cos, sin: self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
    mlp_out = lambda self, h: self.post_feedforward_layernorm(self.mlp.down_proj(h))


class Gemma(Llama):
    """Llama.from_pretrained reads it: a Hub id (google/gemma-2-2b, google/gemma-3-1b-pt, google/gemma-3-4b-pt, ...) or
    a local directory of a Gemma2ForCausalLM, a Gemma3ForCausalLM or a Gemma3ForConditionalGeneration (its text
    model: text_weights)."""
    config_class = GemmaConfig

    def __init__(self, config):
        LanguageModel.__init__(self)
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList([GemmaBlock(config, w) for w in config.sliding_windows]),
            norm=GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config) / config.rope_factor, persistent=False)
        local = replace(config, rope_theta=config.rope_local_theta or config.rope_theta, rope_scaling=None)
        self.register_buffer("inv_freq_local", rope_inv_freq(local), persistent=False)
        for module in self.modules():  # a random init for tests (from_pretrained overwrites every weight)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    @staticmethod
    def text_weights(sd):
        """A multimodal Gemma 3's text model, renamed as Gemma3ForCausalLM names it: language_model.model.* (its Hub
        files) or model.language_model.* (transformers 5's modules) -> model.*, language_model.lm_head -> lm_head;
        the vision tower and the projector left out. Other checkpoints as they are."""
        prefixes = {"language_model.model.": "model.", "model.language_model.": "model.",
                    "language_model.lm_head.": "lm_head.", "lm_head.": "lm_head."}
        if not any(k.startswith(("language_model.", "model.language_model.")) for k in sd):
            return sd
        return {new + k[len(old):]: v for k, v in sd.items() for old, new in prefixes.items() if k.startswith(old)}

    def down_proj(self, layer):
        raise ValueError("Gemma's MLP output passes post_feedforward_layernorm: no one matrix takes mlp_hidden to the "
                         "residual stream")

    def forward(self, idx, layer=None, site=None, edit=None, head=True):
        """idx (B, T) -> logits (B, T, vocab); (layer, site, edit, head) as in GPT.forward."""
        T = idx.size(1)
        x = self.model.embed_tokens(idx)                                              # (B, T, C)
        x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)           # in the weights' dtype
        rope = {sliding: rope_table(inv_freq, T, x.dtype)  # the global layers' and the sliding ones'
                for sliding, inv_freq in ((False, self.inv_freq), (True, self.inv_freq_local))}
        edited = layers_of(layer)
        for i, block in enumerate(self.model.layers):
            cos, sin = rope[block.sliding]
            x = block(x, cos, sin, site=site, edit=edit) if i in edited else block(x, cos, sin)
        x = self.model.norm(x)
        if not head:
            return x                                                                  # (B, T, C)
        logits = self.lm_head(x)                                                      # (B, T, vocab)
        cap = self.config.final_softcap
        return torch.tanh(logits / cap) * cap if cap else logits


# --- loading either family from a Hugging Face checkpoint

def checkpoint_file(name_or_path, filename):
    """A file of a local directory or a Hub repo (fetched and cached), None if absent; offline: one line."""
    return hub_file(name_or_path, filename, f"--init_from={name_or_path}")


def read_hf_config(name_or_path):
    config_file = checkpoint_file(name_or_path, "config.json")
    if config_file is None:
        raise ValueError(f"{name_or_path}: no config.json; expected a directory written by save_pretrained")
    return json.load(open(config_file)), config_file


def find_checkpoint(name_or_path):
    """-> (config.json's dict, its path, [weight files]): model.safetensors, the shards that
    model.safetensors.index.json names (a large model), or pytorch_model.bin."""
    hf, config_file = read_hf_config(name_or_path)
    index_name = "model.safetensors.index.json"
    for weights in ("model.safetensors", index_name, "pytorch_model.bin"):
        path = checkpoint_file(name_or_path, weights)
        if path and weights == index_name:
            shards = sorted(set(json.load(open(path))["weight_map"].values()))
            return hf, config_file, [checkpoint_file(name_or_path, shard) for shard in shards]
        if path:
            return hf, config_file, [path]
    raise ValueError(f"{name_or_path}: neither model.safetensors, {index_name} nor pytorch_model.bin")


def read_weights(files):
    """The state dict in one or several safetensors or .bin files, as fp32 tensors."""
    from safetensors.torch import load_file
    sd = {}
    for f in files:
        sd.update(load_file(f) if f.endswith(".safetensors") else torch.load(f, map_location="cpu", weights_only=True))
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


@torch.no_grad()
def copy_state_dict_(model, sd_hf, source, skip=()):
    """Copies sd_hf into model key for key: every key of the model (but `skip`) present, none unknown,
    every shape as config.json implies; a mismatch names the keys."""
    sd = model.state_dict()
    keys = [k for k in sd if k not in skip]
    missing, unexpected = sorted(set(keys) - set(sd_hf)), sorted(set(sd_hf) - set(keys))
    if missing or unexpected:
        raise ValueError(f"{source}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
                         f"{' (and more)' if len(missing) > 5 or len(unexpected) > 5 else ''}")
    for k in keys:
        if sd_hf[k].shape != sd[k].shape:
            raise ValueError(f"{source}: {k} has shape {tuple(sd_hf[k].shape)}, config.json implies {tuple(sd[k].shape)}")
        sd[k].copy_(sd_hf[k])


def model_family(name_or_path):
    """'gpt2', 'llama' or 'gemma' from config.json's architectures (or model_type); anything else is a ValueError."""
    hf, _ = read_hf_config(name_or_path)  # before any weights: an unsupported model is not downloaded
    arch = (hf.get("architectures") or [None])[0]
    supported = {**GPT2_FAMILY, **LLAMA_FAMILY, **GEMMA_FAMILY}
    model_types = {**{v: v for v in supported.values()}, "gemma3_text": "gemma3"}  # gemma3: the multimodal model
    family = supported.get(arch) or model_types.get(hf.get("model_type"))
    if family is None:
        raise ValueError(f"{name_or_path}: architecture {arch or hf.get('model_type')!r} is not supported; "
                         f"supported: {', '.join(supported)}")
    return "gpt2" if family == "gpt2" else "gemma" if family in GEMMA_FAMILY.values() else "llama"


def load_model(name_or_path):
    """GPT-2, a Llama-family or a Gemma model from a Hub id or a local directory, chosen by its config.json."""
    return {"gpt2": GPT, "llama": Llama, "gemma": Gemma}[model_family(name_or_path)].from_pretrained(name_or_path)


def load_lm(cfg, has_site=True):
    """The frozen model a run reads: a random GPT-2 (init_from=scratch) or a checkpoint of either family; its
    (layer, site) checked unless has_site is False (a fine-tune reads none). model.tokenizer is the spec of its
    tokenizer for prepare.load_tokenizer: the checkpoint's own tokenizer.json (the Llama family, or a GPT-2
    directory that has one), else tiktoken's gpt2."""
    if cfg.init_from == "scratch":  # a random GPT-2 of the given size (nanoGPT), the same for the same seed
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
    else:
        model = load_model(cfg.init_from)
    own = isinstance(model, Llama) or os.path.isfile(os.path.join(cfg.init_from, "tokenizer.json"))
    model.tokenizer = cfg.init_from if own else "gpt2"
    if has_site:
        check_site(model.config, cfg.layer, cfg.site)
    if cfg.block_size > model.config.block_size:
        raise ValueError(f"--block_size={cfg.block_size}: the model has {model.config.block_size} positions")
    return model.eval().requires_grad_(False)


def check_site(config, layer, site):
    if site not in SITES:
        raise ValueError(f"unknown site '{site}'; valid sites: {', '.join(SITES)}")
    if not 0 <= layer < config.n_layer:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{config.n_layer - 1}")


def site_width(config, site):
    return config.n_inner if site == "mlp_hidden" else config.n_embd


def site_widths(config, cfg):
    """(d_in, d_out): the input site's width and the target's (0 for an SAE)."""
    return site_width(config, cfg.site), site_width(config, cfg.target_site) if is_transcoder(cfg) else 0


# -----------------------------------------------------------------------------
# activations: what an SAE reads, (N, d_in) rows of one (layer, site): the model's harvest through a
# shuffling buffer, a .npy file, or the activation cache (harvested once to disk)

def activation_source(cfg, device, autocast, rank=0, world=1, layers=None):
    """-> (source of training batches, (d_in, d_out), model or None, val contexts for evaluation, val rows or None);
    d_out is the target's width for a transcoder (its rows (N, d_in + d_out): input and target side by side), 0 for
    an SAE. layers (--layers; default (cfg.layer,)): a row holds each layer's d_in + d_out columns, in layer order.
    The source is a .npy file, an activation cache, or the model's harvest over the token shards through the
    shuffling buffer. Evaluation runs the val contexts through the model (FVU, and CE and KL with the SAE
    spliced in) wherever there is a model and its token shards; else it scores the held-out rows (FVU only)."""
    if cfg.acts:
        source = ActsFile(cfg.acts, cfg.batch_size, cfg.eval_tokens, cfg.seed, rank, world, cfg.micro_batches,
                          pin=torch.device(device).type == "cuda")
        widths = cache_widths(cfg.acts) if os.path.isdir(cfg.acts) else (source.width, 0)
        shards = os.path.isdir(cfg.acts) and glob.glob(os.path.join(cfg.data_dir, "*_val_*.bin"))
        if os.path.isdir(cfg.acts) and not shards and rank == 0:
            print(f"{cfg.acts}: no token shards at {cfg.data_dir} (the cache's data_dir): evaluation without CE and KL")
        if not shards:  # no model to run: evaluation scores the held-out rows (rank 0 alone evaluates)
            return source, widths, None, [], source.val() if rank == 0 else None
    layers = layers or (cfg.layer,)
    model = load_lm(cfg).to(device)
    for layer in layers:
        check_site(model.config, layer, cfg.site)
    check_tokenizer(cfg.data_dir, model.tokenizer)
    if not cfg.acts:
        loader = DataLoaderLite(cfg.data_dir, "train", cfg.harvest_batch, cfg.block_size, rank, world)
        def harvest(idx):
            with torch.no_grad(), autocast:
                return model.harvest(idx.to(device), layers, sites_of(cfg))  # (B, T, L (d_in + d_out))
        source = ActivationBuffer(harvest, loader, cfg.buffer_tokens, cfg.batch_size // world, cfg.seed + rank,
                                  cfg.exclude_pos0)
        widths = site_widths(model.config, cfg)
    if rank != 0:  # rank 0 alone evaluates
        return source, widths, model, [], None
    # the same contexts every time
    contexts = val_contexts(cfg.data_dir, cfg.eval_block_size or cfg.block_size, cfg.eval_tokens, "evaluation")
    return source, widths, model, [b.to(device) for b in contexts.split(cfg.harvest_batch)], None


class ActivationBuffer:
    """Harvests contexts into halves of n_tokens/2 activations and serves shuffled batches, refilling a half
    whenever half a buffer has been served, so that a batch mixes the documents of n_tokens/block_size contexts.
    Period t serves a shuffle of the second quarter of half t-1 and the first quarter of half t (each
    half's rows in an order seeded by (seed, t)): every activation is served once (except the first
    quarter of half 0), and the state is (t, served, loader position before half t-1): resume re-harvests
    two halves and continues exactly.
    Memory: the two halves are one (2 * half, d) fp32 block, allocated once (800 MiB at the defaults) and refilled
    in place (half t from row first_row(t), over half t-2, all of it served by then); a batch is gathered from it
    by the period's serving order, an index, so no shuffled copy of a half is ever made. Allocating and freeing
    400 MiB halves at each refill fragmented the heap: resident memory grew by 0.4-0.7 GiB a refill."""

    def __init__(self, harvest, loader, n_tokens, batch_size, seed, exclude_pos0):
        self.harvest, self.loader, self.batch_size = harvest, loader, batch_size
        self.half, self.seed, self.exclude_pos0 = n_tokens // 2, seed, exclude_pos0
        self.store = None  # (2 * half, d) fp32, allocated at the first harvest (d and the device come from it)

    def first_row(self, t):
        """Where half t lives in the store: rows first_row(t) to first_row(t) + half."""
        return (t % 2) * self.half

    def fill(self, t):
        """Harvests whole contexts into half t's rows of the store until they are full; the surplus of the last
        context batch is dropped."""
        n, start = 0, self.first_row(t)
        while n < self.half:
            acts = self.harvest(self.loader.next_batch())  # (B, T, d)
            acts = acts[:, 1:] if self.exclude_pos0 else acts
            acts = acts.reshape(-1, acts.shape[-1])        # (B*T', d)
            if self.store is None:
                self.store = torch.empty(2 * self.half, acts.shape[-1], device=acts.device)
            take = min(len(acts), self.half - n)
            self.store[start + n:start + n + take] = acts[:take]  # cast to fp32 in the copy
            n += take

    def order(self, t):
        return torch.randperm(self.half, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + t))

    def start(self, state=None):
        state = state or {"period": 1, "served": 0, "loader": self.loader.state_dict()}
        self.loader.load_state_dict(state["loader"])
        self.period, self.served, self.prev_loader = state["period"], state["served"], state["loader"]
        self.fill(self.period - 1)  # half t-1
        self.cur_loader = self.loader.state_dict()
        self.fill(self.period)      # half t
        self.make_order()

    def make_order(self):
        """The period's serving order, as rows of the store: a shuffle of half t-1's second quarter and half t's
        first."""
        q, t = self.half // 2, self.period
        rows = torch.cat([self.order(t - 1)[q:] + self.first_row(t - 1), self.order(t)[:q] + self.first_row(t)])
        rows = rows[torch.randperm(self.half, generator=torch.Generator().manual_seed(-self.seed - t - 1))]
        self.serving = rows.to(self.store.device)  # copied once a period, not a batch at a time (each copy would wait)

    def next_batch(self):
        if self.served == self.half:  # half a buffer served: refill the older half
            self.period, self.served = self.period + 1, 0
            self.prev_loader, self.cur_loader = self.cur_loader, self.loader.state_dict()
            self.fill(self.period)
            self.make_order()
        rows = self.serving[self.served:self.served + self.batch_size]
        self.served += self.batch_size
        return self.store[rows]  # (batch_size, d), a copy

    def sample(self, n, generator):
        """n random activations from the buffer (for init and resampling), i < half from half t-1 and the rest
        from half t; consumes nothing."""
        i = torch.randint(2 * self.half, (n,), generator=generator)  # over both halves
        return self.store[((i + self.first_row(self.period - 1)) % (2 * self.half)).to(self.store.device)]

    def state_dict(self):
        return {"period": self.period, "served": self.served, "loader": self.prev_loader}


class ActsFile:
    """Batches of activations on disk: a (N, d_in) float .npy file, whose first `n_val` rows are held out for
    evaluation, or an activation cache directory (--mode=cache), whose val split is. The training rows are
    reshuffled each epoch (order seeded by (seed, epoch)); rank r takes slice r of each global batch, read as
    `pieces` slices in a row (each in the order a rank of a world * pieces run reads its own). With pin (training on
    a GPU), batches land in page-locked memory, which the copy to the GPU reads without the host waiting for it
    (non_blocking): the next batch is read from disk while the GPU trains on this one."""

    def __init__(self, path, batch_size, n_val, seed, rank=0, world=1, pieces=1, pin=False):
        if os.path.isdir(path):
            manifest = read_cache_manifest(path)
            self.parts = [np.load(os.path.join(path, f), mmap_mode="r") for f in manifest["train"]["files"]]
            self.val_parts = [np.load(os.path.join(path, f), mmap_mode="r") for f in manifest["val"]["files"]]
        else:
            if not os.path.isfile(path):
                raise ValueError(f"--acts={path}: no such file or activation cache directory")
            try:
                data = np.load(path, mmap_mode="r")
            except ValueError as e:
                raise ValueError(f"--acts={path}: not a .npy array ({e})") from None
            if data.ndim != 2 or data.dtype.kind != "f":
                raise ValueError(f"--acts={path}: expected a 2-D float array (N, d_in), got {data.dtype} {data.shape}")
            n_val = min(n_val, len(data) // 10)
            self.parts, self.val_parts = [data[n_val:]], [data[:n_val]]
        self.offsets = np.cumsum([0] + [len(part) for part in self.parts])  # global row i is in part searchsorted(i)
        self.n_train, self.width = int(self.offsets[-1]), self.parts[0].shape[1]  # d_in (+ d_out: a transcoder's)
        if self.n_train < batch_size:
            raise ValueError(f"--acts={path}: {self.n_train} training rows, fewer than one batch of {batch_size}")
        self.batch_size, self.seed, self.rank, self.world, self.pieces = batch_size, seed, rank, world, pieces
        self.pin = pin
        self.start()

    def rows(self, index, out=None):
        """Training rows `index` (sorted first: memory-mapped reads in file order) -> (n, d_in) fp32, into out if given
        (cast from the cache's dtype as they are copied)."""
        index = np.sort(index.numpy())
        part = np.searchsorted(self.offsets, index, side="right") - 1
        out = torch.empty(len(index), self.width, pin_memory=self.pin) if out is None else out
        np.concatenate([self.parts[p][index[part == p] - self.offsets[p]] for p in np.unique(part)], out=out.numpy())
        return out

    def start(self, state=None):
        state = state or {"epoch": 0, "index": 0}
        self.epoch, self.index = state["epoch"], state["index"]
        self.perm = torch.randperm(self.n_train, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))

    def next_batch(self):
        if self.index + self.batch_size > len(self.perm):  # drop the last partial batch; next epoch
            self.start({"epoch": self.epoch + 1, "index": 0})
        b = self.batch_size // self.world
        batch = self.perm[self.index + self.rank * b:self.index + (self.rank + 1) * b]
        self.index += self.batch_size
        out = torch.empty(b, self.width, pin_memory=self.pin)
        for piece, rows in zip(batch.chunk(self.pieces), out.chunk(self.pieces)):
            self.rows(piece, rows)
        return out

    def sample(self, n, generator):
        return self.rows(torch.randint(self.n_train, (n,), generator=generator))

    def val(self):
        """The held-out rows, read when evaluation needs them -> (n_val, d_in) fp32, a copy (a memmap is read-only)."""
        return torch.from_numpy(np.concatenate(self.val_parts).astype(np.float32))

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}


# the activation cache: one (model, layer, site) harvested once to disk, so that a sweep or a comparison pays
# the model's forward once. cache_dir/manifest.json says what it holds; acts_val_000000.npy holds the val
# split's first eval_tokens tokens (the contexts evaluation reads), acts_train_*.npy the train split's.

CACHE_SETTINGS = ("init_from", "layer", "layers", "site", "target_site", "block_size", "exclude_pos0", "data_dir", "harvest_batch",
                  "cache_tokens", "cache_dtype", "cache_shard_tokens", "eval_tokens", "n_layer", "n_head", "n_embd", "seed")
CACHE_DTYPES = ("float16", "float32")


def read_cache_manifest(cache_dir, complete=True):
    path = os.path.join(cache_dir, "manifest.json")
    if not os.path.isfile(path):
        raise ValueError(f"{cache_dir}: no manifest.json; HINT: write the cache with python sae.py --mode=cache "
                         f"--cache_dir={cache_dir}")
    manifest = upgrade_cache_manifest(json.load(open(path)))
    if complete and not manifest["complete"]:
        raise ValueError(f"{cache_dir}: the cache is incomplete ({manifest['train']['rows']:,} of "
                         f"{manifest['settings']['cache_tokens']:,} rows); HINT: rerun its --mode=cache command")
    return manifest


def upgrade_cache_manifest(manifest):
    """A manifest in this version's layout: one that names no target_site held one site (an SAE's rows, d_out 0), and
    one that names no layers held one layer. A missing harvest_dtype stays missing: write_activation_cache resumes
    it in this run's dtype."""
    for key in ("target_site", "layers"):  # setdefault: a manifest rewritten on resume keeps its keys' order
        manifest["settings"].setdefault(key, "")
    manifest.setdefault("d_out", 0)
    return manifest


def cache_widths(cache_dir):
    """(d_in, d_out) of a cache's rows: a transcoder's cache holds input and target side by side, an SAE's d_out 0."""
    manifest = read_cache_manifest(cache_dir, complete=False)
    return manifest["d_in"], manifest["d_out"]


# json, .npy and ckpt.pt files written with prepare.write_atomic: into path.tmp, then renamed
write_json = lambda path, obj: write_atomic(path, lambda f: json.dump(obj, f, indent=1))
write_npy = lambda path, array: write_atomic(path, lambda f: np.save(f, array), "wb")


def progress(iterable=None, **kwargs):
    """A tqdm progress bar (tqdm comes with datasets) for the long work that is not training: caching,
    evaluation, dashboards. Shown on a terminal only (disable=None), so redirected logs stay line by line."""
    from tqdm import tqdm
    return tqdm(iterable, disable=None, dynamic_ncols=True, **kwargs)


@torch.no_grad()
def write_activation_cache(cfg, device, autocast):
    """--mode=cache: the model's activations at (layer, site) (a transcoder's: site and target_site side by side, from
    one forward; with --layers, every layer's side by side in layer order) over the val split's first eval_tokens tokens and cache_tokens rows of the train split, in .npy
    shards of about cache_shard_tokens rows each (whole harvest batches), each written under a temporary name and
    renamed; manifest.json records every finished shard and the loader's position, so a rerun of the same command
    resumes after the last one."""
    from prepare import read_tokenizer_record
    os.makedirs(cfg.cache_dir, exist_ok=True)
    path = lambda name: os.path.join(cfg.cache_dir, name)
    settings = {k: getattr(cfg, k) for k in CACHE_SETTINGS}
    settings["harvest_dtype"] = resolved_dtype(cfg, torch.device(device).type)  # the shards of one cache share it
    manifest = read_cache_manifest(cfg.cache_dir, complete=False) if os.path.exists(path("manifest.json")) else None
    if manifest:  # a cache whose manifest records no harvest dtype resumes in this run's
        manifest["settings"].setdefault("harvest_dtype", settings["harvest_dtype"])
    if manifest and manifest["settings"] != settings:
        changed = sorted(k for k in settings if manifest["settings"].get(k) != settings[k])
        raise ValueError(f"{cfg.cache_dir} holds a cache of other settings ({', '.join(changed)} differ); use another "
                         f"--cache_dir or delete it")
    if manifest and manifest["complete"]:
        print(f"{cfg.cache_dir}: complete ({manifest['train']['rows']:,} train rows); nothing to do")
        return manifest
    layers = parse_layers(cfg.layers, model_n_layer(cfg)) if cfg.layers else [cfg.layer]
    model = load_lm(replace(cfg, layer=layers[0])).to(device)
    check_tokenizer(cfg.data_dir, model.tokenizer)
    keep = 1 if cfg.exclude_pos0 else 0  # the positions training reads
    (d_in, d_out), dtype = site_widths(model.config, cfg), np.dtype(cfg.cache_dtype)
    width = len(layers) * (d_in + d_out)

    def harvest(idx):  # (B, T) -> (B * (T - keep), L (d_in + d_out)) in the cache's dtype
        with autocast:
            acts = model.harvest(idx.to(device), tuple(layers), sites_of(cfg))[:, keep:].reshape(-1, width).float()
        if not torch.isfinite(acts.to(getattr(torch, cfg.cache_dtype))).all():
            raise ValueError(f"activations at layer {cfg.layers or cfg.layer} {'/'.join(sites_of(cfg))} overflow "
                             f"{cfg.cache_dtype}: use --cache_dtype=float32")
        return acts.cpu().numpy().astype(dtype)

    loader = DataLoaderLite(cfg.data_dir, "train", cfg.harvest_batch, cfg.block_size)
    rows_per_batch = cfg.harvest_batch * (cfg.block_size - keep)
    available = sum(n // (cfg.harvest_batch * cfg.block_size) for n in loader.lengths) * rows_per_batch
    if manifest is None:
        contexts = val_contexts(cfg.data_dir, cfg.block_size, cfg.eval_tokens, "cache")
        write_npy(path("acts_val_000000.npy"), np.concatenate([harvest(b) for b in contexts.split(cfg.harvest_batch)]))
        if cfg.cache_tokens > available:  # the loader would wrap around and repeat the split
            print(f"cache: the train split gives {available:,} rows of {cfg.block_size - keep} positions a context, "
                  f"fewer than --cache_tokens={cfg.cache_tokens:,}; caching those")
        local = lambda path: os.path.abspath(path) if os.path.isdir(path) else path  # readable from any directory
        manifest = {"settings": settings, "model": local(cfg.init_from), "layer": layers[0], "layers": layers, "site": cfg.site,
                    "target_site": cfg.target_site if d_out else "", "d_in": d_in, "d_out": d_out, "dtype": cfg.cache_dtype,
                    "tokenizer": read_tokenizer_record(cfg.data_dir) or model.tokenizer, "data_dir": local(cfg.data_dir),
                    "block_size": cfg.block_size, "exclude_pos0": cfg.exclude_pos0,
                    "rows_target": min(cfg.cache_tokens, available),
                    "val": {"files": ["acts_val_000000.npy"], "rows": len(contexts) * (cfg.block_size - keep),
                            "tokens": contexts.numel()},
                    "train": {"files": [], "rows": 0, "tokens": 0}, "loader": loader.state_dict(), "complete": False}
        write_json(path("manifest.json"), manifest)
    loader.load_state_dict(manifest["loader"])
    batches_per_shard = max(1, cfg.cache_shard_tokens // rows_per_batch)
    t0, rows_before = time.time(), manifest["train"]["rows"]
    bar = progress(total=manifest["rows_target"], initial=rows_before, unit="row", unit_scale=True, desc="cache")
    while manifest["train"]["rows"] < manifest["rows_target"]:
        need = manifest["rows_target"] - manifest["train"]["rows"]
        n_batches = min(batches_per_shard, -(-need // rows_per_batch))
        shard = []
        for _ in range(n_batches):
            shard.append(harvest(loader.next_batch()))
            bar.update(min(rows_per_batch, need - rows_per_batch * (len(shard) - 1)))
        shard = np.concatenate(shard)[:need]  # (rows, L (d_in + d_out))
        name = f"acts_train_{len(manifest['train']['files']) + 1:06d}.npy"
        write_npy(path(name), shard)
        train = manifest["train"]
        train.update(files=train["files"] + [name], rows=train["rows"] + len(shard),
                     tokens=train["tokens"] + n_batches * cfg.harvest_batch * cfg.block_size)
        manifest["loader"] = loader.state_dict()
        write_json(path("manifest.json"), manifest)  # the shard counts only once the manifest names it
        print(f"cache: {name} | {train['rows']:,} of {manifest['rows_target']:,} rows | "
              f"{(train['rows'] - rows_before) / (time.time() - t0):,.0f} rows/s")
    bar.close()
    manifest["complete"] = True
    write_json(path("manifest.json"), manifest)
    print(f"wrote {manifest['train']['rows']:,} train and {manifest['val']['rows']:,} val rows of {cfg.init_from} "
          f"layer {cfg.layers or cfg.layer} {' + '.join(sites_of(cfg))} ({cfg.cache_dtype}, d {width}) to {cfg.cache_dir}")
    return manifest


# -----------------------------------------------------------------------------
# the SAEs. Every architecture shares the affine maps of Bricken et al. 2023, with a pre-encoder bias,
#   pre = (x - b_dec) @ W_enc + b_enc (N, d_sae),   x_hat = f @ W_dec + b_dec (N, d_in),
# and differs in the code f, the loss's terms and what inference keeps (docs/training.md "architectures"):
#   relu        f = relu(pre); + l1 sum_i f_i (or sum_i f_i |W_dec,i| with free decoder norms)
#   topk        the k largest pre of each token, relu'd (Gao et al. 2024); + AuxK
#   batchtopk   the k N largest relu(pre) of the batch (Bussmann et al. 2024); inference: pre where pre > theta,
#               one global theta estimated in training; + AuxK
#   matryoshka  batchtopk, the reconstruction error averaged over nested prefixes of the dictionary
#               (Bussmann et al. 2025); + AuxK
#   jumprelu    pre where pre > theta_i, theta_i learned through straight-through estimators
#               (Rajamanoharan et al. 2024); + l0 #(f > 0)
#   fsq         topk, then each active value bounded and rounded to one of fsq_levels levels with a
#               straight-through gradient (finite scalar quantisation, Mentzer et al. 2023); + AuxK
#   vae         f = relu(z), z ~ N(pre, sigma_i^2) in training and z = pre at inference (Kingma & Welling 2014);
#               + kl KL(N(pre, sigma^2) || N(m, 1)), m < 0 so that most features sit below 0
# The k-sparse ones (K_SPARSE) never form a dense code in training: pre comes without autograd, the selection
# gives (indices, values) (N, K), and sae_kernels.sparse_encode / sparse_decode carry the gradients through the
# selected entries only. Decoder rows are kept at unit norm except with --l1_by_decoder_norm.
# A transcoder (Dunefsky et al. 2024) is any of them reading x_in (N, d_in) and predicting the target y (N, d_out)
# at a later site: pre = (x_in - b_in) @ W_enc + b_enc, y_hat = f @ W_dec + b_dec, W_dec (d_sae, d_out), its own
# input bias b_in; a skip transcoder (Paulo et al. 2025) adds x_in @ W_skip^T, W_skip (d_out, d_in) starting at 0.
# Its batches hold [x_in | y] side by side (split()), so the buffer, the cache and the sweeps are an SAE's.

def matryoshka_prefixes(spec, d_sae):
    """The nested dictionary sizes: spec, or () for the SAEBench recipe's groups of 1/32, 1/16, 1/8, 1/4 and the
    rest of d_sae, i.e. prefixes at d_sae x (1, 3, 7, 15, 32) / 32."""
    return tuple(spec) if spec else tuple(max(1, d_sae * n // 32) for n in (1, 3, 7, 15)) + (d_sae,)


class SAEOutput(NamedTuple):
    """What SAE.forward returns, every architecture alike."""
    x_hat: torch.Tensor   # (N, d_out) the reconstruction (a transcoder's prediction)
    f: torch.Tensor       # (N, d_sae) the code, in units of unit-norm decoder rows; None with code=False
    l1: torch.Tensor      # (N,) sum_i f_i (relu with free norms: sum_i f_i |W_dec,i|, from unscaled f)
    l0: torch.Tensor      # (N,) int32, active features a row
    fired: torch.Tensor   # (d_sae,) int32, rows each feature is active in


class SAE(nn.Module):
    def __init__(self, d_in, d_sae, *, arch="relu", k=32, free_norms=False, init_threshold=0.1, fsq_levels=8,
                 prefixes=(), init_norm=0.0, d_out=0, skip=False):
        super().__init__()
        self.arch, self.k, self.free_norms, self.fsq_levels, self.prefixes = arch, k, free_norms, fsq_levels, prefixes
        self.transcoder, self.d_in, self.d_out = d_out > 0, d_in, d_out or d_in  # d_out 0: an SAE
        self.skips = skip
        init_norm = init_norm or INIT_NORM[arch]
        # random dictionary directions; the encoder starts as their transpose scaled to init_norm ("tied" init), and
        # free decoder rows start at that norm too (SAELens 6's decoder_init_norm); unit-norm rows start at 1. A
        # transcoder's encoder reads another space: its own random unit directions, at the same norm
        W_dec = F.normalize(torch.randn(d_sae, self.d_out), dim=1)
        W_in = F.normalize(torch.randn(d_sae, d_in), dim=1) if self.transcoder else W_dec
        # contiguous: W_in.T * c would keep the transpose's strides, and every step's gradient (row-major from the
        # matmul) would then be copied into them, a strided copy that cost a tenth of a CPU step
        self.W_enc = nn.Parameter((W_in.T * init_norm).contiguous())  # (d_in, d_sae)
        W_dec = W_dec * (init_norm if free_norms else 1.0)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(W_dec)                      # (d_sae, d_out)
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))    # an SAE's pre-encoder bias too, subtracted before encoding
        if self.transcoder:
            self.b_in = nn.Parameter(torch.zeros(d_in))       # the input's own
        if skip:
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in))  # (d_out, d_in), SAELens's layout
        if arch == "jumprelu":  # the threshold itself, not its log: under Adam a log threshold hardly moves
            self.threshold = nn.Parameter(torch.full((d_sae,), float(init_threshold)))  # (SAELens PR #718)
        if arch in ("batchtopk", "matryoshka"):  # the global inference threshold; 0 until training estimates it
            self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        if arch == "fsq":  # each feature's top level; E|y|^2 = d_out shared by k features starts it at sqrt(d_out / k)
            self.log_scale = nn.Parameter(torch.full((d_sae,), 0.5 * math.log(self.d_out / k)))
        if arch == "vae":  # the posterior's standard deviation per feature, starting small
            self.log_sigma = nn.Parameter(torch.full((d_sae,), math.log(0.1)))

    @classmethod
    def from_config(cls, widths, cfg):
        """widths: (d_in, d_out), d_out 0 for an SAE (activation_source's)."""
        free_norms = cfg.l1_by_decoder_norm and cfg.arch == "relu"  # the others keep unit-norm rows
        return cls(widths[0], cfg.d_sae, arch=cfg.arch, k=cfg.k, free_norms=free_norms,
                   init_threshold=cfg.jumprelu_init_threshold, fsq_levels=cfg.fsq_levels,
                   prefixes=matryoshka_prefixes(cfg.matryoshka_prefixes, cfg.d_sae), init_norm=cfg.init_norm,
                   d_out=widths[1], skip=cfg.skip)

    b_pre = property(lambda self: self.b_in if self.transcoder else self.b_dec)  # the bias subtracted before encoding

    def split(self, x):
        """A batch's rows -> (what the SAE reads, what it reconstructs): (x, x) for an SAE; ([:, :d_in], [:, d_in:])
        of a transcoder's [x_in | y] (N, d_in + d_out)."""
        return (x[:, :self.d_in], x[:, self.d_in:]) if self.transcoder else (x, x)

    def skip_out(self, x_in):
        """The skip transcoder's linear path x_in @ W_skip^T: (N, d_in) @ (d_in, d_out); 0 without one."""
        return linear(x_in, self.W_skip) if self.skips else 0

    def latent_params(self):
        """The per-feature parameters besides W_enc's columns, b_enc and W_dec's rows (d_sae,)."""
        return [getattr(self, n) for n in ("threshold", "log_scale", "log_sigma")
                if isinstance(getattr(self, n, None), nn.Parameter)]

    def pre(self, x):
        """The dense pre-activations, (x - b_pre) @ W_enc + b_enc: (N, d_in) @ (d_in, d_sae) -> (N, d_sae)."""
        return linear(x - self.b_pre, self.W_enc.T, self.b_enc).float()  # fp32 also when the matmul ran in bf16

    def encode(self, x):
        """x (N, d_in) -> the code f (N, d_sae) that forward() decodes, of every architecture. relu with free decoder
        norms scales relu(pre) by the rows' norms: the code of the unit-norm dictionary, which the L1 term and every
        reader of f see (forward's fused kernel computes the same f, with x_hat, in one pass)."""
        pre = self.pre(x)
        if self.arch == "relu":
            return pre.relu() * self.W_dec.norm(dim=1) if self.free_norms else pre.relu()  # (N, d_sae) * (d_sae,)
        if self.arch in ("topk", "fsq"):
            values, indices = pre.topk(self.k, dim=1)  # (N, k), then relu: SAELens's and OpenAI's order
            values = fsq_code(values, self.log_scale[indices], self.fsq_levels) if self.arch == "fsq" else values.relu()
            return torch.zeros_like(pre).scatter_(1, indices, values)
        if self.arch in ("batchtopk", "matryoshka"):
            if self.threshold == 0:  # not estimated yet: the training selection over this batch
                indices, keep, _ = batch_topk_select(pre, self.k)
                return torch.zeros_like(pre).scatter_(1, indices, pre.gather(1, indices) * keep)
            return pre * (pre > self.threshold)  # a JumpReLU with one threshold (> 0: relu included)
        if self.arch == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        return pre.relu()  # vae: the posterior mean's code

    def forward(self, x, *, code=True):
        """x (N, d_in) -> SAEOutput(x_hat (N, d_out), f (N, d_sae), l1 (N,), l0 (N,), fired (d_sae,)): encode()'s
        code and its decoding, with the code's statistics. A transcoder's x is its input x_in (split() a batch first),
        x_hat its prediction of the target. relu runs the fused kernel (sae_kernels.py), which weights l1 by the
        rows' norms with free norms. code=False (training, which reads x_hat and the statistics only): f is None,
        relu's scaled copy never made."""
        if self.arch == "relu":
            norms = self.W_dec.norm(dim=1) if self.free_norms else None  # (d_sae,)
            x_hat, f, l1, l0, fired = encode_relu_decode(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, scale=norms,
                                                         b_in=self.b_in if self.transcoder else None)
            if not code:
                f = None
            elif self.free_norms:
                f = f * norms  # (N, d_sae) * (d_sae,): encode()'s code
            return SAEOutput(x_hat + self.skip_out(x), f, l1, l0, fired)
        f = self.encode(x)
        x_hat = linear(f, self.W_dec.T, self.b_dec) + self.skip_out(x)  # (N, d_sae) @ (d_sae, d_out)
        active = f > 0
        return SAEOutput(x_hat, f if code else None, f.sum(dim=1), active.sum(dim=1, dtype=torch.int32),
                         active.sum(dim=0, dtype=torch.int32))

    def dictionary(self, on="dec"):
        """The unit-norm rows the JL penalty sees: W_dec's rows (d_sae, d_out), or W_enc's columns (d_sae, d_in)."""
        return F.normalize(self.W_dec if on == "dec" else self.W_enc.T, dim=1)

    @torch.no_grad()
    def remove_parallel_grad_(self):
        # the part of each row's gradient along the row only changes its norm, which is fixed at 1
        # (Bricken et al. 2023; openai/sparse_autoencoder's unit_norm_decoder_grad_adjustment_)
        if self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g -= (g * w).sum(dim=1, keepdim=True) * w  # (d_sae, d_out)

    @torch.no_grad()
    def unit_norm_decoder_(self):
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


# A cross-layer transcoder (CLT; Ameisen et al. 2025, "Circuit tracing", transformer-circuits.pub/2025/attribution-
# graphs/methods.html) over the L layers of --layers: layer l's d_sae features read layer l's input x_l and write the
# target of every layer t >= l,
#   pre_l = (x_l - b_in_l) @ W_enc_l + b_enc_l (N, d_sae),   f_l = the architecture's code of pre_l,
#   y_hat_t = sum_{l <= t} f_l @ W_dec_l[:, (t - l) d_out : (t - l + 1) d_out] + b_dec_t (+ x_t @ W_skip_t^T).
# W_dec_l (d_sae, (L - l) d_out) is one matrix: row i is feature i's decoders to layers l..L-1 side by side, and
# |W_dec_l,i| (that concatenated row's norm) is the decoder norm of the sparsity terms; the unit-norm architectures
# keep that concatenated row at norm 1. The k-sparse codes are selected per source layer (clt_topk_scope=layer: k a
# layer) or over all L d_sae features (all: k L a token for topk, k L N over the batch for batchtopk and matryoshka,
# one global threshold); matryoshka's prefixes nest within each layer's d_sae. A step's sparse decode gathers a
# layer's selected rows into all its (L - l) d_out columns at once, so it costs with the L0, not with d_sae L^2.
# Indices are per layer (i in 0..d_sae-1 of layer l); the tracker counts layer l's features at l d_sae + i.

class CrossLayerTranscoder(nn.Module):
    def __init__(self, n_layers, d_in, d_out, d_sae, *, arch="relu", k=32, free_norms=False, init_threshold=0.1,
                 prefixes=(), init_norm=0.0, skip=False, scope="layer"):
        super().__init__()
        assert arch in CLT_ARCHS, f"no cross-layer {arch}"
        self.arch, self.k, self.free_norms, self.prefixes, self.scope = arch, k, free_norms, prefixes, scope
        self.n_layers, self.d_in, self.d_out, self.d_sae, self.skips, self.transcoder = n_layers, d_in, d_out, d_sae, skip, True
        init_norm, L = init_norm or INIT_NORM[arch], n_layers
        W_enc, W_dec = [], []
        for l in range(L):  # the SAE's init, layer by layer: random unit rows, the encoder its own random directions
            W_dec.append(nn.Parameter(F.normalize(torch.randn(d_sae, (L - l) * d_out), dim=1) *
                                      (init_norm if free_norms else 1.0)))                    # (d_sae, (L - l) d_out)
            W_enc.append(nn.Parameter((F.normalize(torch.randn(d_sae, d_in), dim=1).T * init_norm).contiguous()))
        self.W_enc, self.W_dec = nn.ParameterList(W_enc), nn.ParameterList(W_dec)  # L x (d_in, d_sae), as above
        self.b_enc = nn.Parameter(torch.zeros(L, d_sae))
        self.b_in = nn.Parameter(torch.zeros(L, d_in))     # each source layer's input bias
        self.b_dec = nn.Parameter(torch.zeros(L, d_out))   # each target layer's output bias
        if skip:  # each target layer's linear path from its own input, (d_out, d_in) as the SAE's
            self.W_skip = nn.ParameterList([nn.Parameter(torch.zeros(d_out, d_in)) for _ in range(L)])
        if arch == "jumprelu":  # learned, per layer and feature
            self.threshold = nn.Parameter(torch.full((L, d_sae), float(init_threshold)))
        if arch in ("batchtopk", "matryoshka"):  # the inference thresholds, per layer (scope all: all equal)
            self.register_buffer("threshold", torch.zeros(L, dtype=torch.float64))

    @classmethod
    def from_config(cls, widths, cfg, n_layers):
        free_norms = cfg.l1_by_decoder_norm and cfg.arch == "relu"
        return cls(n_layers, widths[0], widths[1], cfg.d_sae, arch=cfg.arch, k=cfg.k, free_norms=free_norms,
                   init_threshold=cfg.jumprelu_init_threshold,
                   prefixes=matryoshka_prefixes(cfg.matryoshka_prefixes, cfg.d_sae), init_norm=cfg.init_norm,
                   skip=cfg.skip, scope=cfg.clt_topk_scope)

    def groups(self):
        """(encoder's parameters, decoder's) for Adam's two groups, as the SAE's."""
        encoder = [*self.W_enc, self.b_enc, self.b_in] + ([self.threshold] if self.arch == "jumprelu" else [])
        return encoder, [*self.W_dec, self.b_dec, *(self.W_skip if self.skips else [])]

    def split(self, x):
        """A row of every layer [x_0 | y_0 | x_1 | y_1 | ...] (N, L (d_in + d_out)) -> ([x_l (N, d_in)], y (N, L d_out)),
        the targets in layer order."""
        rows = x.view(len(x), self.n_layers, self.d_in + self.d_out)
        return [rows[:, l, :self.d_in] for l in range(self.n_layers)], rows[:, :, self.d_in:].reshape(len(x), -1)

    def pres(self, xs, start=0):
        """[pre_l (N, d_sae)], fp32, of the inputs xs of layers start, start + 1, ..."""
        return [linear(x - self.b_in[l], self.W_enc[l].T, self.b_enc[l]).float() for l, x in enumerate(xs, start)]

    def norms(self):
        """[|W_dec_l,i| (d_sae,)]: each feature's concatenated decoder row's norm."""
        return [W.norm(dim=1) for W in self.W_dec]

    def select(self, pres):
        """The k-sparse selections -> ([(indices (N, K), keep (N, K) bool)] per layer, indices within the layer; the
        smallest kept values (L,), batchtopk's and matryoshka's, else None). Scope all selects over the layers' features
        side by side (each layer's entries then masked in the others' lists; one smallest value, repeated L times)."""
        d, L = self.d_sae, len(pres)
        if self.scope == "all":
            cat = torch.cat(pres, dim=1)  # (N, L d_sae)
            if self.arch == "topk":
                top, indices = cat.topk(self.k * L, dim=1)
                keep, t = top > 0, None
            else:
                indices, keep, t = batch_topk_select(cat, self.k * L)
                t = t.expand(L)
            layer = indices // d
            sel = [(torch.where(layer == l, indices - l * d, 0), keep & (layer == l)) for l in range(L)]
        elif self.arch == "topk":
            sel = [(lambda top, i: (i, top > 0))(*pre.topk(self.k, dim=1)) for pre in pres]
            t = None
        else:
            picks = [batch_topk_select(pre, self.k) for pre in pres]
            sel, t = [(i, keep) for i, keep, _ in picks], torch.stack([p[2] for p in picks])
        return sel, t

    def code(self, pres, start=0):
        """The inference codes [f_l (N, d_sae)] of the pre-activations of layers start, start + 1, ... (topk with scope
        all: of all L layers at once)."""
        if self.arch == "relu":
            return [pre.relu() for pre in pres]
        if self.arch == "jumprelu":
            return [pre.relu() * (pre > th) for pre, th in zip(pres, self.threshold[start:])]
        if self.arch != "topk" and (self.threshold > 0).all():  # a JumpReLU of each layer's threshold
            return [pre * (pre > th) for pre, th in zip(pres, self.threshold[start:])]
        return [torch.zeros_like(pre).scatter_(1, i, pre.gather(1, i) * keep)
                for pre, (i, keep) in zip(pres, self.select(pres)[0])]

    def skip_out(self, xs):
        """[x_t @ W_skip_t^T] side by side (N, L d_out), or 0 without skip paths."""
        return torch.cat([linear(x, W) for x, W in zip(xs, self.W_skip)], dim=1) if self.skips else 0

    def decode(self, parts):
        """parts: [layer l's writes (N, (L - l) d_out)] -> their sum in target columns + b_dec (N, L d_out)."""
        return self.b_dec.reshape(-1) + sum(F.pad(part, (l * self.d_out, 0)) for l, part in enumerate(parts))

    def predict(self, fs, xs, t):
        """Target t's y_hat_t (N, d_out) from the codes and inputs of layers 0..t (the replacement forward's)."""
        cols = lambda l: slice((t - l) * self.d_out, (t - l + 1) * self.d_out)
        y = self.b_dec[t] + sum(f @ self.W_dec[l][:, cols(l)] for l, f in enumerate(fs[:t + 1]))
        return y + linear(xs[t], self.W_skip[t]) if self.skips else y

    def encode(self, xs):
        """[x_l (N, d_in)] -> the codes [f_l (N, d_sae)] that forward() decodes."""
        return self.code(self.pres(xs))

    def forward(self, xs):
        """[x_l (N, d_in)] -> (y_hat (N, L d_out), [f_l (N, d_sae)]), dense codes (evaluation)."""
        fs = self.encode(xs)
        return self.decode([f @ W for f, W in zip(fs, self.W_dec)]) + self.skip_out(xs), fs

    @torch.no_grad()
    def remove_parallel_grad_(self):  # the SAE's, on each concatenated row
        for W in self.W_dec:
            if W.grad is not None:
                W.grad -= (W.grad * W).sum(dim=1, keepdim=True) * W

    @torch.no_grad()
    def unit_norm_decoder_(self):
        for W in self.W_dec:
            W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def geometric_median(x, iters=100, eps=1e-8):
    """Weiszfeld's algorithm: argmin_y sum_i |x_i - y|, x (N, d) -> (d,). Starts at the mean."""
    y = x.mean(dim=0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(eps)  # (N,)
        y_next = (w[:, None] * x).sum(dim=0) / w.sum()
        if (y_next - y).norm() < 1e-6 * y.norm().clamp_min(1e-12):
            return y_next
        y = y_next
    return y


# -----------------------------------------------------------------------------
# the loss: each architecture's terms (reconstruction, its sparsity term, AuxK) and the JL penalty
# (sae_kernels.jl_penalty), with their coefficients' schedules

@dataclass
class Terms:
    """One batch's loss, term by term (scalar tensors; None where the architecture has no such term), and what the
    step tracks besides. sae_loss sums them: recon (mse where None) + the sparsity coefficient x sparsity (--loss=sparsity
    or hybrid) + auxk_coeff x auxk + pre_act_loss_coeff x pre_act + the JL coefficient x jl."""
    mse: torch.Tensor                # mean over the batch of sum over d_out of (y_hat - y)^2 (a CLT's: over all targets)
    l0: torch.Tensor                 # the mean number of active features a token (a measurement, never a gradient)
    fired: torch.Tensor              # (d_sae,) int: how many of the batch's tokens activated each feature
    sparsity: torch.Tensor = None    # the architecture's penalty, named by sparsity_name: relu's L1, jumprelu's L0, vae's KL
    recon: torch.Tensor = None       # matryoshka's reconstruction term: mse averaged over its nested prefixes
    auxk: torch.Tensor = None        # AuxK, in mse's units (k-sparse architectures, with dead features)
    pre_act: torch.Tensor = None     # jumprelu's pre-activation loss on dead features (--pre_act_loss_coeff)
    jl: torch.Tensor = None          # the JL penalty (--loss=jl or hybrid), set by sae_loss
    threshold_seen: torch.Tensor = None  # batchtopk, matryoshka: the batch's smallest kept value (a CLT's: per layer),
    # which sae_update folds into the inference threshold; with pieces, one row a piece (stacked)

    def logged(self, cfg):
        """{column: value}: the loss's terms, each named for what it is, then the code's L0 (the training line's)."""
        named = {"mse": self.mse, sparsity_name(cfg): self.sparsity, "recon": self.recon, "auxk": self.auxk,
                 "pre_act": self.pre_act, "jl": self.jl, "l0": self.l0}
        return {name: value for name, value in named.items() if value is not None}

    @staticmethod
    def mean_of_pieces(pieces):
        """The terms of a batch's pieces (detached) -> each term's mean over the pieces (added in piece order), fired
        summed, the thresholds seen stacked (one row a piece: sae_update averages each piece's EMA, as ranks')."""
        def combine(name, values):
            if values[0] is None:
                return None
            if name == "threshold_seen":
                return torch.stack(values)
            total = sum(values[1:], values[0])
            return total if name == "fired" else total / len(values)
        return Terms(**{f.name: combine(f.name, [getattr(p, f.name) for p in pieces]) for f in fields(Terms)})

    def detached(self):
        return Terms(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).detach()
                        for f in fields(Terms)})


def sparsity_name(cfg):
    """The sparsity penalty's name in the logs: relu's L1 of the code (of f_i |W_dec,i| with free norms), jumprelu's
    L0 through its straight-through step or Anthropic's tanh, vae's KL to its prior."""
    return {"relu": "l1", "jumprelu": f"l0_{cfg.jumprelu_sparsity}", "vae": "kl"}.get(cfg.arch, "sparsity")


def mse_of(x_hat, x):
    return (x_hat - x).pow(2).sum(dim=-1).mean()


def relu_terms(sae, x, cfg, it, dead):
    x, y = sae.split(x)  # what it reads, what it reconstructs (the same rows for an SAE)
    x_hat, _, l1_rows, l0_rows, fired = sae(x, code=False)  # (N, d_out), None, (N,), (N,), (d_sae,)
    return Terms(mse=mse_of(x_hat, y), sparsity=l1_rows.mean(), l0=l0_rows.float().mean(), fired=fired)


def auxk_residual_fit(pre, dead, k_aux, x, W_enc, b_enc, b_in, W_dec):
    """AuxK's prediction of the residual: the k_aux largest pre-activations (N, d_sae) of the dead features (d_sae,)
    bool, relu'd, decoded with no b_dec: (N, W_dec's width); None where no feature is dead. The dead set's size
    decides the shapes: one wait for the GPU (the only one of topk and fsq's step)."""
    dead_ids = dead.nonzero().squeeze(1)
    if not len(dead_ids):
        return None
    aux_top, aux_at = pre[:, dead_ids].topk(min(k_aux, len(dead_ids)), dim=1)  # (N, k_aux)
    aux_indices = dead_ids[aux_at]
    aux_values = sparse_encode(x, W_enc, b_enc, b_in, aux_indices, pre=pre) * (aux_top > 0)
    return sparse_decode(aux_indices, aux_values, W_dec)


def sparse_terms(sae, x, cfg, it, dead):
    """The k-sparse architectures, with AuxK: the k_aux largest pre-activations of dead features (relu'd, no
    b_dec) fit the residual y - x_hat (detached), in the units of mse, weighted auxk_coeff (Gao et al. 2024)."""
    x, y = sae.split(x)  # what it reads, what it reconstructs (the same rows for an SAE)
    with torch.no_grad():
        pre = sae.pre(x)  # (N, d_sae): the step's one dense matmul
    threshold_seen = None
    if sae.arch in ("batchtopk", "matryoshka"):
        indices, keep, threshold_seen = batch_topk_select(pre, sae.k)
    else:
        top, indices = pre.topk(sae.k, dim=1)  # (N, k)
        keep = top > 0
    values = sparse_encode(x, sae.W_enc, sae.b_enc, sae.b_pre, indices, pre=pre) * keep  # (N, K), with gradients
    if sae.arch == "fsq":
        values = fsq_code(values, sae.log_scale[indices], sae.fsq_levels)
        keep = values.detach() > 0
    skip = sae.skip_out(x)  # (N, d_out) or 0
    x_hat = sparse_decode(indices, values, sae.W_dec, sae.b_dec) + skip  # (N, d_out)
    fired = torch.zeros(pre.shape[1], dtype=torch.int64, device=x.device)  # (d_sae,); not bincount(indices[keep]),
    fired.index_add_(0, indices.flatten(), keep.flatten().long())          # whose mask and size wait for the GPU
    terms = Terms(mse=mse_of(x_hat, y), l0=keep.sum(dim=1).float().mean(), fired=fired, threshold_seen=threshold_seen)
    if sae.arch == "matryoshka":  # each prefix reconstructs alone; the full dictionary is the last prefix
        inner = [mse_of(sparse_decode(indices, values * (indices < size), sae.W_dec, sae.b_dec) + skip, y)
                 for size in sae.prefixes[:-1]]
        terms.recon = (sum(inner) + terms.mse) / len(sae.prefixes)
    if dead is not None and cfg.auxk_coeff > 0:
        fit = auxk_residual_fit(pre, dead, cfg.k_aux, x, sae.W_enc, sae.b_enc, sae.b_pre, sae.W_dec)
        if fit is not None:
            terms.auxk = mse_of(fit, (y - x_hat).detach())
    return terms


def jumprelu_terms(sae, x, cfg, it, dead):
    x, y = sae.split(x)
    pre = sae.pre(x)  # with autograd: both its gradients are dense here
    f = JumpReLU.apply(pre, sae.threshold, cfg.jumprelu_bandwidth)
    x_hat = f @ sae.W_dec + sae.b_dec + sae.skip_out(x)           # (N, d_sae) @ (d_sae, d_out)
    sparsity, l0, pre_act = jumprelu_sparsity(pre, f, sae.threshold, sae.W_dec.norm(dim=1), cfg, dead)
    return Terms(mse=mse_of(x_hat, y), sparsity=sparsity, l0=l0, pre_act=pre_act, fired=(f.detach() > 0).sum(dim=0))


def jumprelu_sparsity(pre, f, threshold, norms, cfg, dead):
    """JumpReLU's sparsity of pre, f (N, d_sae), threshold and decoder norms (d_sae,) -> (penalty, l0, pre_act). The
    penalty, per token summed over features and averaged over the batch, is either step, L0 = H(pre - theta) through
    Step's estimator (Rajamanoharan et al. 2024), or tanh, tanh(c f_i |W_dec,i|), its gradient through JumpReLU's
    (Anthropic, January 2025 update, transformer-circuits.pub/2025/january-update; SAELens 6's
    jumprelu_sparsity_loss_mode="tanh", sae_lens/saes/jumprelu_sae.py); l0 the count; pre_act, with
    --pre_act_loss_coeff and dead (d_sae,) bool, relu(theta_i - pre_i) |W_dec,i| over the dead features (Anthropic's
    term, on dead features only as SAELens's calculate_pre_act_loss), else None."""
    if cfg.jumprelu_sparsity == "tanh":
        penalty = torch.tanh(cfg.jumprelu_tanh_scale * f * norms).sum(dim=1).mean()
        l0 = (f.detach() > 0).sum(dim=1).float().mean()
    else:
        penalty = Step.apply(pre, threshold, cfg.jumprelu_bandwidth).sum(dim=1).mean()
        l0 = penalty.detach()
    pre_act = None
    if cfg.pre_act_loss_coeff > 0 and dead is not None:
        pre_act = ((threshold - pre).relu() * dead * norms).sum(dim=1).mean()
    return penalty, l0, pre_act


def vae_terms(sae, x, cfg, it, dead):
    """The reparameterised sample z = mu + sigma eps, eps drawn from (seed, iteration) so a resumed run draws
    the same; KL(N(mu, sigma^2) || N(m, 1)) = (sigma^2 + (mu - m)^2 - 1) / 2 - log sigma, summed over features."""
    x, y = sae.split(x)
    mu = sae.pre(x)
    # drawn on mu's device: (N, d_sae) normals made on the CPU and copied cost a CUDA step more than the step
    eps = torch.randn(mu.shape, generator=torch.Generator(mu.device).manual_seed(cfg.seed + it), device=mu.device)
    f = (mu + sae.log_sigma.exp() * eps).relu()
    x_hat = f @ sae.W_dec + sae.b_dec + sae.skip_out(x)           # (N, d_sae) @ (d_sae, d_out)
    kl = (0.5 * ((2 * sae.log_sigma).exp() + (mu - cfg.vae_prior_mean).pow(2) - 1) - sae.log_sigma).sum(dim=1).mean()
    active = mu.detach() > 0  # what inference keeps (z = mu): the tracker counts these
    return Terms(mse=mse_of(x_hat, y), sparsity=kl, l0=active.sum(dim=1).float().mean(), fired=active.sum(dim=0))


def clt_terms(clt, x, cfg, it, dead):
    """A cross-layer transcoder's terms on rows of every layer x (N, L (d_in + d_out)): mse summed over the target
    layers (each in its own normalised units), sparsity as its architecture's over all L d_sae features with the
    concatenated rows' norms (relu: sum f_i |W_dec_l,i| with free norms; jumprelu: jumprelu_sparsity's), AuxK per source
    layer (each layer's k_aux largest dead pre-activations, decoded into its targets, fit the residual of all targets
    together), matryoshka's prefixes within each layer. dead (L d_sae,) bool or None."""
    xs, y = clt.split(x)                                   # [(N, d_in)], (N, L d_out)
    skip, L = clt.skip_out(xs), clt.n_layers
    dead = dead.view(L, -1) if dead is not None else [None] * L
    if clt.arch in ("relu", "jumprelu"):  # dense codes, with autograd
        pres = clt.pres(xs)
        fs = [pre.relu() if clt.arch == "relu" else JumpReLU.apply(pre, th, cfg.jumprelu_bandwidth)
              for pre, th in zip(pres, clt.threshold if clt.arch == "jumprelu" else pres)]
        y_hat = clt.decode([f @ W for f, W in zip(fs, clt.W_dec)]) + skip  # (N, d_sae) @ (d_sae, (L - l) d_out)
        mse, fired, norms = mse_of(y_hat, y), torch.cat([(f.detach() > 0).sum(dim=0) for f in fs]), clt.norms()
        if clt.arch == "relu":
            l1 = sum((f * n if clt.free_norms else f).sum(dim=1) for f, n in zip(fs, norms)).mean()
            return Terms(mse=mse, sparsity=l1, l0=sum((f.detach() > 0).sum(dim=1) for f in fs).float().mean(), fired=fired)
        # jumprelu: each layer's (penalty, l0, pre_act), summed over layers
        parts = [jumprelu_sparsity(*a, cfg, d) for a, d in zip(zip(pres, fs, clt.threshold, norms), dead)]
        sparsity, l0, pre_act = [None if p[0] is None else sum(p) for p in zip(*parts)]
        return Terms(mse=mse, sparsity=sparsity, l0=l0, pre_act=pre_act, fired=fired)
    with torch.no_grad():
        pres = clt.pres(xs)  # [(N, d_sae)]: the step's dense matmuls
    sel, threshold_seen = clt.select(pres)
    values = [sparse_encode(x, W, b, b_in, i, pre=pre) * keep for x, W, b, b_in, pre, (i, keep) in
              zip(xs, clt.W_enc, clt.b_enc, clt.b_in, pres, sel)]  # [(N, K)], with gradients
    decode = lambda vals: clt.decode([sparse_decode(i, v, W) for (i, _), v, W in zip(sel, vals, clt.W_dec)]) + skip
    y_hat = decode(values)                                 # (N, L d_out)
    fired = torch.zeros(L * clt.d_sae, dtype=torch.int64, device=x.device)
    for l, (i, keep) in enumerate(sel):
        fired.index_add_(0, (i + l * clt.d_sae).flatten(), keep.flatten().long())
    terms = Terms(mse=mse_of(y_hat, y), l0=sum(keep.sum(dim=1) for _, keep in sel).float().mean(), fired=fired,
                  threshold_seen=threshold_seen)
    if clt.arch == "matryoshka":  # each layer's prefix of each size; the full dictionaries are the last
        inner = [mse_of(decode([v * (i < size) for (i, _), v in zip(sel, values)]), y) for size in clt.prefixes[:-1]]
        terms.recon = (sum(inner) + terms.mse) / len(clt.prefixes)
    if cfg.auxk_coeff > 0 and dead[0] is not None:  # each source layer's fit, written into its target columns
        fits = [auxk_residual_fit(pre, d, cfg.k_aux, xs[l], clt.W_enc[l], clt.b_enc[l], clt.b_in[l], clt.W_dec[l])
                for l, (pre, d) in enumerate(zip(pres, dead))]
        fits = [F.pad(fit, (l * clt.d_out, 0)) for l, fit in enumerate(fits) if fit is not None]
        if fits:
            terms.auxk = mse_of(sum(fits), (y - y_hat).detach())
    return terms


ARCH_TERMS = {"relu": relu_terms, "jumprelu": jumprelu_terms, "vae": vae_terms,
              **{arch: sparse_terms for arch in K_SPARSE}}


def sae_loss(sae, x, cfg, it, dead=None):
    """-> (loss, Terms): the architecture's terms (a CrossLayerTranscoder's are clt_terms': mse summed over target
    layers, L d_sae features) weighted and summed (Terms says how); dead (d_sae,) bool feeds AuxK and jumprelu's
    pre-act loss. Nothing here changes the SAE: the thresholds the batch estimates wait in Terms for sae_update."""
    terms = (clt_terms if isinstance(sae, CrossLayerTranscoder) else ARCH_TERMS[sae.arch])(sae, x, cfg, it, dead)
    loss = terms.mse if terms.recon is None else terms.recon
    if cfg.loss in ("sparsity", "hybrid") and terms.sparsity is not None:
        loss = loss + sparsity_coeff_at(cfg, it) * terms.sparsity
    if terms.pre_act is not None:  # jumprelu's anti-dead term, not warmed up (SAELens's pre_act_loss_coefficient is not)
        loss = loss + cfg.pre_act_loss_coeff * terms.pre_act
    if terms.auxk is not None:
        loss = loss + cfg.auxk_coeff * terms.auxk
    if cfg.loss in ("jl", "hybrid"):
        with torch.autocast(x.device.type, enabled=False):  # fp32 always: atanh |cos| is steep near |cos| = 1
            terms.jl = jl_penalty(sae.dictionary(cfg.jl_on), cfg.jl_sample, torch.Generator(x.device).manual_seed(
                cfg.seed + it), cfg.jl_form, cfg.jl_power, cfg.jl_margin)
        loss = loss + jl_coeff_at(cfg, it) * terms.jl
    return loss, terms


def sparsity_coeff_at(cfg, it):
    """The architecture's sparsity coefficient (l1_coeff, l0_coeff or kl_coeff), warmed up linearly from 0 over
    sparsity_warmup_iters (Anthropic, April 2024 update; Gemma Scope warms up its L0 coefficient too)."""
    return getattr(cfg, SPARSITY_COEFF[cfg.arch]) * min(1.0, (it + 1) / max(cfg.sparsity_warmup_iters, 1))


def jl_coeff_at(cfg, it):
    """jl_start_mult * jl_coeff at iteration 0, cosine decay to jl_coeff at jl_decay_iters, then constant:
    a strong early push keeps the dictionary spread out before the reconstruction takes over."""
    progress = min(1.0, it / max(cfg.jl_decay_iters, 1))
    return cfg.jl_coeff * (1 + (cfg.jl_start_mult - 1) * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# the step: one update of one SAE from one batch (forward and backward in pieces, gradients averaged
# over ranks, Adam, the decoder's norms) at the scheduled learning rate; and what the step tracks:
# firing frequencies and dead features, which resampling gives new directions

def get_lr_mult(cfg, it):
    """Learning-rate multiplier: linear warmup, then constant, cosine to min_lr_frac, or linear to 0 over
    the last decay_frac of training (Anthropic, April 2024 update)."""
    if it < cfg.warmup_iters:
        return (it + 1) / cfg.warmup_iters
    if cfg.decay == "cosine":
        progress = (it - cfg.warmup_iters) / max(cfg.max_iters - cfg.warmup_iters, 1)
        return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.decay == "linear":
        decay_start = cfg.max_iters * (1 - cfg.decay_frac)
        return 1.0 if it < decay_start else max(0.0, (cfg.max_iters - it) / (cfg.max_iters - decay_start))
    return 1.0


def annealed_k(cfg, it):
    """k-sparse architectures' k at iteration it: from k_anneal_start x k down to k, linearly over k_anneal_iters, then
    k; a dense start lets more features learn early (measured on SynthSAEBench: docs/results.md "Known features")."""
    if it >= cfg.k_anneal_iters:
        return cfg.k
    return min(round(cfg.k * (cfg.k_anneal_start + (1 - cfg.k_anneal_start) * it / cfg.k_anneal_iters)), cfg.d_sae)


def train_step(run, x, it, autocast, world_size=1):
    """One iteration of one SAE on the batch x (per_rank, d_in (+ d_out)): learning rate, forward and backward (in pieces),
    update, feature tracking. On a GPU nothing in it waits for the device, but where shapes follow values
    (batchtopk's selection, AuxK's dead set; test_sae.py's STEP_WAITS lists each). -> (loss, terms, lr multiplier)"""
    lr_mult = get_lr_mult(run.cfg, it)
    for group, base_lr in zip(run.optimizer.param_groups, run.base_lrs):
        group["lr"] = base_lr * lr_mult
    reads_dead = run.cfg.arch in K_SPARSE or run.cfg.arch == "jumprelu" and run.cfg.pre_act_loss_coeff > 0
    dead = run.tracker.dead() if reads_dead else None
    run.sae.k = annealed_k(run.cfg, it)  # and back to k below: evaluation and checkpoints see the SAE's own k
    loss, terms = backward_in_pieces(run.train_sae, run.optimizer, x, run.cfg, it, dead, autocast)
    run.sae.k = run.cfg.k
    run.finite = run.finite & torch.isfinite(loss)  # read at log steps and saves (check_finite)
    sae_update(run.sae, run.optimizer, run.cfg, world_size, terms.threshold_seen)
    if world_size > 1:
        dist.all_reduce(terms.fired)
    run.tracker.update(terms.fired, run.cfg.batch_size)
    return loss, terms, lr_mult


def backward_in_pieces(sae, optimizer, x, cfg, it, dead, autocast):
    """Forward and backward over the batch x (per_rank, d_in (+ d_out)) in cfg.micro_batches pieces, each piece's loss
    divided by their number, so that .grad holds the gradient of the pieces' mean loss, summed in piece order. With 2
    pieces this is the arithmetic of 2 ranks of 1 piece, bit for bit: g0/2 + g1/2 equals (g0 + g1)/2, halving being
    exact. The loss changes nothing else (thresholds seen wait in the terms). -> (mean loss, Terms.mean_of_pieces)"""
    optimizer.zero_grad(set_to_none=True)
    pieces = x.chunk(cfg.micro_batches)
    losses, terms = [], []
    for piece in pieces:
        with autocast:  # the backward runs in the forward's dtypes
            loss, piece_terms = sae_loss(sae, piece, cfg, it, dead)
        (loss / len(pieces)).backward()
        losses.append(loss.detach()), terms.append(piece_terms.detached())
    return sum(losses[1:], losses[0]) / len(pieces), Terms.mean_of_pieces(terms)


def all_reduce_mean_(tensors, world_size):
    """Averages the tensors over the ranks, in place: one all-reduce of each dtype's tensors flattened side by side
    (a call a tensor pays the collective's latency a tensor), then divided (gloo has no AVG). Elementwise the same
    sums as a call a tensor: the bucket only changes how they travel."""
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        bucket = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        flat /= world_size
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(part.view_as(t))


def sae_update(sae, optimizer, cfg, world_size=1, threshold_seen=None):
    """One update from the gradients in .grad: the inference threshold from the batch's smallest kept values
    (threshold_seen, one row a piece: update_threshold_), gradients and thresholds averaged over ranks; the decoder's
    along-row component removed; clipping; Adam; decoder rows renormalised (both skipped with free norms); JumpReLU's
    thresholds kept >= 0."""
    if threshold_seen is not None:
        update_threshold_(sae.threshold, threshold_seen, cfg.threshold_rate)
    if world_size > 1:  # the gradients, and the buffers each rank estimated
        all_reduce_mean_([p.grad for p in sae.parameters() if p.grad is not None] + list(sae.buffers()), world_size)
    if not sae.free_norms:
        sae.remove_parallel_grad_()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    optimizer.step()
    if not sae.free_norms:
        sae.unit_norm_decoder_()
    if sae.arch == "jumprelu":
        with torch.no_grad():
            sae.threshold.clamp_(min=0)


@torch.no_grad()
def update_threshold_(threshold, seen, rate):
    """batchtopk's and matryoshka's inference threshold (docs/training.md): an EMA of the smallest kept value, the
    first estimate taken whole, a batch that kept nothing ignored. seen (pieces, ...) holds each piece's: each
    piece's EMA from the step's threshold, averaged (as ranks' are, in sae_update). Tensor ops, no Python branch on a
    value (each would wait for the GPU)."""
    seen = seen.reshape(-1, *threshold.shape)
    total = torch.zeros_like(threshold)
    for t in seen:
        ema = torch.where(threshold == 0, t, threshold + rate * (t - threshold))
        total += torch.where(t > 0, ema, threshold)
    threshold.copy_(total / len(seen))


class FeatureTracker:
    """Dead features, exactly: a feature is dead when it has not fired in the last `window` tokens (counted
    from its (re)start, so a resampled feature gets a whole window). Firing frequencies: counts in a ring of
    `chunks` chunks of window/chunks tokens, so the frequency covers roughly the last window of tokens."""

    def __init__(self, d_sae, window, chunks=10, device="cpu"):
        self.window, self.chunk_tokens = window, max(1, window // chunks)
        self.counts = torch.zeros(chunks, d_sae, dtype=torch.long, device=device)
        self.tokens = [0] * chunks  # per chunk, Python ints: the step branches on them (on a GPU value it would wait)
        self.last_fired = torch.zeros(d_sae, dtype=torch.long, device=device)  # tokens seen at the last firing
        self.chunk, self.seen = 0, 0

    def update(self, fired, n_tokens):
        """fired (d_sae,): how many of the n_tokens activated each feature."""
        if self.tokens[self.chunk] >= self.chunk_tokens:
            self.chunk = (self.chunk + 1) % len(self.tokens)
            self.counts[self.chunk].zero_()
            self.tokens[self.chunk] = 0
        self.counts[self.chunk] += fired
        self.tokens[self.chunk] += n_tokens
        self.seen += n_tokens
        self.last_fired.masked_fill_(fired > 0, self.seen)  # not last_fired[fired > 0]: a mask index waits for the GPU

    def freq(self):
        return self.counts.sum(dim=0).float() / max(sum(self.tokens), 1)

    def dead(self):
        return self.seen - self.last_fired >= self.window

    def restart_(self, mask):
        self.counts[:, mask] = 0
        self.last_fired[mask] = self.seen

    def state_dict(self):
        return {"counts": self.counts, "tokens": torch.tensor(self.tokens), "last_fired": self.last_fired,
                "chunk": self.chunk, "seen": self.seen}

    def load_state_dict(self, state):
        self.counts.copy_(state["counts"])
        self.tokens = [int(n) for n in state["tokens"]]
        self.last_fired.copy_(state["last_fired"])
        self.chunk, self.seen = state["chunk"], state["seen"]


@torch.no_grad()
def resample_dead_(sae, optimizer, dead, x):
    """Towards Monosemanticity's resampling: for each dead feature, an input x_i drawn with probability
    proportional to its squared reconstruction error becomes the decoder row (normalised) and the encoder
    column (normalised, times 0.2 x the mean alive encoder norm); b_enc = 0; Adam's moments of exactly those
    entries are zeroed. A transcoder's error is its target's: the decoder row is the target y_i's direction, the
    encoder column x_in,i's. dead (d_sae,) bool, x (N, d_in (+ d_out)). Returns the number resampled."""
    idx = dead.nonzero().squeeze(1)
    if len(idx) == 0:
        return 0
    x, y = sae.split(x)
    x_hat = sae(x).x_hat
    err = (y - x_hat).pow(2).sum(dim=1)  # (N,)
    g = torch.Generator(device=x.device).manual_seed(len(idx))
    pick = torch.multinomial(err.clamp_min(1e-12), len(idx), replacement=True, generator=g)
    v_in, v_out = F.normalize(x[pick], dim=1), F.normalize(y[pick], dim=1)  # (n_dead, d_in), (n_dead, d_out)
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean() if (~dead).any() else torch.tensor(1.0)
    row_norm = sae.W_dec[~dead].norm(dim=1).mean() if sae.free_norms and (~dead).any() else 1.0  # free norms: the alive mean
    sae.W_dec[idx] = v_out * row_norm
    sae.W_enc[:, idx] = v_in.T * 0.2 * alive_norm
    sae.b_enc[idx] = 0
    per_feature = [(p, (idx,)) for p in sae.latent_params()]  # thresholds, scales: kept, their moments reset
    for p, index in [(sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))] + per_feature:
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in optimizer.state.get(p, {}):
                optimizer.state[p][moment][index] = 0
    return len(idx)


# -----------------------------------------------------------------------------
# evaluation: FVU, L0, dead and dense fractions, and with the SAE spliced into the model, CE and KL,
# overall and by position

def position_buckets(T, first):
    """[(lo, hi)]: the positions first..63, 64..127, 128..255, ... of a T-token context, the last cut at T."""
    edges = [first, 64]
    while edges[-1] < T:
        edges.append(2 * edges[-1])
    return [(lo, min(hi, T)) for lo, hi in zip(edges, edges[1:]) if lo < T]


EVAL_POSITIONS = 512  # positions whose logits evaluation makes at once: 103 MiB a (P, vocab) fp32 tensor at GPT-2's


@torch.no_grad()
def evaluate(saes, trackers, scales, cfg, model=None, val_batches=(), val_acts=None):
    """Metrics of each SAE on a fixed slice (val contexts through the model, or held-out rows), in normalised units
    (scales: the input's and the target's, column_scales): mse (as in training), fvu = sum |y - x_hat|^2 /
    sum |y - mean y|^2 (y = x for an SAE, a transcoder's target else), l0, l1; dead/dense fractions from its
    tracker; mean max |cos| between dictionary rows. With the model: cross-entropy clean, with the SAE's
    reconstruction spliced in at the site (a transcoder's prediction, made from the model's own input, at the target
    site), with that site zero-ablated; ce_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean); kl = KL(clean ||
    spliced) per token; and "positions": the same by position bucket (position_buckets: 1-63, 64-127, 128-255, ...).
    The clean and ablated forwards are shared: n SAEs cost 2 + n forwards, in the parameters' dtype (main() calls it
    outside autocast), their logits made EVAL_POSITIONS positions at a time. -> [metrics], one per SAE."""
    # sums over the rows (float64), and by position in the context, summed over the contexts: the FVU's parts per
    # SAE, the CE terms shared by all (clean, ablated) and each SAE's own
    T = val_batches[0].shape[1] if len(val_batches) else 0
    by_pos = lambda *shape: torch.zeros(T, *shape, dtype=torch.float64)
    shared = {"ce_clean": by_pos(), "ce_zero": by_pos(), "n_ce": by_pos(), "n_kl": by_pos()}
    stats = [{**dict.fromkeys(("n", "sq_err", "sum_x", "sq_x", "l0", "l1"), 0.0),
              "pos": {"ce_sae": by_pos(), "kl": by_pos(), "n": by_pos(), "sq_err": by_pos(), "sq_x": by_pos(),
                      "sum_x": by_pos(sae.W_dec.shape[1])}} for sae in saes]
    device = saes[0].W_dec.device
    row_scale = column_scales((saes[0].d_in, saes[0].d_out * saes[0].transcoder), *scales, device)
    if val_acts is not None:
        for i in range(0, len(val_acts), cfg.batch_size):
            x = val_acts[i:i + cfg.batch_size].to(device) * row_scale
            for sae, s in zip(saes, stats):
                score_rows(sae, s, x)
    for idx in progress(val_batches, desc=f"eval ({len(saes)} SAE{'s' * (len(saes) > 1)})", unit="batch", leave=False):
        score_spliced(model, idx, saes, stats, shared, (row_scale, scales[1]), cfg)
    results = []
    for sae, tracker, s in zip(saes, trackers, stats):
        n = max(s["n"], 1)
        variance = s["sq_x"] - (s["sum_x"].pow(2).sum().item() / n if s["n"] else 0.0)
        freq = tracker.freq()
        metrics = {"mse": s["sq_err"] / n, "fvu": s["sq_err"] / max(variance, 1e-12), "l0": s["l0"] / n,
                   "l1": s["l1"] / n, "dead_frac": tracker.dead().float().mean().item(),
                   "dense_frac": (freq > cfg.dense_threshold).float().mean().item(),
                   "mean_max_cos": mean_max_cosine(sae.W_dec)}
        if T:  # and the same by position bucket
            metrics.update(downstream(shared, s["pos"], slice(None)), context=T, positions={})
            for lo, hi in position_buckets(T, 1 if cfg.exclude_pos0 else 0):
                p = s["pos"]
                variance = (p["sq_x"][lo:hi].sum() - p["sum_x"][lo:hi].sum(0).pow(2).sum() / p["n"][lo:hi].sum()).item()
                metrics["positions"][f"{lo}-{hi - 1}"] = {"tokens": int(p["n"][lo:hi].sum().item()),
                                                         "fvu": p["sq_err"][lo:hi].sum().item() / max(variance, 1e-12),
                                                         **downstream(shared, p, slice(lo, hi))}
        results.append(metrics)
    return results


def score_rows(sae, s, x, pos=None):
    """Adds one SAE's sums over the rows x (N, d_in (+ d_out)) in normalised units to s, against what it reconstructs
    (split(): the input itself, or a transcoder's target); pos (N,): their positions in their contexts, for the sums
    by position. -> y_hat (N, d_out)"""
    x_in, y = sae.split(x)
    y_hat, f = sae(x_in)[:2]
    s["n"] += len(y)
    s["sq_err"] += (y - y_hat).double().pow(2).sum().item()
    s["sum_x"] = s["sum_x"] + y.double().sum(dim=0)
    s["sq_x"] += y.double().pow(2).sum().item()
    s["l0"] += (f > 0).sum().item()
    s["l1"] += f.double().sum().item()
    if pos is not None:
        p = s["pos"]
        for key, rows in (("sq_err", (y - y_hat).double().pow(2).sum(dim=1)), ("sq_x", y.double().pow(2).sum(dim=1)),
                          ("n", torch.ones(len(y), dtype=torch.float64)), ("sum_x", y.double())):
            p[key].index_add_(0, pos.cpu(), rows.cpu())
    return y_hat


def score_spliced(model, idx, saes, stats, shared, scales, cfg):
    """One batch of val contexts idx (B, T) through the model: clean, with the site zero-ablated, and with each SAE's
    reconstruction spliced in; adds the rows' sums (score_rows) and the CE and KL sums by position. A transcoder's
    site is its target, its prediction made from the clean run's input (earlier in the block, so unchanged by the
    splice). scales: (the rows' column_scales, the target's scale)."""
    keep = slice(1, None) if cfg.exclude_pos0 else slice(None)  # positions the SAE reads and writes
    T, sites = idx.shape[1], sites_of(cfg)
    row_scale, target_scale = scales
    captured = []
    def capture(act):
        captured.append(act)
        return act
    def splice(act, replacement):
        act = act.clone()
        act[:, keep] = replacement.to(act.dtype)
        return act
    def final_hidden(edit, at=sites[-1]):  # the final norm's output, (B*T, C): logits are made a slice at a time below
        h = model(idx, cfg.layer, at, edit, head=False)
        return h.reshape(-1, h.shape[-1])
    h_clean = final_hidden(capture, sites)
    acts = [a[:, keep].float() for a in captured]  # [(B, T', d_in)] (+ the target's (B, T', d_out))
    act = acts[-1]                                 # the site replaced
    rows = torch.cat(acts, dim=-1).reshape(len(idx) * act.shape[1], -1) * row_scale  # (B*T', d_in (+ d_out))
    h_zero = final_hidden(lambda a: splice(a, torch.zeros_like(act)))
    h_saes = []
    positions = torch.arange(T)[keep].repeat(len(idx))  # (B*T',) each row's position
    for sae, s in zip(saes, stats):
        x_hat = score_rows(sae, s, rows, positions).view_as(act) / target_scale
        h_saes.append(final_hidden(lambda a: splice(a, x_hat)))
    add_ce_and_kl(model, idx, h_clean, h_zero, h_saes, shared, [s["pos"] for s in stats])


def add_ce_and_kl(model, idx, h_clean, h_zero, h_edited, shared, pos_sums):
    """Adds the cross-entropy of the next tokens of idx (B, T) by position, from the final norm's outputs (B*T, C) of
    the clean, the ablated and each edited forward, into shared (clean and ablated) and each pos_sums (ce_sae, and
    kl = KL(clean || edited) at every position)."""
    T = idx.shape[1]
    targets = F.pad(idx[:, 1:], (0, 1), value=-1).reshape(-1)  # (B*T,) next tokens; -1: a context's last, none
    shared["n_kl"] += len(idx)  # KL counts every position, the first and the last included
    # the vocabulary-sized work, EVAL_POSITIONS positions at a time: over a whole batch of 32 contexts, each
    # (B, T, vocab) fp32 tensor is 823 MiB at GPT-2's vocabulary, and logits, log-softmax, their exp and
    # products for the clean, ablated and spliced runs took 7.4 GiB at once (measured)
    log_probs = lambda h, part: F.log_softmax(model.lm_head(h[part]), -1)  # (P, C) @ (C, vocab) -> (P, vocab)
    nll = lambda logp, part: F.nll_loss(logp, targets[part], ignore_index=-1, reduction="none")  # (P,), 0 at -1
    for rows in range(0, len(targets), EVAL_POSITIONS):
        part = slice(rows, rows + EVAL_POSITIONS)
        pos = torch.arange(part.start, min(part.stop, len(targets))) % T  # (P,) positions in their contexts
        add = lambda total, values: total.index_add_(0, pos, values.double().cpu())
        logp_clean = log_probs(h_clean, part)
        add(shared["ce_clean"], nll(logp_clean, part))
        add(shared["ce_zero"], nll(log_probs(h_zero, part), part))
        add(shared["n_ce"], targets[part] >= 0)
        for p, h in zip(pos_sums, h_edited):
            logp_sae = log_probs(h, part)
            add(p["ce_sae"], nll(logp_sae, part))
            # KL(clean || spliced) = sum_vocab p_clean (log p_clean - log p_sae), at every position
            add(p["kl"], F.kl_div(logp_sae, logp_clean, log_target=True, reduction="none").sum(dim=-1))


def downstream(shared, pos, part):
    """The CE and KL metrics over the positions `part` (a slice) of evaluate()'s by-position sums: CE over the
    positions with a next token, KL over all."""
    n_ce = shared["n_ce"][part].sum().item()
    ce_clean, ce_zero, ce_sae = (x[part].sum().item() / n_ce if n_ce else float("nan")
                                 for x in (shared["ce_clean"], shared["ce_zero"], pos["ce_sae"]))
    kl = pos["kl"][part].sum().item() / shared["n_kl"][part].sum().item()
    return {"ce_clean": ce_clean, "ce_sae": ce_sae, "ce_zero": ce_zero, "kl": kl,
            "ce_recovered": (ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan")}


@torch.no_grad()
def evaluate_replacement(model, sets, cfg, val_batches):
    """The replacement model of each set of per-layer SAEs or transcoders: every layer's site (a transcoder's target)
    replaced at once, in one forward, by the prediction made from the replacement model's own input at that layer
    (which the layers below have already replaced); position 0 stays the model's with exclude_pos0. sets:
    {name: {layer: (sae, (input scale, target scale))}}, the same layers in each. -> {name: metrics}: ce_clean,
    ce_sae (replaced), ce_zero (every replaced site zero-ablated), ce_recovered, ce_increase, kl (per token)."""
    keep = slice(1, None) if cfg.exclude_pos0 else slice(None)
    sites, layers = sites_of(cfg), tuple(sorted(next(iter(sets.values()))))
    T = val_batches[0].shape[1]
    shared = {key: torch.zeros(T, dtype=torch.float64) for key in ("ce_clean", "ce_zero", "n_ce", "n_kl")}
    sums = {name: {key: torch.zeros(T, dtype=torch.float64) for key in ("ce_sae", "kl")} for name in sets}

    def replacing(members):  # edit(act) at each (layer, site) in forward order: reads at sites[0], writes at sites[-1]
        calls = iter(itertools.product(layers, range(len(sites))))
        def edit(act):
            layer, at = next(calls)
            if at == 0:
                edit.x_in = act[:, keep].float()  # (B, T', d_in), the replacement model's own input
            if at < len(sites) - 1:
                return act
            sae, (scale, target_scale) = members[layer]
            y_hat = sae(edit.x_in.reshape(-1, edit.x_in.shape[-1]) * scale).x_hat / target_scale  # (B*T', d_out)
            act = act.clone()
            act[:, keep] = y_hat.view(*act[:, keep].shape).to(act.dtype)
            return act
        return edit

    zero = lambda act: zero_positions(act, keep)
    final_hidden = lambda *edit: model(idx, *edit, head=False).flatten(0, 1)  # (B*T, C)
    for idx in progress(val_batches, desc=f"eval (replacement, {len(sets)} set{'s' * (len(sets) > 1)})", leave=False):
        h_edited = [final_hidden(layers, sites, replacing(members)) for members in sets.values()]
        add_ce_and_kl(model, idx, final_hidden(), final_hidden(layers, sites[-1], zero), h_edited, shared,
                      list(sums.values()))
    results = {}
    for name, pos in sums.items():
        metrics = downstream(shared, pos, slice(None))
        results[name] = {**metrics, "ce_increase": metrics["ce_sae"] - metrics["ce_clean"]}
    return results


@torch.no_grad()
def evaluate_clt(clt, tracker, scales, cfg, layers, model=None, val_batches=(), val_acts=None):
    """A cross-layer transcoder's metrics, in normalised units (scales: two lists, each layer's input's and target's):
    mse summed over the targets as in training; fvu = sum |y - y_hat|^2 / sum |y - mean y|^2 over every target, and
    fvu_by_layer {layer: that target's}; l0 and l1 over all L d_sae features (l1 weighted by the concatenated rows'
    norms); the tracker's dead and dense fractions; mean max |cos| of each layer's concatenated rows, averaged. With
    the model: CE clean, with every target replaced at once (clt_replacement_forward), with every target zero-ablated,
    ce_recovered and kl, as evaluate()'s (no metrics by position). -> metrics"""
    L, device = len(layers), clt.b_dec.device
    row_scale = torch.cat([torch.full((d,), float(sc)) for a, t in zip(*scales)
                           for d, sc in ((clt.d_in, a), (clt.d_out, t))]).to(device)  # (L (d_in + d_out),)
    s = {"n": 0, "sq_err": torch.zeros(L, dtype=torch.float64), "sum_y": torch.zeros(L, clt.d_out, dtype=torch.float64),
         "sq_y": torch.zeros(L, dtype=torch.float64), "l0": 0.0, "l1": 0.0}
    T = val_batches[0].shape[1] if len(val_batches) else 0
    shared = {key: torch.zeros(T, dtype=torch.float64) for key in ("ce_clean", "ce_zero", "n_ce", "n_kl")}
    pos = {key: torch.zeros(T, dtype=torch.float64) for key in ("ce_sae", "kl")}  # add_ce_and_kl's sums by position
    def score(rows):  # rows (N, L (d_in + d_out)) in normalised units
        xs, y = clt.split(rows)
        y_hat, fs = clt(xs)
        y, err = y.double().view(len(y), L, -1), (y - y_hat).double().view(len(y), L, -1)  # (N, L, d_out)
        s["n"] += len(y)
        s["sq_err"] += err.pow(2).sum(dim=(0, 2)).cpu()
        s["sum_y"] += y.sum(dim=0).cpu()
        s["sq_y"] += y.pow(2).sum(dim=(0, 2)).cpu()
        s["l0"] += sum((f > 0).sum().item() for f in fs)
        s["l1"] += sum((f * n).double().sum().item() for f, n in zip(fs, clt.norms()))
    if val_acts is not None:
        for i in range(0, len(val_acts), cfg.batch_size):
            score(val_acts[i:i + cfg.batch_size].to(device) * row_scale)
    keep = slice(1, None) if cfg.exclude_pos0 else slice(None)
    sites = tuple(itertools.product(layers, sites_of(cfg)))  # (layer, site) in forward order: input, target, ...
    for idx in val_batches:
        captured = []
        def capture(act):
            captured.append(act[:, keep].float())
            return act
        h_clean = model(idx, tuple(layers), sites_of(cfg), capture, head=False)
        score(torch.cat(captured, dim=-1).reshape(-1, L * (clt.d_in + clt.d_out)) * row_scale)
        calls = iter(range(len(sites)))  # odd calls are targets
        h_zero = model(idx, tuple(layers), sites_of(cfg), lambda act: zero_positions(act, keep) if next(calls) % 2
                       else act, head=False)
        clean_inputs = None if clt.arch != "topk" or clt.scope != "all" else \
            [c.reshape(-1, clt.d_in) * a for c, a in zip(captured[::2], scales[0])]
        h_clt = clt_replacement_forward(model, idx, clt, cfg, scales, layers, clean_inputs)
        flat = lambda h: h.reshape(-1, h.shape[-1])  # (B*T, C)
        add_ce_and_kl(model, idx, flat(h_clean), flat(h_zero), [flat(h_clt)], shared, [pos])
    n = max(s["n"], 1)
    variance = s["sq_y"] - s["sum_y"].pow(2).sum(dim=1) / n  # (L,)
    freq = tracker.freq()
    metrics = {"mse": s["sq_err"].sum().item() / n, "fvu": s["sq_err"].sum().item() / max(variance.sum().item(), 1e-12),
               "fvu_by_layer": {str(layer): s["sq_err"][i].item() / max(variance[i].item(), 1e-12)
                                for i, layer in enumerate(layers)},
               "l0": s["l0"] / n, "l1": s["l1"] / n, "dead_frac": tracker.dead().float().mean().item(),
               "dense_frac": (freq > cfg.dense_threshold).float().mean().item(),
               "mean_max_cos": sum(mean_max_cosine(W) for W in clt.W_dec) / L}
    if T:
        metrics.update(downstream(shared, pos, slice(None)))
    return metrics


def zero_positions(act, keep):
    """act with the positions keep (a slice of T) zeroed: the ablation."""
    act = act.clone()
    act[:, keep] = 0
    return act


def clt_replacement_forward(model, idx, clt, cfg, scales, layers, inputs=None, head=False):
    """The model with every layer's target (--target_site) replaced by the CLT's prediction, in one forward: at layer
    l's --site the input is captured (unchanged), at its target y_hat_l is made from the codes of layers 0..l
    (CrossLayerTranscoder.predict) and written at the positions the CLT reads; the forward visits layer l's site before
    its target, so the inputs are the replaced model's own. inputs [x_l (B T', d_in)] normalised: use these instead
    (topk over all layers selects across layers, so it reads the clean run's). scales: the CLT's two lists. -> the
    final hidden state (B, T, C), or the logits with head."""
    assert inputs is not None or clt.arch != "topk" or clt.scope != "all", "topk over all layers reads given inputs"
    keep = slice(1, None) if cfg.exclude_pos0 else slice(None)
    xs, fs, calls = list(inputs or []), [], iter(range(2 * len(layers)))
    def edit(act):
        l, is_target = divmod(next(calls), 2)
        rows = act[:, keep]                                       # (B, T', C)
        if not is_target:
            if inputs is None:
                xs.append(rows.reshape(-1, rows.shape[-1]).float() * scales[0][l])  # (B T', d_in), normalised
            return act
        if len(fs) <= l:  # the codes of the layers read since the last target (all of them at once, given inputs)
            fs.extend(clt.code(clt.pres(xs[len(fs):], len(fs)), len(fs)))
        y_hat = clt.predict(fs, xs, l) / scales[1][l]             # (B T', d_out), the model's units
        act = act.clone()
        act[:, keep] = y_hat.view(rows.shape).to(act.dtype)
        return act
    return model(idx, tuple(layers), sites_of(cfg), edit, head=head)


@torch.no_grad()
def mean_max_cosine(W, block=1024):
    """Mean over rows of the largest |cos| with any other row, W (n, d); blocked so memory is block x n."""
    W = F.normalize(W.float(), dim=1)
    best = torch.empty(W.shape[0], device=W.device)
    for i in range(0, W.shape[0], block):
        G = (W[i:i + block] @ W.T).abs()  # (block, d) @ (d, n) -> (block, n)
        G[torch.arange(G.shape[0]), torch.arange(i, i + G.shape[0])] = 0  # not with itself
        best[i:i + block] = G.max(dim=1).values
    return best.mean().item()


def log10_freq_histogram(freq, bins=50):
    """The log10 firing-frequency histogram (zeros counted apart): {edges (bins+1,), counts (bins,), n_zero}."""
    nonzero = freq[freq > 0].double().log10().cpu()
    edges = torch.linspace(-10, 0, bins + 1, dtype=torch.float64)
    return {"edges": edges, "counts": torch.histc(nonzero.clamp(-10, 0), bins=bins, min=-10, max=0).long(),
            "n_zero": int((freq == 0).sum())}


# -----------------------------------------------------------------------------
# checkpoints: written atomically; a resumed run (or a sweep's SAEs, committed together) continues
# where it stopped, with its saved config

# what a resumed run cannot change: the SAE's shape and the meaning of the saved data position
LOCKED_ON_RESUME = ("d_sae", "layer", "layers", "cross_layer", "site", "target_site", "skip", "acts", "init_from", "n_layer", "n_head", "n_embd", "block_size",
                    "batch_size", "buffer_tokens", "harvest_batch", "exclude_pos0", "normalize", "seed")


def save_checkpoint(path, checkpoint):
    write_atomic(path, lambda f: torch.save(checkpoint, f), "wb")


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no checkpoint (set --out_dir to the run's directory)")
    return torch.load(path, map_location="cpu", weights_only=True)


# the values a saved config that lacks a key was trained with: plain L1 on unit-norm rows and a tied init at norm 1
# came before free decoder norms and relu's 0.1 start
SAVED_CONFIG_DEFAULTS = {"l1_by_decoder_norm": False, "init_norm": 1.0}


def upgrade_config(saved):
    """A saved config dict (a checkpoint's or a log's) in this version's keys and values: renamed keys and values
    under their names (RENAMED_KEYS, RENAMED_VALUES), keys it lacks at the values it was trained with
    (SAVED_CONFIG_DEFAULTS)."""
    renamed = {RENAMED_KEYS.get(k, k): v for k, v in saved.items()}
    return {**SAVED_CONFIG_DEFAULTS, **{k: renamed_value(k, v) for k, v in renamed.items()}}


def saved_config(checkpoint, config_class=TrainConfig):
    """A checkpoint's TrainConfig (or analyze.py's extension of it), upgraded; keys config_class does not have
    (analyze.py's, in a checkpoint that saved them) are left out."""
    known = {f.name for f in fields(config_class)}
    return config_class(**{k: v for k, v in upgrade_config(checkpoint["config"]).items() if k in known})


def resolve_runs(overrides, config_class=TrainConfig, new_run_modes=MODES):
    """overrides (parse_overrides') -> [(cfg, checkpoint or None)], one per SAE of this process: defaults, then config
    files and flags in order; with --init_from=resume, --eval_only=True or a mode not of new_run_modes (one that reads
    a saved run: analyze.py's readers) the checkpoint's config is the base, and the flags may change all but
    LOCKED_ON_RESUME. A sweep (lists of SWEEPABLE values) puts SAE <name> in out_dir/<name>/ and records the names in
    out_dir/sweep.json; resuming reads that file."""
    scalars = {k: v for k, v in overrides.items() if not isinstance(v, list)}
    base = replace(config_class(), **scalars)
    if base.init_from != "resume" and not base.eval_only and base.mode in new_run_modes:
        if "layer" in scalars and base.layers:
            raise ValueError(f"--layer={base.layer} and --layers={base.layers}: give one of them")
        if base.acts and os.path.isdir(base.acts):
            scalars = from_cache_manifest(base.acts, scalars)
            base, overrides = replace(base, **scalars), {**overrides, **scalars}
        runs = expand_sweep(overrides)
        if base.cross_layer and base.mode == "train":  # one CLT (or a sweep's) reads every layer of the row
            check_cross_layer(base)
            layers = run_layers(base)
            if len(layers) < 2:
                raise ValueError(f"--layers={base.layers} names {len(layers)} layer: a cross-layer transcoder needs at "
                                 f"least 2")
            runs = [(name, {**run, "layer": layers[0]}) for name, run in runs]
        elif base.layers and base.mode == "train":  # one SAE (or a sweep's) per layer, named after it, layer by layer
            # a cache's layers are the ones it holds (checked against its model when it was written); a .npy holds
            # one, which check_config says
            layers = run_layers(base)
            named = lambda layer, name: "-".join([f"layer{layer:02d}"] * (len(layers) > 1) + [name] * bool(name))
            runs = [(named(layer, name), {**run, "layer": layer}) for layer in layers for name, run in runs]
        resolved = [(replace(base, **{**run, "out_dir": os.path.join(base.out_dir, name) if name else base.out_dir}),
                     None) for name, run in runs]
        if base.mode == "train":
            refuse_to_overwrite([run_cfg.out_dir for run_cfg, _ in resolved])
        return resolved
    if len(scalars) < len(overrides):
        raise ValueError(f"cannot change what a saved run sweeps ({', '.join(sorted(set(overrides) - set(scalars)))})")
    manifest = os.path.join(base.out_dir, "sweep.json")
    if base.ckpt or not os.path.isfile(manifest):
        paths = [base.ckpt or os.path.join(base.out_dir, "ckpt.pt")]
    else:
        paths, committed = recover_sweep_checkpoint(base.out_dir)
        scalars.pop("out_dir")  # each SAE keeps its own directory
    scalars.pop("init_from", None)  # the saved one stays
    runs = []
    for path in paths:
        checkpoint = load_checkpoint(path)
        if len(paths) > 1 and checkpoint["iter_num"] != committed:
            raise ValueError(f"{path} is at iter {checkpoint['iter_num']}, {base.out_dir}/sweep.json at {committed}")
        saved = saved_config(checkpoint, config_class)
        changed = [k for k in LOCKED_ON_RESUME if k in scalars and scalars[k] != getattr(saved, k)]
        if changed:
            raise ValueError(f"cannot change {', '.join(changed)} of a saved run; start a new --out_dir instead")
        runs.append((replace(saved, **scalars), checkpoint))
    return runs


def one_run(resolved, what="SAE"):
    """The (cfg, checkpoint) of a mode that reads one SAE; a sweep's several are a one-line ValueError naming them."""
    if len(resolved) > 1:
        raise ValueError(f"--mode={resolved[0][0].mode} reads one {what}; pass --ckpt=<out_dir>/<name>/ckpt.pt, one of "
                         f"{', '.join(os.path.basename(c.out_dir) for c, _ in resolved)}")
    return resolved[0]


def refuse_to_overwrite(out_dirs):
    """A new run in a directory that holds a checkpoint would replace it at its first save and append to its
    log.jsonl: refused, naming the way to continue it (an hour of training lost to a forgotten --init_from=resume
    is what this prevents)."""
    for out_dir in out_dirs:
        if os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
            raise ValueError(f"{out_dir} holds a checkpoint: --init_from=resume --out_dir={out_dir} continues it; "
                             f"to start over, delete it or give another --out_dir")


def run_layers(cfg):
    """The layers a --layers run reads: a cache's are the ones it holds (checked against its model when it was
    written); a .npy holds one (check_config refuses it with --layers); else --layers of the model's."""
    if cfg.acts:
        return read_cache_manifest(cfg.acts)["layers"] if os.path.isdir(cfg.acts) else [cfg.layer]
    return parse_layers(cfg.layers, model_n_layer(cfg))


def from_cache_manifest(cache_dir, scalars):
    """A run on an activation cache reads the model, site and contexts the cache was harvested from: they come
    from its manifest (init_from and data_dir may be given, e.g. where the shards moved). -> scalars updated"""
    manifest = read_cache_manifest(cache_dir)
    saved = manifest["settings"]
    clash = [k for k in ("layer", "layers", "site", "target_site", "block_size", "exclude_pos0") if k in scalars and
             scalars[k] != saved[k]]
    if clash:
        raise ValueError(f"--acts={cache_dir} holds {', '.join(f'{k}={saved[k]!r}' for k in clash)}; drop those flags "
                         f"or write another cache")
    keys = ("layer", "layers", "site", "target_site", "block_size", "exclude_pos0", "n_layer", "n_head", "n_embd")
    return {**{k: saved[k] for k in keys}, "init_from": manifest["model"], "data_dir": manifest["data_dir"], **scalars}


def save_sweep_checkpoint(out_dir, runs, it):
    """Checkpoints of several SAEs, all at iteration `it` or none: each is written to ckpt.pt.tmp, then
    sweep.json names the iteration (the commit), then each is renamed. runs: [(cfg, checkpoint)]."""
    for cfg, checkpoint in runs:
        torch.save(checkpoint, os.path.join(cfg.out_dir, "ckpt.pt.tmp"))
    manifest = {"names": [os.path.basename(cfg.out_dir) for cfg, _ in runs], "iter_num": it}
    write_json(os.path.join(out_dir, "sweep.json"), manifest)
    for cfg, _ in runs:
        os.replace(os.path.join(cfg.out_dir, "ckpt.pt.tmp"), os.path.join(cfg.out_dir, "ckpt.pt"))


def recover_sweep_checkpoint(out_dir):
    """Completes a save that sweep.json committed (the renames), discards one that it did not.
    -> (the paths of the checkpoints, the committed iteration)."""
    manifest = json.load(open(os.path.join(out_dir, "sweep.json")))
    paths = [os.path.join(out_dir, name, "ckpt.pt") for name in manifest["names"]]
    for path in paths:
        if os.path.exists(path + ".tmp"):
            if torch.load(path + ".tmp", map_location="cpu", weights_only=True)["iter_num"] == manifest["iter_num"]:
                os.replace(path + ".tmp", path)
            else:  # written after the last commit: that save never finished
                os.remove(path + ".tmp")
    return paths, manifest["iter_num"]


# -----------------------------------------------------------------------------
# the run: python sae.py [config/...py] [--key=value ...]; torchrun --standalone --nproc_per_node=N sae.py ...
# The device and process group, each SAE's state (Run), what the parts share (Context), and main's
# parts: start, prepare, the loop (evaluate and save, resample, a step of every SAE, log), finish

def auto_dtype(device_type):
    return "bfloat16" if device_type == "cuda" or cpu_bf16_native() else "float32"


def resolved_dtype(cfg, device_type):
    """--dtype with auto decided for this device."""
    return cfg.dtype if cfg.dtype != "auto" else auto_dtype(device_type)


def init_device(cfg):
    """-> (ddp, rank, world size, device, autocast). Under torchrun, a process group: nccl on GPUs, gloo on CPUs
    (so a 2-process run is testable here). Autocast (the model's forwards and the SAE's training step) at
    --dtype=auto: bf16 on CUDA and on CPUs that multiply bf16 natively, fp32 on the others (sae_kernels.py's rule)."""
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
    if ddp:
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        device = f"cuda:{local_rank}" if backend == "nccl" else "cpu"
        if backend == "nccl":  # each rank's GPU chosen before the group exists, and bound to it (device_id): NCCL
            torch.cuda.set_device(device)  # then builds its communicator there, not every rank's on GPU 0
        dist.init_process_group(backend=backend, device_id=torch.device(device) if backend == "nccl" else None)
    else:
        rank, world = 0, 1
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if device_type == "cpu":
        keep_freed_memory()  # each step's large temporaries reuse the last step's memory, without page faults
    dtype = resolved_dtype(cfg, device_type)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype={dtype!r}: valid values are auto, float32, bfloat16, float16")
    if device_type == "cpu" and dtype == "bfloat16" and not cpu_bf16_native() and rank == 0:
        slower = "about 200x slower than float32: oneDNN has no bf16 kernels without AVX-512 or AVX-NE-CONVERT, so " \
                 "torch's generic matmul runs it" if not ONEDNN_BF16 else "slower than float32"
        print(f"note: --dtype=bfloat16 on this CPU (no AMX or AVX512-BF16) is emulated, {slower}; --dtype=auto picks "
              "float32 here", file=sys.stderr)
    return ddp, rank, world, device, torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=dtype != "float32")


class Run:
    """One SAE of the process, with what is its own: config (cfg.out_dir is its directory), Adam (two groups, so
    the encoder and decoder rates can differ), feature tracker, and its checkpoint's state when resuming."""

    def __init__(self, cfg, checkpoint, widths, device, sweep=False, n_layers=1):
        self.cfg, self.prefix = cfg, f"{os.path.basename(cfg.out_dir)} | " if sweep else ""
        torch.manual_seed(cfg.seed)  # the same init on every rank, in every run of this seed, for every SAE of a sweep
        if cfg.cross_layer:  # one CLT over the n_layers layers of the rows
            self.sae = sae = CrossLayerTranscoder.from_config(widths, cfg, n_layers).to(device)
            encoder, decoder = sae.groups()
        else:
            self.sae = sae = SAE.from_config(widths, cfg).to(device)
            # an architecture's per-feature parameters (and a transcoder's input bias) learn at the encoder's rate, the
            # skip path, which writes the target, at the decoder's
            encoder = [sae.W_enc, sae.b_enc, *sae.latent_params()] + ([sae.b_in] if sae.transcoder else [])
            decoder = [sae.W_dec, sae.b_dec] + ([sae.W_skip] if sae.skips else [])
        self.optimizer = torch.optim.Adam([{"params": encoder, "lr": cfg.lr_enc or cfg.lr},
                                           {"params": decoder, "lr": cfg.lr_dec or cfg.lr}], betas=(cfg.beta1, cfg.beta2))
        # not fused=True: 8% of a bf16 CPU step faster, but its results differ in the last bits from one process to
        # the next (a resumed run or a sweep's SAE then leaves its uninterrupted twin; seen in the resume tests)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.tracker = FeatureTracker(cfg.d_sae * (n_layers if cfg.cross_layer else 1), cfg.dead_window, device=device)
        self.train_sae = torch.compile(self.sae) if cfg.compile else self.sae
        # whether every loss since iteration `checked` was finite, kept on the device (check_finite reads it)
        self.finite, self.checked = torch.ones((), dtype=torch.bool, device=device), 0
        self.scales = (1.0, 1.0)  # its layer's (input's, target's) normalisation, set by set_scales (a CLT's: two lists)
        if checkpoint:
            self.scales = (checkpoint["act_scale"], checkpoint.get("target_scale", checkpoint["act_scale"]))
            self.sae.load_state_dict(checkpoint["sae"])
            self.tracker.load_state_dict(checkpoint["tracker"])
            if not cfg.eval_only:
                self.optimizer.load_state_dict(checkpoint["optimizer"])


def start_wandb(wandb, runs, sweep_dir):
    """--wandb_log: one W&B run per SAE (a sweep's SAEs in one group), its config the SAE's. The run's id is kept
    in out_dir/wandb_id, so a resumed SAE continues its W&B run. WANDB_MODE=offline writes to out_dir/wandb
    without the network (`wandb sync` uploads it later)."""
    for run in runs:
        id_path = os.path.join(run.cfg.out_dir, "wandb_id")
        if not os.path.exists(id_path):  # a W&B run id: 8 characters of [0-9a-f]
            write_atomic(id_path, lambda f: f.write(os.urandom(4).hex()))
        run.wandb = wandb.init(project=run.cfg.wandb_project, name=os.path.basename(os.path.abspath(run.cfg.out_dir)),
                               group=os.path.basename(os.path.abspath(sweep_dir)) if len(runs) > 1 else None,
                               id=open(id_path).read().strip(), resume="allow", config=asdict(run.cfg),
                               dir=run.cfg.out_dir, reinit="create_new")  # several runs at once: wandb >= 0.19.10


def check_finite(runs, it, ddp=False, params=False):
    """Stops the run if a loss since the last check was not finite (with params, also if a parameter is not: another
    rank's loss reaches them through the averaged gradients). Checked at log steps (ddp: on every rank) and before
    each save (rank 0's parameters), not every step: reading a GPU value waits for all the work queued before it,
    and a step that waits cannot queue the next while the GPU runs. Diverged parameters are never saved."""
    for run in runs:
        finite = run.finite & torch.stack([torch.isfinite(p).all() for p in run.sae.parameters()]).all() if params \
            else run.finite
        finite = finite.float()
        if ddp:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not finite.item():
            saved = f"the last good checkpoint is {run.cfg.out_dir}/ckpt.pt" if os.path.exists(
                os.path.join(run.cfg.out_dir, "ckpt.pt")) else "no checkpoint was written yet"
            when = f"iter {it}" if run.checked == it else f"an iteration from {run.checked} to {it}"
            raise FloatingPointError(f"{run.prefix}loss is not finite at {when}; stopping ({saved}); try a lower --lr")
        run.checked = it + 1


@dataclass
class Context:
    """What the parts of a training run share: the first SAE's config (a sweep's SAEs share every key that is not
    SWEEPABLE), the process's place in the group, the activations, the models evaluation runs, the SAEs (Run) and
    the activation scale. Built by start_process() and prepare_runs()."""
    cfg: TrainConfig
    ddp: bool
    rank: int
    world: int
    device: str
    autocast: object
    wandb: object = None
    source: object = None          # ActivationBuffer or ActsFile
    model: object = None           # what evaluation runs the val contexts through
    val_batches: list = ()
    val_acts: object = None
    runs: list = ()
    layers: tuple = ()             # the layers the rows hold, in order (--layers; else the one of --layer)
    widths: tuple = (0, 0)         # (d_in, d_out) of a layer: d_out 0 for SAEs, a transcoder's target's width else
    scale: float = 1.0             # the first layer's input's normalisation: E|x| = sqrt(d_in) after it
    target_scale: float = 1.0      # a transcoder's target's: E|y| = sqrt(d_out) (an SAE's: scale)
    row_scale: object = 1.0        # every layer's, as the batches' columns are scaled (row_scales)

    @property
    def master(self):  # rank 0 logs, evaluates and checkpoints
        return self.rank == 0

    def columns(self, layer):
        """The columns of a batch that hold layer's activations (all of them with one layer)."""
        if len(self.layers) == 1:
            return slice(None)
        width, at = sum(self.widths), self.layers.index(layer)
        return slice(at * width, (at + 1) * width)

    def blocks(self, x):
        """A batch (N, L (d_in + d_out)) -> {layer: its rows (N, d_in + d_out)}, each contiguous (the kernels' layout;
        with one layer, x itself)."""
        return {layer: x[:, self.columns(layer)].contiguous() for layer in self.layers}

    def print0(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)


def start_process(cfg, overrides, resolved):
    """The device and the process group, the overrides echoed, every SAE's config checked, wandb imported (before
    the model loads: a missing package fails early). -> Context"""
    ddp, rank, world, device, autocast = init_device(cfg)
    ctx = Context(cfg, ddp, rank, world, device, autocast)
    if ctx.master:
        for key, value in overrides.items():
            print(f"override: {key} = {value!r}")
    for run_cfg, _ in resolved:
        check_config(run_cfg, world)
    if cfg.wandb_log and ctx.master:
        try:
            import wandb
        except ImportError:
            raise ValueError("--wandb_log=True needs the wandb package: pip install wandb (WANDB_MODE=offline logs "
                             "without the network)") from None
        ctx.wandb = wandb
    if any(run_cfg.jl_sample and run_cfg.loss != "sparsity" for run_cfg, _ in resolved):
        ctx.print0("note: --jl_sample estimates the JL penalty without its training behaviour (docs/results.md: the "
                   "JL penalty, measured); --jl_sample=0 is the exact penalty")
    if cfg.mode != "train" and ddp:
        raise ValueError(f"--mode={cfg.mode} runs in one process: launch it with python, not torchrun")
    return ctx


def prepare_runs(ctx, resolved, checkpoint):
    """The activations and the model, every SAE of the sweep, and the data position: the checkpoint's, or a fresh start
    with the activation scale and b_dec estimated from a first sample. Rank 0 writes each SAE's config and starts
    wandb. -> the iteration to start at"""
    cfg, device = ctx.cfg, ctx.device
    ctx.layers = tuple(sorted({layer for run_cfg, _ in resolved for layer in
                               (run_layers(run_cfg) if run_cfg.cross_layer else [run_cfg.layer])}))
    ctx.source, ctx.widths, ctx.model, ctx.val_batches, ctx.val_acts = activation_source(cfg, device, ctx.autocast,
                                                                                         ctx.rank, ctx.world, ctx.layers)
    ctx.runs = [Run(run_cfg, run_checkpoint, ctx.widths, device, sweep=len(resolved) > 1, n_layers=len(ctx.layers))
                for run_cfg, run_checkpoint in resolved]
    if checkpoint:
        iter_num = checkpoint["iter_num"]
        set_scales(ctx, {layer: scale for run in ctx.runs for layer, scale in run_scales(ctx, run).items()})
        if not cfg.eval_only:
            ctx.source.start(checkpoint["data"])
            torch.set_rng_state(checkpoint["rng"]["torch"])
        ctx.print0(f"resumed {', '.join(run.cfg.out_dir for run in ctx.runs)} at iter {iter_num}")
    else:
        iter_num = 0
        ctx.source.start()
        start_scales_and_biases(ctx)
    if ctx.master:
        for run in ctx.runs:
            os.makedirs(run.cfg.out_dir, exist_ok=True)
            if not cfg.eval_only:  # the config it trains with, what --mode=plot reads
                write_json(os.path.join(run.cfg.out_dir, "config.json"), asdict(run.cfg))
        if cfg.wandb_log:
            start_wandb(ctx.wandb, ctx.runs, os.path.dirname(cfg.out_dir) if len(ctx.runs) > 1 else cfg.out_dir)
    return iter_num


def column_scales(widths, scale, target_scale, device):
    """The factor each column of a batch is normalised by: scale for an SAE (widths (d_in, 0)); a transcoder's rows
    [x_in | y] take scale on their d_in columns and target_scale on their d_out -> (d_in + d_out,)."""
    d_in, d_out = widths
    if not d_out:
        return scale
    return torch.cat([torch.full((d_in,), float(scale)), torch.full((d_out,), float(target_scale))]).to(device)


def run_scales(ctx, run):
    """{layer: (input's scale, target's)} of the layers a run reads: its layer's, or each of a CLT's (its scales are
    two lists, in ctx.layers' order)."""
    if run.cfg.cross_layer:
        return {layer: (run.scales[0][i], run.scales[1][i]) for i, layer in enumerate(ctx.layers)}
    return {run.cfg.layer: run.scales}


def set_scales(ctx, scales):
    """scales {layer: (input's scale, target's)}: each SAE's (run.scales; a CLT's every layer's, as two lists), the
    first layer's as ctx.scale and ctx.target_scale, and the batches' row_scale: column_scales of one layer, or each
    layer's block of columns scaled by its own, (L (d_in + d_out),)."""
    for run in ctx.runs:
        run.scales = ([scales[l][0] for l in ctx.layers], [scales[l][1] for l in ctx.layers]) if run.cfg.cross_layer \
            else scales[run.cfg.layer]
    ctx.scale, ctx.target_scale = scales[ctx.layers[0]]
    if len(ctx.layers) == 1:
        ctx.row_scale = column_scales(ctx.widths, ctx.scale, ctx.target_scale, ctx.device)
        return
    d_in, d_out = ctx.widths
    ctx.row_scale = torch.cat([torch.full((d,), float(s)) for layer in ctx.layers
                               for d, s in zip((d_in, d_out), scales[layer]) if d]).to(ctx.device)


def start_scales_and_biases(ctx):
    """A fresh run's normalisation and b_dec (a transcoder's b_in too), from a first sample of the activations: the
    scales make E|x| = sqrt(d_in) and E|y| = sqrt(d_out) (Anthropic, April 2024 update: coefficients then transfer
    across layers and models); each bias starts at its side's b_dec_init (geometric median, mean or zeros), and with
    --w_dec_init=data the dictionary rows at rows of the same sample (dictionary_from_data). With --layers, one
    layer's block of the sample at a time (a copy of all 30 of SmolLM2's transcoder blocks is 2.3 GB)."""
    cfg, (d_in, d_out) = ctx.cfg, ctx.widths
    sample = ctx.source.sample(cfg.resample_samples, torch.Generator().manual_seed(cfg.seed)).to(ctx.device)
    def parts(layer):  # {bias: (n, d)}: the layer's input and target columns (its block of the sample, contiguous)
        rows = sample[:, ctx.columns(layer)].contiguous()
        return {"b_in": rows[:, :d_in], "b_dec": rows[:, d_in:]} if d_out else {"b_dec": rows}
    mean_norms = torch.stack([part.norm(dim=1).mean() for layer in ctx.layers for part in parts(layer).values()])
    if ctx.ddp:
        dist.all_reduce(mean_norms)
        mean_norms /= ctx.world
    mean_norms = iter(mean_norms.tolist())
    widths = [d for d in (d_in, d_out) if d]  # each part's
    scales = {layer: [math.sqrt(d) / next(mean_norms) if cfg.normalize else 1.0 for d in widths] for layer in ctx.layers}
    set_scales(ctx, {layer: (s[0], s[-1]) for layer, s in scales.items()})
    initial = {"zeros": lambda x: torch.zeros(x.shape[1], device=x.device), "mean": lambda x: x.mean(dim=0),
               "geometric_median": geometric_median}
    reads = lambda run: ctx.layers if run.cfg.cross_layer else (run.cfg.layer,)
    for layer, init in dict.fromkeys((l, run.cfg.b_dec_init) for run in ctx.runs for l in reads(run)):  # once a sweep
        for (name, part), part_scale in zip(parts(layer).items(), scales[layer]):
            value = initial[init](part * part_scale)
            for run in ctx.runs:
                if layer in reads(run) and run.cfg.b_dec_init == init:
                    bias = getattr(run.sae, name).data  # a CLT's: (L, d), this layer's row
                    (bias[ctx.layers.index(layer)] if run.cfg.cross_layer else bias).copy_(value)
                    if ctx.ddp:  # ranks saw different samples: rank 0's for all
                        dist.broadcast(bias, src=0)
    for run in ctx.runs:
        if run.cfg.w_dec_init == "data":
            layer = run.cfg.layer
            dictionary_from_data(run.sae, parts(layer), scales[layer], torch.Generator().manual_seed(run.cfg.seed + 1))
            if ctx.ddp:  # rank 0's rows for all, as for the biases
                for W in (run.sae.W_enc, run.sae.W_dec):
                    dist.broadcast(W.data, src=0)


@torch.no_grad()
def dictionary_from_data(sae, parts, scales, generator):
    """--w_dec_init=data: each dictionary row starts as the direction from b_dec of its own sample (d_sae distinct
    rows of the first sample, drawn by generator), its norm kept; an SAE's encoder stays tied to it (W_enc = c W_dec^T
    as at random init), a transcoder's encoder columns are the same samples' inputs from b_in. Why it helps, as we read
    it (docs/results.md "Known features"): a data point is a mix of the features active on it, so a row started at
    one already leans toward the strongest of them, where a random direction leans toward none.
    parts: {"b_in"?, "b_dec"}: the sample's columns (n, d); scales: their normalisation scales, in that order."""
    scale = dict(zip(parts, scales))
    rows = torch.randperm(parts["b_dec"].shape[0], generator=generator)[:sae.W_dec.shape[0]]
    rows = rows.to(parts["b_dec"].device)
    directions = lambda name: F.normalize(parts[name][rows] * scale[name] - getattr(sae, name), dim=1)  # (d_sae, d)
    W_dec = directions("b_dec")                                                                    # (d_sae, d_out)
    W_in = directions("b_in") if sae.transcoder else W_dec                                         # (d_sae, d_in)
    sae.W_dec.copy_(W_dec * sae.W_dec.norm(dim=1, keepdim=True))
    sae.W_enc.copy_(W_in.T * sae.W_enc.norm(dim=0))  # (d_in, d_sae): each column's norm kept


def train(ctx, start_iter):
    """The loop: evaluate and save every eval_interval (rank 0), resample at resample_iters, and for each batch
    every SAE's step; a line per SAE every log_interval."""
    cfg = ctx.cfg
    t0, last_log = time.time(), start_iter - 1
    for run in ctx.runs:
        run.checked = start_iter
    for it in range(start_iter, cfg.max_iters + 1):
        if ctx.master and (it % cfg.eval_interval == 0 or it == cfg.max_iters) and (it > start_iter or it == 0):
            evaluate_runs(ctx, it)
            if it > 0:
                save_runs(ctx, it)
            t0, last_log = time.time(), it - 1  # evaluation is not training time
        if it == cfg.max_iters:
            break
        if it in cfg.resample_iters:
            resample_runs(ctx, it)
        x = ctx.source.next_batch().to(ctx.device, non_blocking=True) * ctx.row_scale  # (per_rank, L (d_in (+ d_out)))
        log_now, stats = it % cfg.log_interval == 0 or it == cfg.max_iters - 1, []
        rows = ctx.blocks(x) if not all(run.cfg.cross_layer for run in ctx.runs) else {}  # a CLT reads the whole row
        for run in ctx.runs:
            loss, terms, lr_mult = train_step(run, x if run.cfg.cross_layer else rows[run.cfg.layer], it, ctx.autocast,
                                              ctx.world)
            if log_now:  # (the logged columns' names, their values (1 + terms,), lr)
                logged = terms.logged(run.cfg)
                stats.append((["loss", *logged], torch.stack([loss, *logged.values()]), run.base_lrs[-1] * lr_mult))
        if log_now:
            if ctx.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt, t0, steps, last_log = time.time() - t0, time.time(), it - last_log, it
            log_progress(ctx, it, stats, dt, steps)


def evaluate_runs(ctx, it):
    """Rank 0: every SAE evaluated (evaluate()), in fp32 whatever --dtype says: CE recovered divides by the
    ablation's cost, 0.10 nats at SmolLM2's layer 15 mlp_in, and bf16 forwards moved CE there by 0.0015 nats
    (2,032 tokens), 1.5% of that cost. A layer's SAEs are evaluated together, spliced in at their layer alone.
    Each SAE's metrics logged (log_evaluation)."""
    for run in (run for run in ctx.runs if run.cfg.cross_layer):  # a CLT reads and writes every layer at once
        log_evaluation(run, it, evaluate_clt(run.sae, run.tracker, run.scales, run.cfg, ctx.layers, ctx.model,
                                             ctx.val_batches, ctx.val_acts))
    for layer in ctx.layers:
        runs = [run for run in ctx.runs if run.cfg.layer == layer and not run.cfg.cross_layer]
        if not runs:
            continue
        val_acts = ctx.val_acts[:, ctx.columns(layer)] if ctx.val_acts is not None else None
        all_metrics = evaluate([run.sae for run in runs], [run.tracker for run in runs], runs[0].scales, runs[0].cfg,
                               ctx.model, ctx.val_batches, val_acts)
        for run, metrics in zip(runs, all_metrics):
            log_evaluation(run, it, metrics)
    if len(ctx.layers) > 1 and ctx.val_batches and not all(run.cfg.cross_layer for run in ctx.runs):
        evaluate_replacement_runs(ctx, it)


def evaluate_replacement_runs(ctx, it):
    """--layers: the replacement model of each set of a sweep's SAEs (one per layer, named alike but for the layer)
    evaluated (evaluate_replacement), appended to replacement.jsonl beside the runs' directories and printed."""
    sets = {}
    for run in (run for run in ctx.runs if not run.cfg.cross_layer):  # a CLT is its own replacement (evaluate_clt)
        # layer03-topk-k16 is in set topk-k16; a pass without a sweep is one set, "all"
        name = os.path.basename(run.cfg.out_dir).partition("-")[2] or "all"
        sets.setdefault(name, {})[run.cfg.layer] = (run.sae, run.scales)
    results = evaluate_replacement(ctx.model, sets, ctx.cfg, ctx.val_batches)
    with open(os.path.join(os.path.dirname(ctx.cfg.out_dir), "replacement.jsonl"), "a") as f:
        for name, metrics in results.items():
            f.write(json.dumps({"iter": it, "set": name, "layers": list(ctx.layers), **metrics}) + "\n")
            print(f"eval {it:5d} | replacement of {len(ctx.layers)} layers | {name} | ce {metrics['ce_clean']:.3f}/"
                  f"{metrics['ce_sae']:.3f}/{metrics['ce_zero']:.3f} (clean/replaced/zero) | recovered "
                  f"{metrics['ce_recovered']:.3f} | increase {metrics['ce_increase']:.4f} | kl {metrics['kl']:.4f}")


def log_evaluation(run, it, metrics, note=""):
    """One SAE's metrics at iteration it: appended to its log.jsonl (what analyze.py's plots read), sent to wandb, and
    printed in one line (note appended)."""
    if run.cfg.wandb_log:
        run.wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=it)
    metrics = {"iter": it, **metrics}
    with open(os.path.join(run.cfg.out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")
    line = f"eval {it:5d} | {run.prefix}mse {metrics['mse']:.4f} | fvu {metrics['fvu']:.4f} | l0 {metrics['l0']:.1f} | " \
           f"dead {metrics['dead_frac']:.3f} | dense {metrics['dense_frac']:.3f} | max cos {metrics['mean_max_cos']:.3f}"
    if "ce_clean" in metrics:
        line += f" | ce {metrics['ce_clean']:.3f}/{metrics['ce_sae']:.3f}/{metrics['ce_zero']:.3f} (clean/sae/zero)" \
                f" | recovered {metrics['ce_recovered']:.3f} | kl {metrics['kl']:.4f}"
    print(line + note)


def make_checkpoint(ctx, run, it):
    freq = run.tracker.freq()
    return {"sae": run.sae.state_dict(), "optimizer": run.optimizer.state_dict(), "config": asdict(run.cfg),
            "iter_num": it, "act_scale": run.scales[0], "target_scale": run.scales[1], "data": ctx.source.state_dict(),
            "rng": {"torch": torch.get_rng_state()}, "tracker": run.tracker.state_dict(), "feature_freq": freq.cpu(),
            "freq_hist": log10_freq_histogram(freq)}


def save_runs(ctx, it):
    """Rank 0: every SAE's checkpoint at iteration it (a sweep's all at once, or none), never of diverged parameters."""
    check_finite(ctx.runs, it, params=True)
    if len(ctx.runs) == 1:
        save_checkpoint(os.path.join(ctx.cfg.out_dir, "ckpt.pt"), make_checkpoint(ctx, ctx.runs[0], it))
    else:
        save_sweep_checkpoint(os.path.dirname(ctx.cfg.out_dir),
                              [(run.cfg, make_checkpoint(ctx, run, it)) for run in ctx.runs], it)


def resample_runs(ctx, it):
    """Towards Monosemanticity's resampling of each dense-code SAE's dead features (the k-sparse ones have AuxK)."""
    resampled = [run for run in ctx.runs if run.cfg.arch not in K_SPARSE and not run.cfg.cross_layer]  # a CLT: none
    if not resampled:
        return
    x = ctx.source.sample(ctx.cfg.resample_samples, torch.Generator().manual_seed(ctx.cfg.seed + it)).to(ctx.device)
    rows = ctx.blocks(x * ctx.row_scale)
    for run in resampled:
        dead = run.tracker.dead()
        n = resample_dead_(run.sae, run.optimizer, dead, rows[run.cfg.layer])
        if ctx.ddp:  # every rank resampled the same features from its own inputs: rank 0's rows for all
            for p in (run.sae.W_enc, run.sae.b_enc, run.sae.W_dec):
                dist.broadcast(p.data, src=0)
        run.tracker.restart_(dead)
        ctx.print0(f"iter {it}: {run.prefix}resampled {n} dead features")


LOG_FORMAT = {"jl": ".5f", "l0": ".1f", "l1": ".3f"}  # the training line's digits where 4 decimals do not suit


def log_progress(ctx, it, stats, dt, steps):
    """The training lines, one per SAE: each one's loss and terms (averaged over ranks) at iteration it, the lr, and
    the process's time per step since the last line (every SAE sees every token); on CUDA the peak GPU memory."""
    check_finite(ctx.runs, it, ctx.ddp)
    on_cuda = ctx.device.startswith("cuda")
    # the most GPU memory tensors have held so far (the caching allocator's high-water mark)
    memory = f" | peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if on_cuda else ""
    for run, (names, values, lr) in zip(ctx.runs, stats):
        if ctx.ddp:
            dist.all_reduce(values)
            values /= ctx.world
        logged = dict(zip(names, values.tolist()))
        columns = " | ".join(f"{name} {value:{LOG_FORMAT.get(name, '.4f')}}" for name, value in logged.items())
        ctx.print0(f"iter {it:5d} | {run.prefix}{columns} | lr {lr:.2e} | {dt / steps * 1000:.1f} ms/step | "
                   f"{ctx.cfg.batch_size * steps / dt:,.0f} tok/s" + memory)
        if ctx.master and ctx.cfg.wandb_log:
            run.wandb.log({**{f"train/{name}": value for name, value in logged.items()}, "train/lr": lr,
                           "train/ms_per_step": dt / steps * 1000}, step=it)


def finish(ctx):
    """wandb's runs closed; under torchrun, the group left once rank 0 has saved."""
    if ctx.master and ctx.cfg.wandb_log:
        for run in ctx.runs:
            run.wandb.finish()
    if ctx.ddp:  # wait for rank 0's last evaluation and checkpoint: gloo aborts if a peer leaves early
        dist.barrier()
        dist.destroy_process_group()
        # gloo's worker threads can still abort the interpreter's finalisation with SIGABRT ("terminate called
        # without an active exception", seen here about one run in three; pytorch/pytorch#179291): all is
        # saved and flushed, so leave without it
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(0)


def main(argv):
    overrides = parse_overrides(TrainConfig(), argv)
    if overrides.get("mode", "train") not in MODES:  # before a checkpoint is looked for
        raise ValueError(f"--mode={overrides['mode']}: sae.py trains and caches; the readers of trained SAEs and logs "
                         f"are analyze.py's: python analyze.py {' '.join(argv)}")
    resolved = resolve_runs(overrides)
    # the SAEs of a sweep share every key that is not SWEEPABLE; cache reads one run's settings
    cfg, checkpoint = resolved[0] if resolved[0][0].mode == "train" else one_run(resolved)
    ctx = start_process(cfg, overrides, resolved)
    if cfg.mode == "cache":
        return write_activation_cache(cfg, ctx.device, ctx.autocast)
    iter_num = prepare_runs(ctx, resolved, checkpoint)
    if cfg.eval_only:
        if ctx.master:
            evaluate_runs(ctx, iter_num)
        finish(ctx)
        return
    train(ctx, iter_num)
    finish(ctx)


def cli(main, argv):
    """A script's command line (sae.py's, analyze.py's): main(argv) -> the exit status. A refusal (ValueError) or a
    diverged run (FloatingPointError) is one line on stderr and status 1, never a traceback."""
    try:
        main(argv)
    except (ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:]))
