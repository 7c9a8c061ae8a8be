"""
Reading trained SAEs and their logs, beside sae.py, which trains them and never imports this file (nanoGPT's
train.py and sample.py): export to SAELens and circuit-tracer, steering, feature dashboards, the plots and tables
of runs, and the LoRA fine-tune of the feature-persistence experiment. The job is named by --mode; the --key=value
flags and config files are sae.py's (docs/flags.md), and a checkpoint is found as sae.py finds it (--out_dir, or
--ckpt).

$ python analyze.py --mode=export --out_dir=out --export_dir=export      # SAELens's cfg.json + safetensors
$ python analyze.py --mode=export --export_format=circuit_tracer --out_dir=out/all --export_dir=$PWD/ct  # per layer
$ python analyze.py --mode=steer --out_dir=out --feature=3 --scale=20 --prompt="The capital of France is"
$ python analyze.py --mode=dashboard --out_dir=out --features=top_freq:50
$ python analyze.py --mode=plot --plot_runs='logs/runs/*' --plot_dir=figures
$ python analyze.py --mode=finetune --init_from=models/smollm2-135m --data_dir=data/edu --finetune_dir=models/ft
$ python analyze.py --mode=persistence --out_dir=out --eval_model=models/ft  # the SAE on the fine-tune
$ python analyze.py --mode=overlap --out_dir=out/sweep   # how many features peak on the same token as another
"""
import contextlib
import glob
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from sae import ARCH_KEYS, CONV1D_WEIGHTS, GPT, INIT_NORM, CrossLayerTranscoder, run_layers, SAE, SPARSITY_COEFF, DataLoaderLite, \
    TrainConfig, check_site, check_tokenizer, checkpoint_file, cli, evaluate, is_transcoder, load_checkpoint, load_lm, \
    load_model, log_evaluation, model_family, one_run, parse_overrides, prepare_runs, progress, read_hf_config, \
    resolve_runs, save_checkpoint, saved_config, upgrade_config, site_width, sites_of, start_process, val_contexts, \
    write_atomic, write_json

# -----------------------------------------------------------------------------
# config: sae.py's flags (a checkpoint's own, which the command line may override) and each mode's below


@dataclass
class AnalyzeConfig(TrainConfig):
    # analyze.py's modes
    export_dir: str = "export"         # --mode=export writes cfg.json and sae_weights.safetensors here
    export_format: str = "saelens"     # ... saelens (one SAE), or circuit_tracer (a transcoder per layer of a run's
                                       # sweep: config.yaml and layer_{i}.safetensors; docs/research-helpers.md)
    export_set: str = ""               # ... circuit_tracer, of a pass over layers that swept settings: the set exported,
                                       # its runs' names less the layer (layer03-skipTrue: skipTrue)
    feature: int = 0                   # --mode=steer: the feature ...
    scale: float = 10.0                # ... added with this many units of its decoder direction (normalised units)
    prompt: str = "The"                # ... after this prompt
    max_new_tokens: int = 40
    features: str = "0:64"             # --mode=dashboard: a range a:b, or top_freq:K (the K most frequent features)
    dashboard_tokens: int = 2**15      # val tokens the dashboard runs the SAE over
    dashboard_file: str = ""           # "" = out_dir/dashboard.html
    plot_runs: str = "out"             # --mode=plot: directories searched for runs (log.jsonl), comma-separated globs
    plot_dir: str = "figures"          # ... the figures (PNG, matplotlib) and the matched-sparsity table go here
    plot_l0: float = 32.0              # ... the L0 at which the table compares methods (interpolated on each frontier)
    finetune_dir: str = ""             # --mode=finetune: LoRA-tunes the model on data_dir's train split, writes it merged here
    finetune_iters: int = 100          # ... Adam steps of harvest_batch contexts of block_size tokens
    finetune_lr: float = 1e-3
    lora_rank: int = 8                 # ... W + (lora_alpha / lora_rank) B A on each adapted weight (Hu et al. 2021)
    lora_alpha: float = 16.0
    lora_targets: str = ""             # ... names of the blocks' linear layers to adapt (q_proj,v_proj); "" = all of them
    eval_model: str = ""               # --mode=persistence: the model (its fine-tune) to score the SAE on; the same
                                       # tokenizer and width


EXPORT_FORMATS = ("saelens", "circuit_tracer")


def check_analyze_config(cfg):
    """What each mode needs, as one-line ValueErrors (sae.check_config checks the rest)."""
    if cfg.export_format not in EXPORT_FORMATS:
        raise ValueError(f"--export_format={cfg.export_format}: valid values are {', '.join(EXPORT_FORMATS)}")
    if cfg.mode == "finetune" and (not cfg.finetune_dir or cfg.acts):
        raise ValueError("--mode=finetune needs --finetune_dir=DIR (and no --acts): it tunes the model of --init_from")
    if cfg.mode == "finetune" and min(cfg.finetune_iters, cfg.lora_rank, cfg.finetune_lr) <= 0:
        raise ValueError("--finetune_iters, --lora_rank and --finetune_lr must be positive")
    if cfg.mode == "persistence" and not cfg.eval_model:
        raise ValueError("--mode=persistence needs --eval_model=DIR: the model (e.g. a fine-tune) to score the SAE on")

# -----------------------------------------------------------------------------
# research helpers: export to SAELens, steering

# our sites in TransformerLens's hook names, which SAELens and Neuronpedia use (../shared/notes/saelens-format.md)
HOOK_NAMES = {"resid_pre": "blocks.{}.hook_resid_pre", "resid_mid": "blocks.{}.hook_resid_mid",
              "mlp_in": "blocks.{}.ln2.hook_normalized", "mlp_hidden": "blocks.{}.mlp.hook_post",
              "mlp_out": "blocks.{}.hook_mlp_out", "resid_post": "blocks.{}.hook_resid_post"}


# the SAELens architecture each of ours is saved as, and the keys of its cfg.json beyond the standard SAE's: a
# batchtopk or matryoshka SAE is, at inference, a JumpReLU with one threshold for all features (SAELens saves them
# so); a vae at inference is a ReLU SAE; fsq's rounding has no SAELens counterpart
SAELENS_ARCH = {"relu": "standard", "vae": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                "matryoshka": "jumprelu"}
# transcoders: SAELens 6.54 loads ReLU and JumpReLU ones, each with or without the skip path (sae_lens/saes/
# transcoder.py), without an input bias (b_in is folded into b_enc); it has no TopK transcoder
SAELENS_TRANSCODER = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}


def export_saelens(checkpoint, export_dir):
    """Writes cfg.json + sae_weights.safetensors as SAELens reads them (its standard, topk or jumprelu SAE, see
    SAELENS_ARCH), for the activation that TransformerLens's hook gives. Free decoder norms are folded first
    (fold_decoder_norms_). Our SAE sees s*x (s the activation scale); folded in, it reads x:
    W_enc' = s W_enc, b_dec' = b_dec / s, W_dec' = W_dec / s. At mlp_in, TransformerLens's hook
    (blocks.L.ln2.hook_normalized) holds the norm's output n before its gain g and bias b, x = g * n + b (RMSNorm:
    b = 0): folded too, exactly, as an affine change of coordinates: W_enc'' = diag(g) W_enc', W_dec'' = W_dec' / g,
    b_dec'' = (b_dec' - b) / g, so that the SAE reads n and writes n_hat = (x_hat - b) / g. Neither fold changes
    the pre-activations, so thresholds carry over as they are."""
    from safetensors.torch import save  # -> the file's bytes
    sae, cfg, s = load_sae(checkpoint)  # norms folded
    if cfg.arch not in SAELENS_ARCH or (sae.transcoder and SAELENS_ARCH[cfg.arch] not in SAELENS_TRANSCODER):
        what = "its code is rounded to {} levels".format(cfg.fsq_levels) if cfg.arch == "fsq" else "SAELens 6.54 " \
            "has no TopK transcoder"
        supported = [a for a in SAELENS_ARCH if not sae.transcoder or SAELENS_ARCH[a] in SAELENS_TRANSCODER]
        raise ValueError(f"--arch={cfg.arch}{' transcoder' * sae.transcoder} has no SAELens format ({what}); export "
                         f"supports {', '.join(supported)}")
    weights = transcoder_weights(sae, s, target_scale(checkpoint)) if sae.transcoder else sae_weights(sae, s)
    if SAELENS_ARCH[cfg.arch] == "jumprelu":  # one threshold per feature (batchtopk's global one, repeated)
        weights["threshold"] = sae.threshold.detach().float().expand(sae.b_enc.shape).clone()
    from_model = has_model(cfg)
    model = load_lm(cfg) if from_model and cfg.site == "mlp_in" else None
    if model is not None:
        fold_input_norm_(weights, model.blocks[cfg.layer].mlp_norm, cfg.layer, sae.transcoder)
    d_in, d_sae = weights["W_enc"].shape
    metadata = {"model_name": cfg.init_from if from_model else cfg.acts, "hook_name": HOOK_NAMES[cfg.site].format(cfg.layer),
                "hook_layer": cfg.layer, "context_size": cfg.block_size, "prepend_bos": False,
                "dataset_path": cfg.data_dir if from_model else cfg.acts, "trained_with": "gpt_sae",
                "arch": cfg.arch, "loss": cfg.loss, "iter_num": checkpoint["iter_num"]}
    if sae.transcoder:  # the hook it writes (SAELens's TranscoderConfig has no field for it yet: metadata carries it)
        metadata.update(hook_name_out=HOOK_NAMES[cfg.target_site].format(cfg.layer), hook_layer_out=cfg.layer)
    if from_model and {"resid_pre", "resid_mid", "resid_post", "mlp_out"} & set(sites_of(cfg)) and \
            (cfg.init_from == "scratch" or model_family(cfg.init_from) == "gpt2"):
        # TransformerLens centres what GPT-2 (a LayerNorm model) writes into the residual stream by default;
        # our SAE read the uncentred stream, which TransformerLens gives with this option
        metadata["model_from_pretrained_kwargs"] = {"center_writing_weights": False}
    architecture = SAELENS_ARCH[cfg.arch]
    if sae.transcoder:
        architecture = SAELENS_TRANSCODER[architecture].replace("transcoder", "skip_transcoder" if sae.skips else
                                                                "transcoder")
    sae_cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": not sae.transcoder, "normalize_activations": "none",
               "reshape_activations": "none", "architecture": architecture, "metadata": metadata}
    if sae.transcoder:
        sae_cfg["d_out"] = weights["W_dec"].shape[1]
    if cfg.arch == "topk":
        sae_cfg["k"] = cfg.k
    os.makedirs(export_dir, exist_ok=True)
    weights_path, cfg_path = os.path.join(export_dir, "sae_weights.safetensors"), os.path.join(export_dir, "cfg.json")
    write_atomic(weights_path, lambda f: f.write(save({k: v.contiguous() for k, v in weights.items()})), "wb")
    write_json(cfg_path, sae_cfg)
    print(f"wrote {cfg_path} and {weights_path} (hook {metadata['hook_name']}, d_sae {d_sae})")
    return sae_cfg


def sae_weights(sae, s):
    """An SAE's weights for inputs in model units: ours reads s*x, so W_enc' = s W_enc, b_dec' = b_dec / s and
    W_dec' = W_dec / s."""
    return {"W_enc": sae.W_enc.detach() * s, "b_enc": sae.b_enc.detach().clone(), "W_dec": sae.W_dec.detach() / s,
            "b_dec": sae.b_dec.detach() / s}


def transcoder_weights(sae, s_in, s_out):
    """A transcoder's, as SAELens computes one: pre = x @ W_enc + b_enc (no input bias), y = f @ W_dec + b_dec
    (+ x @ W_skip^T). Ours reads s_in x and predicts s_out y: W_enc' = s_in W_enc, b_enc' = b_enc - b_in @ W_enc,
    W_dec' = W_dec / s_out, b_dec' = b_dec / s_out, W_skip' = W_skip s_in / s_out."""
    weights = {"W_enc": sae.W_enc.detach() * s_in, "b_enc": (sae.b_enc - sae.b_in @ sae.W_enc).detach(),  # (d_in,) @ (d_in, d_sae)
               "W_dec": sae.W_dec.detach() / s_out, "b_dec": sae.b_dec.detach() / s_out}
    if sae.skips:
        weights["W_skip"] = sae.W_skip.detach() * (s_in / s_out)
    return weights


def norm_gain(norm):
    """What multiplies a norm's normalised input: LayerNorm's and RMSNorm's weight, GemmaRMSNorm's 1 + weight."""
    return getattr(norm, "gain", norm.weight)


def fold_input_norm_(weights, norm, layer, transcoder):
    """At mlp_in, TransformerLens's hook (blocks.L.ln2.hook_normalized) holds the norm's output n before its gain g
    and bias b, x = g * n + b (RMSNorm: b = 0): folded into what reads x, exactly, as an affine change of coordinates.
    An SAE: W_enc'' = diag(g) W_enc', W_dec'' = W_dec' / g, b_dec'' = (b_dec' - b) / g (it reads n and writes
    n_hat = (x_hat - b) / g). A transcoder writes another site: W_enc'' = diag(g) W_enc', b_enc'' = b_enc' + b @ W_enc',
    W_skip'' = W_skip' diag(g), b_dec'' = b_dec' + b @ W_skip'^T. Neither changes the pre-activations."""
    g = norm_gain(norm).detach()
    b = norm.bias.detach() if getattr(norm, "bias", None) is not None else torch.zeros_like(g)
    if (g == 0).any():
        raise ValueError(f"layer {layer}'s norm has zero gains: the SAE cannot be folded into its normalised input")
    W_enc = weights["W_enc"]
    if not transcoder:
        weights.update(W_enc=g[:, None] * W_enc, W_dec=weights["W_dec"] / g, b_dec=(weights["b_dec"] - b) / g)
        return
    weights.update(W_enc=g[:, None] * W_enc, b_enc=weights["b_enc"] + b @ W_enc)  # (d_in,) @ (d_in, d_sae)
    if "W_skip" in weights:
        weights.update(W_skip=weights["W_skip"] * g, b_dec=weights["b_dec"] + weights["W_skip"] @ b)  # (d_out, d_in) @ (d_in,)


# circuit-tracer 0.5.0's per-layer transcoders (model_kind: transcoder_set; ../shared/notes/circuit-tracer.md): the
# hooks it reads and writes for our (site, target_site) pairs, relative to block L. Both of its backends have them for
# GPT-2 and the Llama family: TransformerLens's wraps each block's MLP in hook_in (the norm's output, gain and bias
# included: our mlp_in, so no gain is folded, unlike SAELens's ln2.hook_normalized) and hook_out, and loads the model
# uncentred (center_writing_weights=False: hook_mlp_out is our mlp_out); nnsight's maps them to the Llama's
# post_attention_layernorm's output and input and the MLP's output (circuit_tracer/utils/tl_nnsight_mapping.py)
CIRCUIT_TRACER_HOOKS = {("mlp_in", "mlp_out"): ("mlp.hook_in", "mlp.hook_out"),
                        ("resid_mid", "mlp_out"): ("hook_resid_mid", "hook_mlp_out")}
# where its nnsight mapping names other hooks, by the checkpoint's architecture: Gemma's MLP writes hook_mlp_out
# (post_feedforward_layernorm's output, our mlp_out; no mlp.hook_out); Gemma 3's mlp.hook_in is our mlp_in; Gemma 2
# has no mlp.hook_in, and its ln2.hook_normalized is our mlp_in before the norm's gain (1 + w), which the export
# folds into the encoder (fold_input_norm_); Qwen3 names mlp.hook_in and mlp.hook_out only
GEMMA_HOOKS = {("mlp_in", "mlp_out"): ("mlp.hook_in", "hook_mlp_out"),
               ("resid_mid", "mlp_out"): ("hook_resid_mid", "hook_mlp_out")}
CIRCUIT_TRACER_ARCH_HOOKS = {
    "Gemma2ForCausalLM": {**GEMMA_HOOKS, ("mlp_in", "mlp_out"): ("ln2.hook_normalized", "hook_mlp_out")},
    "Gemma3ForCausalLM": GEMMA_HOOKS, "Gemma3ForConditionalGeneration": GEMMA_HOOKS,
    "Qwen3ForCausalLM": {("mlp_in", "mlp_out"): ("mlp.hook_in", "mlp.hook_out")}}
# each architecture's form there at inference: relu and vae (z = pre) a ReLU; jumprelu a JumpReLU x * (x > theta_i);
# batchtopk and matryoshka a JumpReLU with their one threshold repeated. Its loader has neither a per-token top-k (no
# threshold picks k features of every token) nor fsq's rounding
CIRCUIT_TRACER_ARCH = {"relu": "relu", "vae": "relu", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                       "matryoshka": "jumprelu"}


def check_circuit_tracer_set(resolved):
    """The one-line ValueErrors of a transcoder set circuit-tracer cannot load; -> (n_layer, the hooks)."""
    pairs, models, widths = set(), set(), set()
    for cfg, checkpoint in resolved:
        name = f"layer {cfg.layer} ({os.path.basename(os.path.normpath(cfg.out_dir))})"
        if not is_transcoder(cfg):
            raise ValueError(f"--export_format=circuit_tracer exports transcoders; {name} is an SAE of {cfg.site} "
                             f"(a transcoder has --target_site=mlp_out)")
        if (cfg.site, cfg.target_site) not in CIRCUIT_TRACER_HOOKS:
            raise ValueError(f"{name} reads {cfg.site} and predicts {cfg.target_site}; circuit-tracer's transcoders "
                             f"read and write {', '.join(f'{a} -> {b}' for a, b in CIRCUIT_TRACER_HOOKS)}")
        if cfg.arch not in CIRCUIT_TRACER_ARCH:
            why = f"its code is rounded to {cfg.fsq_levels} levels" if cfg.arch == "fsq" else \
                "its k features per token are no threshold's, and circuit-tracer's loader has no TopK"
            raise ValueError(f"--arch={cfg.arch} has no circuit-tracer form ({why}); export supports "
                             f"{', '.join(CIRCUIT_TRACER_ARCH)}")
        if cfg.arch in ("batchtopk", "matryoshka") and checkpoint["sae"]["threshold"] == 0:
            raise ValueError(f"{name}: the {cfg.arch} inference threshold was never estimated (it is 0); train longer")
        if not has_model(cfg) or cfg.init_from == "scratch":
            raise ValueError(f"{name} was trained on {cfg.acts or 'a random GPT-2 (--init_from=scratch)'}, which "
                             f"circuit-tracer cannot load: it runs a saved model")
        pairs.add((cfg.site, cfg.target_site)), models.add(cfg.init_from)
        widths.add(checkpoint["sae"]["b_enc"].numel())
    if len(pairs) > 1 or len(models) > 1:
        raise ValueError(f"one transcoder set is one model's and one pair of sites; these have "
                         f"{', '.join(sorted(models))} and {', '.join(f'{a} -> {b}' for a, b in sorted(pairs))}")
    if len(widths) > 1:
        raise ValueError(f"the transcoders have d_sae {', '.join(map(str, sorted(widths)))}; circuit-tracer's set "
                         f"needs one width")
    hf, _ = read_hf_config(cfg.init_from)  # the layer count, without reading any weights
    n_layer = hf.get("num_hidden_layers", hf.get("n_layer"))
    layers = sorted(c.layer for c, _ in resolved)
    wrong = [(what, found) for what, found in (("missing", sorted(set(range(n_layer)) - set(layers))),
             ("duplicated", sorted({i for i in layers if layers.count(i) > 1})),
             ("out of range", [i for i in layers if i >= n_layer])) if found]
    if wrong:  # its set hooks every block, and TranscoderSet asserts layers 0..max
        raise ValueError(f"circuit-tracer needs one transcoder for each layer 0..{n_layer - 1} of {cfg.init_from}: "
                         f"{', '.join(f'{what} {found}' for what, found in wrong)}")
    return n_layer, circuit_tracer_hooks(hf, cfg.init_from, pairs.pop())


def circuit_tracer_hooks(hf, model, pair):
    """circuit-tracer's (input, output) hooks for the (site, target_site) pair on the model of config.json hf; a pair
    it names no hooks for there is a one-line ValueError."""
    arch = (hf.get("architectures") or [""])[0]
    hooks = CIRCUIT_TRACER_ARCH_HOOKS.get(arch, CIRCUIT_TRACER_HOOKS)
    if pair not in hooks:
        raise ValueError(f"circuit-tracer names no hooks for {pair[0]} -> {pair[1]} on {model} ({arch}); it reads and "
                         f"writes {', '.join(f'{a} -> {b}' for a, b in hooks)} there")
    return hooks[pair]


def export_circuit_tracer(resolved, export_dir):
    """Writes a transcoder per layer as circuit-tracer 0.5.0 loads a transcoder_set: config.yaml and
    layer_{i}.safetensors holding exactly W_enc (d_sae, d_model), read as F.linear(x, W_enc, b_enc), W_dec (d_sae,
    d_model), b_enc, b_dec, and optionally W_skip (d_model, d_model), added as x @ W_skip^T, and
    activation_function.threshold (d_sae,), a JumpReLU x * (x > threshold) (absent: ReLU); its loader refuses any other
    key. The scales and b_in are folded as for SAELens (transcoder_weights). Nothing is written unless all are valid."""
    n_layer, hooks = check_circuit_tracer_set(resolved)
    check_no_stale_files(export_dir, [f"layer_{i}.safetensors" for i in range(n_layer)])
    skips = any(cfg.skip for cfg, _ in resolved)
    # Gemma 2's input hook is the MLP norm's output before its gain: the gain goes into each encoder
    blocks = load_model(resolved[0][0].init_from).blocks if hooks[0] == "ln2.hook_normalized" else None
    layers = {}
    for cfg, checkpoint in resolved:
        sae, _, s_in = load_sae(checkpoint)  # free decoder norms folded: features in the unit-norm rows' units
        w = transcoder_weights(sae, s_in, target_scale(checkpoint))
        if blocks is not None:
            fold_input_norm_(w, blocks[cfg.layer].mlp_norm, cfg.layer, transcoder=True)
        # its W_enc is ours transposed: (d_in, d_sae) -> (d_sae, d_in)
        tensors = {"W_enc": w["W_enc"].T, "W_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"]}
        if skips:  # its set has a skip path on every layer or on none (TranscoderSet.skip_connection is layer 0's):
            # a layer without one gets W_skip = 0, which adds exactly nothing
            tensors["W_skip"] = w.get("W_skip", torch.zeros(sae.d_out, sae.d_in))  # (d_out, d_in)
        if CIRCUIT_TRACER_ARCH[cfg.arch] == "jumprelu":
            # ours is relu(pre) * (pre > theta); its x * (x > theta) equals it for theta >= 0, and max(theta, 0) is
            # exact for a negative learned one. batchtopk's global theta, repeated
            theta = sae.threshold.detach().float().clamp_min(0)
            tensors["activation_function.threshold"] = theta.expand(sae.b_enc.shape)
        layers[f"layer_{cfg.layer}.safetensors"] = tensors
    cfg, checkpoint = resolved[0]
    ct_cfg = write_circuit_tracer_files(export_dir, layers, "transcoder_set", cfg.init_from, hooks)
    print(f"wrote {export_dir}/config.yaml and layer_0..{n_layer - 1}.safetensors ({' -> '.join(hooks)}, "
          f"d_sae {layers['layer_0.safetensors']['b_enc'].numel()}, iter {checkpoint['iter_num']}); load it by its "
          f"absolute path")
    return ct_cfg


def check_no_stale_files(export_dir, names):
    """circuit-tracer's loaders read every layer_*.safetensors (a set) or count the W_enc_*.safetensors (a CLT) of the
    directory: another export's files there would join this one, so a directory holding others is refused."""
    stale = [f for f in glob.glob(os.path.join(export_dir, "*.safetensors")) if os.path.basename(f) not in names]
    if stale:
        raise ValueError(f"{export_dir} holds {os.path.basename(stale[0])}, which circuit-tracer would load with this "
                         f"export; export to an empty --export_dir")


def write_circuit_tracer_files(export_dir, files, model_kind, model_name, hooks):
    """files {name: {key: tensor}} into export_dir, each under a temporary name (outside the loaders' globs) and
    renamed, then config.yaml, which circuit-tracer takes as "the export is complete": removed first, written last.
    -> config.yaml's keys"""
    from safetensors.torch import save  # -> the file's bytes
    os.makedirs(export_dir, exist_ok=True)
    cfg_path = os.path.join(export_dir, "config.yaml")
    if os.path.exists(cfg_path):
        os.remove(cfg_path)
    for name, tensors in files.items():
        tensors = {k: v.float().contiguous() for k, v in tensors.items()}
        write_atomic(os.path.join(export_dir, name), lambda f: f.write(save(tensors)), "wb")
    ct_cfg = {"model_kind": model_kind, "model_name": model_name, "feature_input_hook": hooks[0],
              "feature_output_hook": hooks[1], "scan": f"gpt_sae/{os.path.basename(os.path.normpath(export_dir))}"}
    # YAML by hand (no pyyaml here): flat keys, each value a JSON string, which YAML reads as a double-quoted scalar
    write_atomic(cfg_path, lambda f: f.write("".join(f"{k}: {json.dumps(v)}\n" for k, v in ct_cfg.items())))
    return ct_cfg


def export_circuit_tracer_clt(cfg, checkpoint, export_dir):
    """Writes a cross-layer transcoder (--cross_layer) as circuit-tracer 0.5.0 loads one (model_kind:
    cross_layer_transcoder, its load_clt): per source layer l, W_enc_{l}.safetensors with W_enc_{l} (d_sae, d_model),
    b_enc_{l}, b_dec_{l} (target layer l's output bias) and, for a JumpReLU, threshold_{l} (d_sae,); and
    W_dec_{l}.safetensors with W_dec_{l} (d_sae, n_layers - l, d_model), layer l's decoders to targets l..n-1. Ours
    reads s_in,l x_l and predicts s_out,t y_t (both scales per layer): W_enc' = s_in W_enc, b_enc' = b_enc - b_in @ W_enc,
    W_dec'[:, t - l] = W_dec[:, t - l] / s_out,t, b_dec'_t = b_dec_t / s_out,t; relu's free decoder norms are folded
    into the encoder as for an SAE (fold_decoder_norms_). Its loader reads no skip path: a CLT with one is refused."""
    layers = run_layers(cfg)
    if (cfg.site, cfg.target_site) not in CIRCUIT_TRACER_HOOKS:
        raise ValueError(f"the CLT reads {cfg.site} and predicts {cfg.target_site}; circuit-tracer's transcoders "
                         f"read and write {', '.join(f'{a} -> {b}' for a, b in CIRCUIT_TRACER_HOOKS)}")
    if cfg.arch not in CIRCUIT_TRACER_ARCH or cfg.arch in ("batchtopk", "matryoshka") and \
            (checkpoint["sae"]["threshold"] == 0).any():
        raise ValueError(f"--arch={cfg.arch}: circuit-tracer reads a ReLU or a JumpReLU, and this CLT's code is neither"
                         f"{' yet (its threshold was never estimated)' if cfg.arch in CIRCUIT_TRACER_ARCH else ''}")
    if cfg.skip:
        raise ValueError("circuit-tracer's CLT loader reads no skip path (load_clt); train the CLT with --skip=False")
    if not has_model(cfg) or cfg.init_from == "scratch":
        raise ValueError(f"the CLT was trained on {cfg.acts or 'a random GPT-2'}, which circuit-tracer cannot load")
    hf, _ = read_hf_config(cfg.init_from)
    hooks = circuit_tracer_hooks(hf, cfg.init_from, (cfg.site, cfg.target_site))
    if hooks[0] == "ln2.hook_normalized":  # Gemma 2: its gain is not folded into a CLT's encoders (yet)
        raise ValueError(f"circuit-tracer reads {cfg.init_from}'s MLP input before the norm's gain "
                         f"(ln2.hook_normalized); a CLT on it exports with --site=resid_mid, not mlp_in")
    n_layer = hf.get("num_hidden_layers", hf.get("n_layer"))
    if layers != list(range(n_layer)):  # its CLT hooks every block: n_layers is the number of W_enc files
        raise ValueError(f"circuit-tracer's CLT spans every layer 0..{n_layer - 1} of {cfg.init_from}; this one reads "
                         f"layers {cfg.layers} (train it with --layers=all)")
    d_in, d_sae = checkpoint["sae"]["W_enc.0"].shape
    clt = CrossLayerTranscoder.from_config((d_in, checkpoint["sae"]["b_dec"].shape[1]), replace(cfg, d_sae=d_sae), n_layer)
    clt.load_state_dict(checkpoint["sae"])
    s_in, s_out = (torch.tensor(checkpoint[key], dtype=torch.float32) for key in ("act_scale", "target_scale"))
    files = {}
    with torch.no_grad():
        for l in range(n_layer):
            W_enc, b_enc, W_dec = clt.W_enc[l], clt.b_enc[l] - clt.b_in[l] @ clt.W_enc[l], clt.W_dec[l]  # (d_in,) @ (d_in, d_sae)
            n = W_dec.norm(dim=1).clamp_min(1e-12) if clt.free_norms else torch.ones(d_sae)  # (d_sae,)
            W_dec = (W_dec / n[:, None]).view(d_sae, n_layer - l, -1) / s_out[l:, None]  # (d_sae, n - l, d_out)
            enc = {f"W_enc_{l}": (W_enc * n * s_in[l]).T, f"b_enc_{l}": b_enc * n, f"b_dec_{l}": clt.b_dec[l] / s_out[l]}
            if CIRCUIT_TRACER_ARCH[cfg.arch] == "jumprelu":  # max(theta, 0): ours is a ReLU too (export_circuit_tracer)
                theta = clt.threshold[l] if cfg.arch == "jumprelu" else clt.threshold[l].float().expand(d_sae)
                enc[f"threshold_{l}"] = theta.float().clamp_min(0)
            files[f"W_enc_{l}.safetensors"] = enc
            files[f"W_dec_{l}.safetensors"] = {f"W_dec_{l}": W_dec}
    check_no_stale_files(export_dir, files)
    ct_cfg = write_circuit_tracer_files(export_dir, files, "cross_layer_transcoder", cfg.init_from, hooks)
    print(f"wrote {export_dir}/config.yaml, W_enc_0..{n_layer - 1} and W_dec_0..{n_layer - 1}.safetensors (a cross-layer "
          f"transcoder, {' -> '.join(hooks)}, d_sae {d_sae} a layer, iter {checkpoint['iter_num']}); load it by its "
          f"absolute path")
    return ct_cfg


@contextlib.contextmanager
def steer(model, sae, features, layer, site, act_scale=1.0, mode="add"):
    """During the block, edits the model's activation at (layer, site) with SAE features {index: value}:
    add: + value * W_dec[index] / act_scale (the decoder direction in un-normalised units);
    clamp: moves the activation so that the SAE reads the feature at value (adds (value - f) * W_dec[index] / s);
    ablate: clamp to 0 (values ignored). A transcoder's features: site is (site, target_site) and act_scale (the
    input's, the target's): the code is read at the input, the directions added at the target, as it writes them.
    Leaves the model as it was on exit."""
    assert mode in ("add", "clamp", "ablate"), f"mode {mode!r}: add, clamp or ablate"
    sites, (s_in, s_out) = (site if isinstance(site, tuple) else (site,)), (
        act_scale if isinstance(act_scale, tuple) else (act_scale, act_scale))
    for name in sites:
        check_site(model.config, layer, name)
    idx = torch.tensor(list(features), dtype=torch.long)
    values = torch.tensor([float(v) for v in features.values()])
    code, calls = {}, [0]

    def edit(act):  # at each of sites in block order; act (B, T, d) in model units
        at, calls[0] = calls[0], calls[0] + 1
        if at == 0 and mode != "add":  # the code the SAE reads here
            code["f"] = sae((act * s_in).float().reshape(-1, act.shape[-1])).f  # (B*T, d_sae)
        if at < len(sites) - 1:
            return act
        directions = sae.W_dec[idx.to(act.device)].to(act.dtype) / s_out  # (k, d)
        if mode == "add":
            return act + values.to(act) @ directions                          # (k,) @ (k, d) -> (d,)
        f = code["f"]
        target = torch.zeros_like(values) if mode == "ablate" else values
        delta = target.to(f) - f[:, idx.to(f.device)]                          # (B*T, k)
        return act + (delta @ directions.float()).view_as(act).to(act.dtype)

    def reach_block(module, args, kwargs):  # the edit reaches the block as its site/edit arguments (SiteBlock.forward)
        calls[0] = 0
        return args, {**kwargs, "site": sites, "edit": edit}

    handle = model.blocks[layer].register_forward_pre_hook(reach_block, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None):
    """nanoGPT's sampling loop: idx (B, T) -> (B, T + max_new_tokens)."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.block_size:])[:, -1, :] / temperature  # (B, vocab)
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        probs = F.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return idx


@torch.no_grad()
def fold_decoder_norms_(sae):
    """Free norms folded into the encoder: rows of unit norm, the same x_hat, f scaled by the norms n:
    W_enc[:, i] *= n_i, b_enc_i *= n_i, threshold_i *= n_i, W_dec[i] /= n_i (SAELens's fold_W_dec_norm)."""
    n = sae.W_dec.norm(dim=1).clamp_min(1e-12)
    sae.W_enc.mul_(n), sae.b_enc.mul_(n), sae.W_dec.div_(n[:, None])
    if sae.arch == "jumprelu":
        sae.threshold.mul_(n)
    return sae


def load_sae(checkpoint):
    """-> (SAE, its TrainConfig, activation scale (a transcoder's input's: target_scale() gives its target's)) from a
    checkpoint dict."""
    cfg = saved_config(checkpoint, AnalyzeConfig)
    (d_in, d_sae), d_out = checkpoint["sae"]["W_enc"].shape, checkpoint["sae"]["W_dec"].shape[1]
    widths = (d_in, d_out if is_transcoder(cfg) else 0)
    sae = SAE.from_config(widths, replace(cfg, d_sae=d_sae))  # the weights' shape, whatever the config says
    sae.load_state_dict(checkpoint["sae"])
    if sae.free_norms:
        fold_decoder_norms_(sae)  # free norms folded: every helper reads unit-norm rows and the code in their units
    return sae.eval().requires_grad_(False), cfg, checkpoint["act_scale"]


def target_scale(checkpoint):
    """The scale of what the SAE writes: a transcoder's target's, an SAE's own input's."""
    return checkpoint.get("target_scale", checkpoint["act_scale"])


def has_model(cfg):
    """Whether a run's activations came from a model: the buffer's harvest or an activation cache, which
    records its model; a .npy of activations has none (nor a site) behind it."""
    return not cfg.acts.endswith(".npy")


def model_and_tokenizer(saved):
    """The model an SAE was trained on and its tokenizer, for the helpers that run text through both."""
    from prepare import load_tokenizer
    if not has_model(saved):
        raise ValueError(f"this SAE was trained on --acts={saved.acts}, activations with no model behind them")
    model = load_lm(saved)
    return model, load_tokenizer(model.tokenizer)


def steer_demo(cfg, checkpoint):
    """--mode=steer: the prompt continued with and without the feature, from the same seed."""
    sae, saved, act_scale = load_sae(checkpoint)
    if not 0 <= cfg.feature < sae.W_dec.shape[0]:
        raise ValueError(f"--feature={cfg.feature}: the SAE has features 0..{sae.W_dec.shape[0] - 1}")
    model, tok = model_and_tokenizer(saved)
    idx = torch.tensor([[tok.separator_id] + tok.encode(cfg.prompt)])  # as a document starts in the shards
    outputs = {}
    for label, scale in (("unsteered", 0.0), (f"feature {cfg.feature} x {cfg.scale:g}", cfg.scale)):
        with steer(model, sae, {cfg.feature: scale}, saved.layer, sites_of(saved), (act_scale, target_scale(checkpoint))):
            out = generate(model, idx, cfg.max_new_tokens, generator=torch.Generator().manual_seed(cfg.seed))
        outputs[label] = tok.decode(out[0, 1:].tolist())
        print(f"--- {label}\n{outputs[label]}\n")
    return outputs


# -----------------------------------------------------------------------------
# feature dashboards: one self-contained HTML file (no network: inline CSS and SVG, hover = title attributes)

def select_features(spec, freq):
    """'a:b' -> range(a, b); 'top_freq:K' -> the K most frequently firing features."""
    kind, _, arg = spec.partition(":")
    if kind == "top_freq" and arg.isdigit():
        return freq.argsort(descending=True)[:int(arg)].tolist()
    if kind.isdigit() and arg.isdigit() and int(kind) < int(arg) <= len(freq):
        return list(range(int(kind), int(arg)))
    raise ValueError(f"--features={spec!r}: expected a:b with 0 <= a < b <= {len(freq)}, or top_freq:K")


@torch.no_grad()
def feature_stats(model, sae, saved, act_scale, contexts, features, top_k=10, batch=8):
    """Runs the SAE over contexts (n, T) -> (every feature's firing frequency, {feature: its nonzero
    activations}, {feature: top_k (peak, context index, per-token activations)}, tokens counted)."""
    counts, values = torch.zeros(sae.W_dec.shape[0]), {i: [] for i in features}
    top = {i: [] for i in features}  # feature -> [(peak, context index, activations (T,))]
    idx = torch.tensor(features, dtype=torch.long)
    for first in progress(range(0, len(contexts), batch), desc="dashboard: features", unit="batch", leave=False):
        tokens = contexts[first:first + batch]
        acts = model.harvest(tokens, saved.layer, saved.site).float()  # (B, T, d)
        f = sae(acts.reshape(-1, acts.shape[-1]) * act_scale).f          # (B*T, d_sae)
        f = f.view(len(tokens), tokens.shape[1], -1)
        if saved.exclude_pos0:
            f[:, 0] = 0  # the SAE never trained on position 0
        counts += (f > 0).sum(dim=(0, 1)).float()
        chosen = f[:, :, idx]                                            # (B, T, k)
        for j, i in enumerate(features):
            values[i].append(chosen[:, :, j][chosen[:, :, j] > 0])
            peaks = chosen[:, :, j].max(dim=1).values
            top[i].extend((peaks[b].item(), first + b, chosen[b, :, j]) for b in range(len(tokens)) if peaks[b] > 0)
            top[i] = sorted(top[i], key=lambda e: -e[0])[:top_k]
    n_tokens = contexts.numel() - (len(contexts) if saved.exclude_pos0 else 0)
    return counts / n_tokens, {i: torch.cat(v) for i, v in values.items()}, top, n_tokens


@torch.no_grad()
def logit_effects(model, layer, site, directions):
    """The direct effect on the logits of adding each direction at (layer, site): through the MLP's output matrix for
    mlp_hidden, then the final norm's gain and the unembedding, as TransformerLens folds them (the norm's scale, which
    depends on the input, left out). directions (k, width) -> (k, vocab)"""
    if site == "mlp_hidden":
        directions = directions @ model.down_proj(layer).T              # (k, n_inner) @ (n_inner, C)
    return (directions * norm_gain(model.final_norm)) @ model.lm_head.weight.T  # (k, C) @ (C, vocab)


def svg_histogram(values, bins=30, width=360, height=80, lo=None, hi=None, label=""):
    """An inline SVG bar chart of a histogram of `values` (1-D tensor)."""
    if len(values) == 0:
        return "<p class=note>no activations</p>"
    lo = values.min().item() if lo is None else lo
    hi = max(values.max().item() if hi is None else hi, lo + 1e-9)
    counts = torch.histc(values.float(), bins=bins, min=lo, max=hi)
    bar = width / bins
    rects = "".join(f'<rect x="{k * bar:.1f}" y="{height - height * c / counts.max():.1f}" width="{bar - 1:.1f}" '
                    f'height="{height * c / counts.max():.1f}"><title>{lo + k * (hi - lo) / bins:.3g}..'
                    f'{lo + (k + 1) * (hi - lo) / bins:.3g}: {int(c)}</title></rect>' for k, c in enumerate(counts.tolist()))
    return (f'<svg width="{width}" height="{height + 14}" class=hist>{rects}<text x="0" y="{height + 12}">{lo:.3g}</text>'
            f'<text x="{width}" y="{height + 12}" text-anchor="end">{hi:.3g} {label}</text></svg>')


def render_tokens(enc, tokens, acts, peak):
    """Tokens as spans shaded by activation (red, relative to the feature's peak); hover shows the value."""
    import html
    spans = []
    for t, a in zip(tokens.tolist(), acts.tolist()):
        text = html.escape(enc.decode([t])).replace("\n", "&#8629;")
        spans.append(f'<span style="background:rgba(220,40,40,{a / peak:.2f})" title="{a:.3f}">{text}</span>')
    return "".join(spans)


def write_dashboard(cfg, checkpoint):
    """--mode=dashboard: the SAE over the first dashboard_tokens of the val shard -> one HTML file with the
    log10 firing-density histogram and, per feature, its frequency, activation histogram, top contexts
    and logit effects (the tokens its decoder direction promotes and suppresses through the unembedding)."""
    import html
    sae, saved, act_scale = load_sae(checkpoint)
    model, enc = model_and_tokenizer(saved)
    check_tokenizer(cfg.data_dir, model.tokenizer)
    contexts = val_contexts(cfg.data_dir, saved.block_size, cfg.dashboard_tokens, "dashboard")
    # pass 1: firing frequencies of every feature (needed to choose top_freq features); pass 2: the chosen ones
    freq_all, _, _, n_tokens = feature_stats(model, sae, saved, act_scale, contexts, [])
    features = select_features(cfg.features, freq_all)
    freq, values, top, _ = feature_stats(model, sae, saved, act_scale, contexts, features)
    # what a feature writes, at the site it writes (a transcoder's target)
    effects = logit_effects(model, saved.layer, sites_of(saved)[-1], sae.W_dec[features] / target_scale(checkpoint))
    density = freq_all[freq_all > 0].log10()
    what = f"{saved.site} -> {saved.target_site} transcoder" if sae.transcoder else saved.site
    parts = [f"<h1>SAE features: {html.escape(saved.init_from)} layer {saved.layer} {what}, d_sae {len(freq_all)}</h1>",
             f"<p>{contexts.numel():,} val tokens in {len(contexts)} contexts of {saved.block_size}; "
             f"{int((freq_all == 0).sum())} features never fired (left out of the histogram).</p>",
             f"<section id=density><h2>log10 firing density, all features</h2>{svg_histogram(density, 40, 720, 120, label='log10 freq')}</section>"]
    for j, i in enumerate(features):
        promoted = effects[j].topk(10).indices.tolist()
        suppressed = (-effects[j]).topk(10).indices.tolist()
        tok = lambda ids: " ".join(f"<code>{html.escape(repr(enc.decode([t])))}</code>" for t in ids)
        rows = "".join(f"<div class=ctx><span class=peak>{peak:.2f}</span>{render_tokens(enc, contexts[c], a, top[i][0][0])}</div>"
                       for peak, c, a in top[i])
        parts.append(f"<section class=feature id=feature-{i}><h2>feature {i}</h2>"
                     f"<p>firing frequency {freq[i].item():.4%} ({int(round(freq[i].item() * n_tokens))} tokens)</p>"
                     f"<div class=row><div><h3>activations</h3>{svg_histogram(values[i])}</div>"
                     f"<div><h3>logit effects</h3><p>promotes {tok(promoted)}</p><p>suppresses {tok(suppressed)}</p></div></div>"
                     f"<h3>top contexts</h3>{rows or '<p class=note>never fired on these tokens</p>'}</section>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}.hist rect{fill:#3a6ea5}.hist text{font-size:10px}"
             ".ctx{font-family:monospace;font-size:12px;white-space:pre-wrap;margin:2px 0;border-bottom:1px solid #eee}"
             ".peak{display:inline-block;width:4em;color:#888}.row{display:flex;gap:3em}section{margin-bottom:2em}"
             ".note{color:#888}code{background:#f4f4f4}")
    page = f"<!doctype html><html><head><meta charset=utf-8><title>SAE dashboard</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    path = cfg.dashboard_file or os.path.join(cfg.out_dir, "dashboard.html")
    write_atomic(path, lambda f: f.write(page.encode("utf-8")), "wb")  # UTF-8 whatever the locale, as its meta says
    print(f"wrote {path}: {len(features)} features over {contexts.numel():,} tokens; open it in a browser")
    return path


# -----------------------------------------------------------------------------
# fine-tuning: --mode=finetune trains LoRA adapters on the blocks of --init_from over data_dir's train split and
# writes the merged model as a save_pretrained directory, which every mode then reads like any checkpoint. It is
# the first half of the persistence experiment (docs/results.md): do the features of an SAE trained on the model
# survive a fine-tune? --mode=persistence --eval_model=<the fine-tune> is the second half.
# A second, small training loop, and not sae.py's: it trains the language model (Adam on its adapters, the next-token
# loss), where sae.py's loop trains SAEs on a frozen model's activations (harvest, SAE losses, DDP). It shares sae.py's
# data loader, val contexts, device setup and checkpoint writes; the loop is finetune_lora, its parts below it.

class LoRA(nn.Module):
    """Low-rank adaptation (Hu et al. 2021; microsoft/LoRA's loralib) as a parametrization of a frozen weight W
    (out, in): W + (alpha / r) B A, A (r, in) Kaiming-uniform as loralib starts it, B (out, r) zero, so training
    starts from the model itself. torch.nn.utils.parametrize recomputes it wherever the layer reads .weight (our
    Linear, and sae_kernels.linear's autograd path), and merges it into W when the parametrization is removed."""

    def __init__(self, weight, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, weight.shape[1], device=weight.device))
        self.B = nn.Parameter(torch.zeros(weight.shape[0], rank, device=weight.device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, weight):
        return weight + self.scale * (self.B @ self.A)  # (out, r) @ (r, in) -> (out, in)


def add_lora_(model, rank, alpha, targets=()):
    """LoRA on each nn.Linear of the model's blocks whose own name is in targets (all when empty). -> their names"""
    from torch.nn.utils import parametrize
    linears = [(name, module) for name, module in model.blocks.named_modules() if isinstance(module, nn.Linear)]
    own_name = lambda name: name.rsplit(".", 1)[-1]  # "3.self_attn.q_proj" -> "q_proj"
    unknown = sorted(set(targets) - {own_name(name) for name, _ in linears})
    if unknown:
        raise ValueError(f"--lora_targets: no linear layer of the blocks is named {', '.join(unknown)}; they are "
                         f"{', '.join(sorted({own_name(name) for name, _ in linears}))}")
    adapted = [(name, module) for name, module in linears if not targets or own_name(name) in targets]
    for _, module in adapted:
        parametrize.register_parametrization(module, "weight", LoRA(module.weight, rank, alpha))
    return [name for name, _ in adapted]


def merge_lora_(model):
    """Each LoRA folded into its weight (W + (alpha / r) B A), the parametrizations removed: a plain model again."""
    from torch.nn.utils import parametrize
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def lora_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith((".A", ".B"))}


def hf_state_dict(model):
    """The model's weights under the names (and layouts) of its Hugging Face checkpoint, which from_pretrained reads
    back and transformers loads: the Llama family's are ours; GPT-2's get the transformer. prefix back and their
    Conv1D (in, out) layout. A tied lm_head is left out (safetensors stores no shared tensors; loaders re-tie it)."""
    sd = model.state_dict()
    if isinstance(model, GPT):
        return {f"transformer.{k}": (v.t() if k.endswith(CONV1D_WEIGHTS) else v).contiguous()
                for k, v in sd.items() if k != "lm_head.weight"}
    tied = model.config.tie_word_embeddings
    return {k: v.contiguous() for k, v in sd.items() if not (tied and k == "lm_head.weight")}


HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt")  # whatever of these the source has


def save_hf_model(model, source, directory):
    """A save_pretrained directory for the model's weights: model.safetensors (fp32), and the source checkpoint's
    config and tokenizer files copied (a Hub id's from its cache)."""
    import shutil
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    for name in HF_SIDE_FILES:
        path = checkpoint_file(source, name)
        if path:
            shutil.copy(path, os.path.join(directory, name))
    save_file(hf_state_dict(model), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def lm_loss(model, contexts):
    """Mean next-token cross-entropy (nats) over a list of (B, T) contexts, in the parameters' dtype."""
    total, n = 0.0, 0
    for idx in contexts:
        logits = model(idx)  # (B, T, vocab)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten(), reduction="sum").item()
        n += idx[:, 1:].numel()
    return total / n


FINETUNE_SETTINGS = ("init_from", "data_dir", "block_size", "harvest_batch", "lora_rank", "lora_alpha", "lora_targets",
                     "finetune_lr", "seed")  # what a resumed fine-tune may not change


def finetune_lora(cfg, device, autocast):
    """--mode=finetune: Adam on the LoRA adapters alone (the model frozen) over data_dir's train split, the
    next-token loss in the autocast dtype; the val split's loss (fp32) every eval_interval. Work in progress lives
    in finetune_dir + ".partial" (lora.pt, rewritten atomically at each evaluation: a killed run resumes there, to
    the same weights); at the end the merged model, lora.pt and finetune.json (settings, val losses) are written
    there and the directory is renamed to finetune_dir. -> the val-loss history"""
    if os.path.exists(cfg.finetune_dir):
        raise ValueError(f"--finetune_dir={cfg.finetune_dir} exists; delete it or name another")
    model = load_lm(cfg, has_site=False).to(device)
    check_tokenizer(cfg.data_dir, model.tokenizer)
    torch.manual_seed(cfg.seed)  # the adapters' initialisation (A; B starts at zero)
    adapted = add_lora_(model, cfg.lora_rank, cfg.lora_alpha, [t for t in cfg.lora_targets.split(",") if t])
    params = [p for name, p in model.named_parameters() if name.endswith((".A", ".B"))]  # load_lm froze the rest
    optimizer = torch.optim.Adam(params, lr=cfg.finetune_lr, betas=(cfg.beta1, cfg.beta2))
    loader, val = finetune_data(cfg, device)
    work, settings = cfg.finetune_dir + ".partial", {k: getattr(cfg, k) for k in FINETUNE_SETTINGS}
    state_path = os.path.join(work, "lora.pt")
    start, history = resume_finetune(state_path, settings, model, optimizer, loader)
    os.makedirs(work, exist_ok=True)
    n_params = sum(p.numel() for p in params)
    print(f"LoRA rank {cfg.lora_rank} on {len(adapted)} linear layers: {n_params:,} trainable parameters")
    t0, last_log = time.time(), start - 1
    for it in range(start, cfg.finetune_iters + 1):
        if (it % cfg.eval_interval == 0 or it == cfg.finetune_iters) and (it > start or not history):
            history.append({"iter": it, "val_loss": lm_loss(model, val)})
            print(f"eval {it:5d} | val loss {history[-1]['val_loss']:.4f}")
            save_checkpoint(state_path, {"lora": lora_state_dict(model), "optimizer": optimizer.state_dict(),
                                         "data": loader.state_dict(), "iter": it, "history": history,
                                         "settings": settings})
            t0, last_log = time.time(), it - 1  # evaluation is not training time
        if it == cfg.finetune_iters:
            break
        idx = loader.next_batch().to(device)  # (B, T)
        loss = lora_step(model, optimizer, idx, autocast)
        if it % cfg.log_interval == 0:
            dt, t0, steps = time.time() - t0, time.time(), it - last_log
            last_log = it
            print(f"iter {it:5d} | loss {loss.item():.4f} | {dt / steps * 1000:.0f} ms/step | "
                  f"{idx.numel() * steps / dt:,.0f} tok/s")
    save_finetune(cfg, model, work, settings, adapted, history)
    print(f"wrote {cfg.finetune_dir}: val loss {history[0]['val_loss']:.4f} -> {history[-1]['val_loss']:.4f}")
    return history


def finetune_data(cfg, device):
    """The train split's loader (harvest_batch contexts of block_size tokens a step) and the val split's first
    eval_tokens as (harvest_batch, block_size) batches on the device, the same at every evaluation."""
    loader = DataLoaderLite(cfg.data_dir, "train", cfg.harvest_batch, cfg.block_size)
    val = [b.to(device) for b in val_contexts(cfg.data_dir, cfg.block_size, cfg.eval_tokens, "fine-tuning")
           .split(cfg.harvest_batch)]
    return loader, val


def resume_finetune(state_path, settings, model, optimizer, loader):
    """Where a killed fine-tune left lora.pt: its adapters, Adam state and data position restored, after checking
    that none of FINETUNE_SETTINGS changed. -> (the iteration to start at, the val-loss history so far)"""
    if not os.path.exists(state_path):
        return 0, []
    state = load_checkpoint(state_path)
    changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
    work = os.path.dirname(state_path)
    if changed:
        raise ValueError(f"{work} holds a fine-tune with other {', '.join(changed)}; delete it to start again")
    model.load_state_dict(state["lora"], strict=False)  # the adapters only: the frozen weights are the model's
    optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["data"])
    print(f"resumed {work} at iter {state['iter']}")
    return state["iter"], state["history"]


def lora_step(model, optimizer, idx, autocast):
    """One Adam step of the adapters on the next-token loss of idx (B, T): the forward in the autocast dtype, the
    cross-entropy in fp32. -> the loss"""
    with autocast:
        logits = model(idx)  # (B, T, vocab)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def save_finetune(cfg, model, work, settings, adapted, history):
    """The merged model and finetune.json (settings, tokens seen, val losses) into work (beside lora.pt), then work
    renamed to finetune_dir, so a directory of that name is always a finished fine-tune."""
    save_hf_model(merge_lora_(model), cfg.init_from, work)
    write_json(os.path.join(work, "finetune.json"), {**settings, "finetune_iters": cfg.finetune_iters,
                                                     "tokens": cfg.finetune_iters * cfg.harvest_batch * cfg.block_size,
                                                     "adapted": adapted, "val_loss": history})
    os.replace(work, cfg.finetune_dir)  # a directory: write_atomic's rename is the same move, for one file


# -----------------------------------------------------------------------------
# feature persistence: --mode=persistence scores an SAE on another model's activations (sae.py's evaluation) and
# compares its features' firing there and on its own model: the second half of the persistence experiment

PERSISTENCE_MIN_FIRINGS = 10  # a feature is compared when it fires at least this often on the SAE's own model


@torch.no_grad()
def feature_persistence(sae, scale, own_model, other_model, cfg, val_batches):
    """Each feature's firing frequency on the same val contexts and positions through the SAE's own model and
    another (its fine-tune): of the features firing at least PERSISTENCE_MIN_FIRINGS times on the own model
    ("compared"), the fraction whose count on the other lies within a factor of 2 ("within_2x"), and the fraction
    that never fires there ("silent")."""
    keep = slice(1, None) if cfg.exclude_pos0 else slice(None)
    counts = []
    for model in (own_model, other_model):
        fired = torch.zeros(sae.W_dec.shape[0], dtype=torch.float64)
        for idx in val_batches:
            act = model.harvest(idx, cfg.layer, cfg.site)[:, keep]  # (B, T', d)
            f = sae(act.reshape(-1, act.shape[-1]).float() * scale).f
            fired += (f > 0).sum(dim=0).double().cpu()
        counts.append(fired)
    own, other = counts
    compared = own >= PERSISTENCE_MIN_FIRINGS
    ratio = other[compared] / own[compared]
    return {"compared": int(compared.sum()), "within_2x": ((ratio >= 0.5) & (ratio <= 2)).double().mean().item(),
            "silent": (ratio == 0).double().mean().item()}


def score_on_another_model(resolved, overrides):
    """--mode=persistence: each SAE (a sweep's all) evaluated as sae.py evaluates it, with the val contexts run through
    --eval_model instead of its own model, plus feature_persistence; each record appended to the SAE's log.jsonl,
    marked with eval_model (the plots compare it with the SAE's own final evaluation)."""
    resolved = [(replace(run_cfg, eval_only=True), checkpoint) for run_cfg, checkpoint in resolved]  # reads, trains not
    cfg = resolved[0][0]
    ctx = start_process(cfg, overrides, resolved)
    iter_num = prepare_runs(ctx, resolved, resolved[0][1])
    if ctx.model is None:
        raise ValueError(f"--mode=persistence runs the val contexts through both models: {cfg.acts} has no token shards")
    own, other = ctx.model, load_lm(replace(cfg, init_from=cfg.eval_model)).to(ctx.device)
    check_tokenizer(cfg.data_dir, other.tokenizer)
    if site_width(other.config, cfg.site) != site_width(own.config, cfg.site):
        raise ValueError(f"--eval_model={cfg.eval_model}: its {cfg.site} is {site_width(other.config, cfg.site)} wide, "
                         f"the SAE reads {site_width(own.config, cfg.site)}")
    all_metrics = evaluate([run.sae for run in ctx.runs], [run.tracker for run in ctx.runs],
                           (ctx.scale, ctx.target_scale), cfg, other, ctx.val_batches)
    for run, metrics in zip(ctx.runs, all_metrics):
        p = feature_persistence(run.sae, ctx.scale, own, other, cfg, ctx.val_batches)
        log_evaluation(run, iter_num, {**metrics, "eval_model": cfg.eval_model, "persistence": p},
                       f" | on {cfg.eval_model}: {p['within_2x']:.3f} of {p['compared']} features fire within 2x")


# -----------------------------------------------------------------------------
# feature overlap: --mode=overlap measures what the JL penalty is for, distinct features. Each feature's
# top activations over the val contexts and the tokens they sit on: two features whose strongest activations sit on
# the same token read the same thing (one feature split into several, or absorbed), without a model judge.

OVERLAP_TOP = 10  # a feature's top activations; it is counted when it fires at least this often
OVERLAP_SUBSET = (1000, 20)  # the shared fraction is also taken in 20 random sets of 1000 counted features: the
                             # more features, the more collisions by chance, so SAEs compare at equal numbers


@torch.no_grad()
def top_token_overlap(sae, rows, tokens, top=OVERLAP_TOP, batch=2048, subset=OVERLAP_SUBSET):
    """rows (N, d_in) in the SAE's units, tokens (N,) the token each row sits on. A feature's peak token: the most
    common token among its `top` largest activations. -> {"features": features firing at least `top` times,
    "shared_peak": the fraction of them whose peak token is another counted feature's peak token too,
    "distinct_peaks": distinct peak tokens per counted feature (1: all differ), "shared_peak_subset": the shared
    fraction within random sets of subset[0] counted features, averaged over subset[1] sets (drawn by randperm
    from torch.Generator seeds 0, 1, ...; None with fewer features), "peak_share": the mean share of a counted
    feature's top activations that sit on its peak token, "single_token": the fraction of counted features whose top
    activations all sit on one token (a token feature; docs/results.md compares transcoders and SAEs by it)}"""
    d_sae = sae.W_dec.shape[0]
    best = torch.full((d_sae, top), -1.0)                  # each feature's largest activations so far
    best_rows = torch.zeros(d_sae, top, dtype=torch.long)  # ... and their rows
    fired = torch.zeros(d_sae, dtype=torch.long)
    for i in range(0, len(rows), batch):
        f = sae(rows[i:i + batch]).f                       # (b, d_sae)
        fired += (f > 0).sum(dim=0)
        values = torch.cat([best, f.T], dim=1)             # (d_sae, top + b)
        at = torch.cat([best_rows, torch.arange(i, i + len(f)).expand(d_sae, -1)], dim=1)
        best, pick = values.topk(top, dim=1)
        best_rows = at.gather(1, pick)
    counted = (fired >= top).nonzero().squeeze(1)
    top_tokens = tokens[best_rows[counted]]               # (counted, top)
    peaks = top_tokens.mode(dim=1).values                  # (counted,) each feature's peak token
    share = (top_tokens == peaks[:, None]).double().mean(dim=1)  # (counted,)
    size, draws = subset
    in_subsets = [shared_fraction(peaks[torch.randperm(len(peaks), generator=torch.Generator().manual_seed(i))[:size]])
                  for i in range(draws)] if len(peaks) >= size else None
    return {"features": len(counted), "shared_peak": shared_fraction(peaks),
            "distinct_peaks": len(peaks.unique()) / max(len(counted), 1),
            "shared_peak_subset": sum(in_subsets) / draws if in_subsets else None,
            "peak_share": share.mean().item() if len(share) else 0.0,
            "single_token": (share == 1).double().mean().item() if len(share) else 0.0}


def shared_fraction(peaks):
    """The fraction of the entries of peaks (n,) that another entry equals."""
    _, inverse, counts = peaks.unique(return_inverse=True, return_counts=True)
    return (counts[inverse] > 1).double().mean().item() if len(peaks) else 0.0


def overlap_of_runs(resolved):
    """--mode=overlap: top_token_overlap of each SAE (a sweep's all) on the val contexts it was evaluated on, through
    its model; written to each run's overlap.json and printed as a table."""
    cfg = resolved[0][0]
    if not has_model(cfg):
        raise ValueError(f"--mode=overlap reads the tokens under the activations: {cfg.acts} has no model behind it")
    model = load_lm(cfg)
    contexts = val_contexts(cfg.data_dir, cfg.block_size, cfg.eval_tokens, "overlap")  # (n, block_size)
    keep = 1 if cfg.exclude_pos0 else 0
    acts = torch.cat([model.harvest(b, cfg.layer, cfg.site)[:, keep:] for b in contexts.split(cfg.harvest_batch)])
    rows, tokens = acts.reshape(-1, acts.shape[-1]).float(), contexts[:, keep:].reshape(-1)  # (N, d_in), (N,)
    print(f"{'run':<48} {'features':>8} {'shared peak':>12} {'distinct peaks':>15} {'shared, 1000 of them':>21} "
          f"{'single token':>13}")
    for run_cfg, checkpoint in resolved:
        sae, _, scale = load_sae(checkpoint)
        result = top_token_overlap(sae, rows * scale, tokens)
        write_json(os.path.join(run_cfg.out_dir, "overlap.json"), {**result, "iter": checkpoint["iter_num"],
                                                                     "val_rows": len(rows), "top": OVERLAP_TOP})
        subset = result["shared_peak_subset"]
        print(f"{run_cfg.out_dir:<48} {result['features']:>8} {result['shared_peak']:>12.3f} "
              f"{result['distinct_peaks']:>15.3f} {'—' if subset is None else f'{subset:.3f}':>21} "
              f"{result['single_token']:>13.3f}")


# -----------------------------------------------------------------------------
# plots: --mode=plot reads every run's log.jsonl (and config.json) under plot_runs and draws the figures

def read_run_logs(roots):
    """-> [{"dir", "cfg" (dict), "final" (the last evaluation at its training context length, or None), "evals"}]
    for every directory under roots (comma-separated globs) holding a log.jsonl with an evaluation; the config
    from config.json, else ckpt.pt."""
    found = []
    for pattern in roots.split(","):
        matched = sorted(path for path in glob.glob(pattern) if os.path.isdir(path))
        if not matched:
            raise ValueError(f"--plot_runs: no directory matches {pattern}")
        for path, _, files in (walked for root in matched for walked in sorted(os.walk(root))):
            if "log.jsonl" not in files:
                continue
            evals = [json.loads(line) for line in open(os.path.join(path, "log.jsonl")) if line.strip()]
            if "config.json" in files:
                cfg = json.load(open(os.path.join(path, "config.json")))
            elif "ckpt.pt" in files:
                cfg = load_checkpoint(os.path.join(path, "ckpt.pt"))["config"]
            else:
                print(f"{path}: log.jsonl without config.json or ckpt.pt; skipped")
                continue
            cfg = {**asdict(AnalyzeConfig()), **upgrade_config(cfg)}  # saved in any version's keys
            # final: the latest evaluation on the contexts and the model it trained on (not an --eval_block_size or
            # --eval_model one after it)
            native = [e for e in evals if e.get("context", cfg["block_size"]) == cfg["block_size"]
                      and "eval_model" not in e]
            overlap = os.path.join(path, "overlap.json")  # --mode=overlap's numbers, where it ran
            if evals:
                found.append({"dir": path, "cfg": cfg, "evals": evals, "overlap": json.load(open(overlap))
                              if os.path.exists(overlap) else None, "final": max(
                    enumerate(native), key=lambda pair: (pair[1]["iter"], pair[0]))[1] if native else None})
    return found


def method_label(cfg):
    """What a frontier is made of: the architecture (a transcoder's, with or without the skip path) and loss (with the
    JL form but atanh, and jl_coeff), and the decoder's rate multiple and the ReLU recipe where they differ from the
    defaults; the sparsity setting varies along it."""
    form = {"atanh": "", "power": f"power{cfg['jl_power']:g} ", "welch": "welch "}[cfg["jl_form"]]
    transcoder = cfg["target_site"] not in ("", cfg["site"])
    arch = cfg["arch"] + (" skip transcoder" if cfg["skip"] else " transcoder") * transcoder
    label = arch if cfg["loss"] == "sparsity" else f"{arch} {cfg['loss']} {form}{cfg['jl_coeff']:g}"  # relu hybrid 1000
    lr_enc, lr_dec = cfg["lr_enc"] or cfg["lr"], cfg["lr_dec"] or cfg["lr"]
    if lr_dec != lr_enc:
        label += f", decoder lr {lr_dec / lr_enc:g}x"
    if cfg["arch"] == "relu" and not cfg["l1_by_decoder_norm"]:
        label += ", unit rows"
    if cfg["init_norm"] not in (0, INIT_NORM[cfg["arch"]]):
        label += f", init {cfg['init_norm']:g}"
    return label


def ce_increase(record):
    return record["ce_sae"] - record["ce_clean"] if "ce_sae" in record else float("nan")


def at_l0(points, target):
    """points [(l0, value)] -> value at L0 = target, linear in log L0 between the two nearest points that
    bracket it; None when target is outside the measured range (no extrapolation)."""
    points = sorted((l0, v) for l0, v in points if l0 > 0 and v == v)
    for (l0_a, a), (l0_b, b) in zip(points, points[1:]):
        if l0_a <= target <= l0_b:
            t = (math.log(target) - math.log(l0_a)) / (math.log(l0_b) - math.log(l0_a)) if l0_b > l0_a else 0.0
            return a + t * (b - a)
    return None


PLOT_METRICS = (  # (key, axis label, value of a final evaluation)
    ("fvu", "FVU", lambda r: r["fvu"]),
    ("ce_recovered", "CE loss recovered", lambda r: r.get("ce_recovered", float("nan"))),
    ("ce_increase", "CE increase (nats)", ce_increase),
    ("kl", "KL (nats/token)", lambda r: r.get("kl", float("nan"))),
    ("dead_frac", "dead fraction", lambda r: r["dead_frac"]),
    ("mean_max_cos", "mean max cos", lambda r: r["mean_max_cos"]))


def matched_sparsity_table(runs, target):
    """A markdown table: each method's metrics at L0 = target, interpolated on its frontier (final evaluations)."""
    by_method = {}
    for run in runs:
        by_method.setdefault(method_label(run["cfg"]), []).append(run["final"])
    head = "| method | SAEs | L0 range | " + " | ".join(name for _, name, _ in PLOT_METRICS) + " |"
    lines = [head, "|---|---:|---|" + "---:|" * len(PLOT_METRICS)]
    for method, finals in by_method.items():
        cells = []
        for _, _, get in PLOT_METRICS:
            value = at_l0([(r["l0"], get(r)) for r in finals], target)
            cells.append("—" if value is None else f"{value:.3f}")
        l0s = sorted(r["l0"] for r in finals)
        lines.append(f"| {method} | {len(finals)} | {l0s[0]:.1f}–{l0s[-1]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def frontier_gap_table(runs):
    """Markdown: each hybrid SAE (and each with --mode=overlap's numbers) against its architecture's plain frontier
    (--loss=sparsity, the same architecture) at the SAE's own L0, interpolated as at_l0 does: its metrics and, in
    brackets, the SAE's minus the frontier's (— : its L0 outside the frontier's range); overlap's shared-peak fraction
    among 1,000 of its features."""
    gap_metrics = [m for m in PLOT_METRICS if m[0] in ("fvu", "ce_increase", "kl", "mean_max_cos")]
    lines = ["| run | method | L0 | " + " | ".join(name for _, name, _ in gap_metrics) + " | shared peak |",
             "|---|---|---:|" + "---:|" * (len(gap_metrics) + 1)]
    for run in sorted(runs, key=lambda run: (method_label(run["cfg"]), run["final"]["l0"])):
        cfg, final = run["cfg"], run["final"]
        if cfg["loss"] != "hybrid" and not run.get("overlap"):
            continue
        plain = [r["final"] for r in runs if r["cfg"]["arch"] == cfg["arch"] and r["cfg"]["loss"] == "sparsity"
                 and method_label(r["cfg"]) == cfg["arch"]]
        cells = []
        for _, _, get in gap_metrics:
            base = at_l0([(r["l0"], get(r)) for r in plain], final["l0"])
            cells.append(f"{get(final):.3f}" + ("" if base is None else f" ({get(final) - base:+.3f})"))
        subset = (run.get("overlap") or {}).get("shared_peak_subset")
        shared = "—" if subset is None else f"{subset:.3f}"
        lines.append(f"| {os.path.relpath(run['dir'])} | {method_label(cfg)} | {final['l0']:.1f} | " + " | ".join(cells)
                     + f" | {shared} |")
    return "\n".join(lines) + "\n"


def runs_table(runs):
    """Markdown: every run's final evaluation, one row each, by layer, method and sparsity setting."""
    lines = ["| run | layer | method | setting | L0 | " + " | ".join(name for _, name, _ in PLOT_METRICS) + " |",
             "|---|---:|---|---|---:|" + "---:|" * len(PLOT_METRICS)]
    key = lambda run: (run["cfg"]["layer"], method_label(run["cfg"]), run["final"]["l0"])
    for run in sorted(runs, key=key):
        cells = " | ".join(f"{get(run['final']):.3f}" for _, _, get in PLOT_METRICS)
        lines.append(f"| {os.path.relpath(run['dir'])} | {run['cfg']['layer']} | {method_label(run['cfg'])} | "
                     f"{sparsity_setting(run['cfg'])} | {run['final']['l0']:.1f} | {cells} |")
    return "\n".join(lines) + "\n"


def sparsity_setting(cfg):
    """The key that places an SAE on its frontier: its architecture's sparsity coefficient, or k."""
    if cfg["loss"] == "jl" and cfg["arch"] in SPARSITY_COEFF:
        return "no sparsity term"
    key = ARCH_KEYS[cfg["arch"]][0]
    return f"{key} {cfg[key]:g}"


def model_name(init_from):
    """A model's name for grouping runs: its directory's or Hub id's last part (runs record absolute or relative
    paths, from this machine or another)."""
    return os.path.basename(os.path.normpath(init_from))


def finetune_pairs(runs):
    """The fine-tuning comparison: for each SAE with an --eval_model evaluation, [name, its final evaluation on its
    own model, its latest on the other model, the final evaluation of the SAE trained on that other model with the
    same method and sparsity setting (None if there is none)]."""
    rows = []
    for run in runs:
        on_other = [e for e in run["evals"] if "eval_model" in e]
        if not on_other:
            continue
        other = max(on_other, key=lambda e: e["iter"])
        setting = (method_label(run["cfg"]), sparsity_setting(run["cfg"]))
        tuned = [r for r in runs if model_name(r["cfg"]["init_from"]) == model_name(other["eval_model"])
                 and r["cfg"]["layer"] == run["cfg"]["layer"]
                 and (method_label(r["cfg"]), sparsity_setting(r["cfg"])) == setting]
        rows.append([f"{setting[0]}, {setting[1]}", run["final"], other, tuned[0]["final"] if tuned else None])
    return rows


def finetune_table(pairs):
    """Markdown: each SAE on its own model, on the fine-tune, and the fine-tune's own SAE, with persistence."""
    fmt = lambda r, key: "—" if r is None else f"{ce_increase(r) if key == 'ce_increase' else r[key]:.{1 if key == 'l0' else 3}f}"
    lines = ["| SAE | model clean CE → fine-tune clean CE | FVU: own / on fine-tune / fine-tune's SAE | CE recovered | "
             "CE increase (nats) | KL | L0 | features within 2× (of compared) | silent |", "|---|---|---|---|---|---|---|---:|---:|"]
    for name, own, other, tuned in pairs:
        triple = lambda key: " / ".join(fmt(r, key) for r in (own, other, tuned))
        p = other["persistence"]
        lines.append(f"| {name} | {own['ce_clean']:.3f} → {other['ce_clean']:.3f} | {triple('fvu')} | "
                     f"{triple('ce_recovered')} | {triple('ce_increase')} | {triple('kl')} | {triple('l0')} | "
                     f"{p['within_2x']:.3f} ({p['compared']}) | {p['silent']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_results(cfg):
    """--mode=plot: frontier.png (FVU, CE recovered, CE increase and KL against L0, one line per method, final
    evaluations), layers.png when the runs span several layers (each method's metrics by layer, with the
    zero-ablation cost), positions.png when runs were evaluated on contexts past 128 tokens (metrics by position
    bucket), finetune.png and finetune.md when SAEs were evaluated on another model (--eval_model), runs.md (every
    run's final evaluation), frontier_gap.md when hybrids or overlap numbers are among them, and matched_l0.md, the
    table at L0 = plot_l0. Returns the paths written."""
    pyplot()  # fails here, in one line, before any log is read
    runs = read_run_logs(cfg.plot_runs)
    if not runs:
        raise ValueError(f"--plot_runs={cfg.plot_runs}: no log.jsonl with an evaluation under it")
    os.makedirs(cfg.plot_dir, exist_ok=True)
    trained = [run for run in runs if run["final"]]
    pairs = finetune_pairs(trained)  # every model's SAEs: a fine-tune's own SAEs are compared with the model's
    trained = most_common_model(trained)
    site_runs = most_common_site(trained)
    written = [save_figure(frontier_figure(site_runs, cfg.plot_l0), cfg.plot_dir, "frontier.png")]
    if len({run["cfg"]["layer"] for run in trained}) > 1:
        written.append(save_figure(layers_figure(trained), cfg.plot_dir, "layers.png"))
    long = long_context_evals(runs)
    if long:
        written.append(save_figure(positions_figure(long), cfg.plot_dir, "positions.png"))
    if pairs:
        written.append(save_figure(finetune_figure(pairs), cfg.plot_dir, "finetune.png"))
        written.append(write_table(finetune_table(pairs), cfg.plot_dir, "finetune.md"))
    written.append(write_table(runs_table(trained), cfg.plot_dir, "runs.md"))
    layer, block = site_runs[0]["cfg"]["layer"], site_runs[0]["cfg"]["block_size"]
    if any(run["cfg"]["loss"] == "hybrid" or run.get("overlap") for run in site_runs):
        written.append(write_table("Each run (hybrids, transcoders, those with overlap numbers) against its "
                                   "architecture's plain SAE frontier (loss l1) at its own L0 (in brackets: its value "
                                   "minus the frontier's); shared peak: --mode=overlap."
                                   f" Layer {layer}, {block}-token contexts.\n\n" + frontier_gap_table(site_runs),
                                   cfg.plot_dir, "frontier_gap.md"))
    written.append(write_table(f"At L0 = {cfg.plot_l0:g}, linear in log L0 between each method's two nearest SAEs (— : "
                               f"outside its range); layer {layer}, {block}-token contexts.\n\n"
                               + matched_sparsity_table(site_runs, cfg.plot_l0), cfg.plot_dir, "matched_l0.md"))
    print(f"wrote {', '.join(written)} from {len(runs)} runs")
    return written


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display); without matplotlib, a one-line ValueError."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--mode=plot needs matplotlib: pip install matplotlib") from None
    return plt


def most_common_model(runs):
    """The runs of the model most of them trained on: frontiers and layers are one model's (a fine-tune's SAEs go
    to finetune.png)."""
    models = {}
    for run in runs:
        models.setdefault(model_name(run["cfg"]["init_from"]), []).append(run)
    return max(models.values(), key=len) if models else []


def most_common_site(runs):
    """The runs at the most common (layer, context length): a frontier compares methods at one of them."""
    same_site = {}
    for run in runs:
        same_site.setdefault((run["cfg"]["layer"], run["cfg"]["block_size"]), []).append(run)
    return max(same_site.values(), key=len)


def long_context_evals(runs):
    """[(run, its latest evaluation on the longest contexts with three position buckets or more, i.e. past 128
    tokens)]; between equal ones, the last logged."""
    return [(run, max(reversed(long), key=lambda e: (e["context"], e["iter"]))) for run in runs
            if (long := [e for e in run["evals"] if len(e.get("positions", {})) >= 3])]


def save_figure(fig, plot_dir, name):
    """The figure as plot_dir/name (PNG, 110 dpi), written atomically, and closed. -> the path"""
    path = os.path.join(plot_dir, name)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110), "wb")
    pyplot().close(fig)
    return path


def write_table(text, plot_dir, name):
    """A markdown table (its caption first) as plot_dir/name, written atomically. -> the path"""
    path = os.path.join(plot_dir, name)
    write_atomic(path, lambda f: f.write(text))
    return path


def frontier_figure(site_runs, plot_l0):
    """FVU, CE recovered, CE increase and KL against L0 (log axis): one line per method, colour by method and line
    style by loss; a dotted line at plot_l0."""
    methods, losses = {}, {}
    for run in site_runs:
        methods.setdefault(method_label(run["cfg"]), []).append(run["final"])
        losses[method_label(run["cfg"])] = run["cfg"]["loss"]
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    axes = axes.ravel()
    colors = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors  # 18 distinct hues (tab20 pairs shades)
    line = {"sparsity": "-", "hybrid": "--", "jl": ":"}  # the loss by line style, the method by colour
    for ax, (_, name, get) in zip(axes, PLOT_METRICS[:4]):
        for i, (method, finals) in enumerate(methods.items()):
            finals = sorted((r for r in finals if r["l0"] > 0), key=lambda r: r["l0"])  # log axis: an L0 of 0 is off it
            ax.plot([r["l0"] for r in finals], [get(r) for r in finals], marker="o", ms=4, ls=line[losses[method]],
                    label=method, color=colors[i % len(colors)])
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active features per token)")
        ax.set_ylabel(name)
        ax.axvline(plot_l0, color="#bbb", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    layer, block = site_runs[0]["cfg"]["layer"], site_runs[0]["cfg"]["block_size"]
    fig.suptitle(f"sparsity frontiers: layer {layer}, {block}-token contexts, {len(site_runs)} SAEs")
    return fig


def layers_figure(trained):
    """Each method's metrics and L0 by layer (the mean of its SAEs at a layer), with the zero-ablation cost beside
    the CE increase."""
    by_method = {}
    for run in trained:
        by_method.setdefault(method_label(run["cfg"]), {}).setdefault(run["cfg"]["layer"], []).append(run["final"])
    fig, axes = pyplot().subplots(2, 3, figsize=(19, 9.5))
    axes = axes.ravel()
    l0 = ("l0", "L0 (a fixed coefficient's sparsity moves with the layer)", lambda r: r["l0"])
    for ax, (_, name, get) in zip(axes, (*PLOT_METRICS[:4], l0, PLOT_METRICS[4])):
        for method, per_layer in by_method.items():
            xs = sorted(per_layer)
            ax.plot(xs, [sum(get(r) for r in per_layer[l]) / len(per_layer[l]) for l in xs], "o-", label=method, ms=4)
        ax.set_xlabel("layer")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    zero = {}
    for run in trained:
        if "ce_zero" in run["final"]:
            zero[run["cfg"]["layer"]] = run["final"]["ce_zero"] - run["final"]["ce_clean"]
    if zero:
        axes[2].plot(sorted(zero), [zero[l] for l in sorted(zero)], "k--", label="zero-ablation cost")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle("by layer (final evaluations; the mean where a method has several SAEs at a layer)")
    return fig


def positions_figure(long):
    """FVU, CE recovered and KL by position bucket: one line per (run, evaluation) of long_context_evals."""
    fig, axes = pyplot().subplots(1, 3, figsize=(17, 4.8))
    for run, record in long:
        buckets = list(record["positions"])
        label = (f"{method_label(run['cfg'])}, trained on {run['cfg']['block_size']}-token contexts, "
                 f"L0 {record['l0']:.0f}")
        for ax, key in zip(axes, ("fvu", "ce_recovered", "kl")):
            ax.plot(range(len(buckets)), [record["positions"][b][key] for b in buckets], "o-", label=label, ms=4)
    for ax, name in zip(axes, ("FVU", "CE loss recovered", "KL (nats/token)")):
        ax.set_xticks(range(len(buckets)), buckets)  # the last run's buckets
        ax.set_xlabel("position in the context")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"by position bucket, evaluated on {long[0][1]['context']}-token contexts")
    return fig


def finetune_figure(pairs):
    """Bars of FVU, CE recovered, CE increase and KL for each pair of finetune_pairs: an SAE on its model, on the
    fine-tune, and the fine-tune's own SAE."""
    fig, axes = pyplot().subplots(1, 4, figsize=(19, 4.8))
    kinds = (("trained on the model, on it", 1), ("trained on the model, on its fine-tune", 2),
             ("trained on the fine-tune, on it", 3))
    for ax, (_, name, get) in zip(axes, PLOT_METRICS[:4]):
        for offset, (label, column) in enumerate(kinds):
            xs = [i + (offset - 1) * 0.27 for i, row in enumerate(pairs) if row[column]]
            ax.bar(xs, [get(row[column]) for row in pairs if row[column]], width=0.27, label=label)
        ax.set_xticks(range(len(pairs)), [row[0] for row in pairs], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"fine-tuning: SAEs on their model and on {pairs[0][2]['eval_model']}")
    return fig


# -----------------------------------------------------------------------------
# the command line: python analyze.py --mode=... [config/...py] [--key=value ...]. Each mode has a handler
# run_<mode>(overrides), listed in MODES: it finds what the mode reads (the SAEs a checkpoint or sweep names, or plot's
# logs) and calls the section above that does the work

def read_runs(overrides, new_run_modes=()):
    """The SAEs the command line's overrides name (a sweep's all), found as sae.py finds them, the first's config
    checked for its mode. -> [(cfg, checkpoint)]"""
    resolved = resolve_runs(overrides, AnalyzeConfig, new_run_modes)
    check_analyze_config(resolved[0][0])
    return resolved


def transcoder_set(resolved, name):
    """The runs of one set of a pass over layers: a sweep's SAEs of one setting, named layerNN-<set> (a pass without a
    sweep, layerNN, is the one set "all"); with several sets, --export_set names one."""
    sets = {}
    for cfg, checkpoint in resolved:
        sets.setdefault(os.path.basename(cfg.out_dir).partition("-")[2] or "all", []).append((cfg, checkpoint))
    if len(sets) > 1 and name not in sets:
        raise ValueError(f"{os.path.dirname(resolved[0][0].out_dir)} holds {len(sets)} sets of transcoders; pick one "
                         f"with --export_set: {', '.join(sets)}")
    return sets[name] if len(sets) > 1 else resolved


def run_export(overrides):
    """--mode=export: one SAE to SAELens; to circuit-tracer, a transcoder per layer (one set of a pass over layers) or
    one cross-layer transcoder."""
    resolved = read_runs(overrides)
    cfg = resolved[0][0]
    if cfg.export_format == "saelens":
        cfg, checkpoint = one_run(resolved)
        return export_saelens(checkpoint, cfg.export_dir)
    if any(c.cross_layer for c, _ in resolved):  # a sweep of CLTs: each is a whole replacement, exported alone
        cfg, checkpoint = one_run(resolved, "cross-layer transcoder")
        return export_circuit_tracer_clt(cfg, checkpoint, cfg.export_dir)
    return export_circuit_tracer(transcoder_set(resolved, cfg.export_set), cfg.export_dir)


def run_steer(overrides):
    cfg, checkpoint = one_run(read_runs(overrides))
    return steer_demo(cfg, checkpoint)


def run_dashboard(overrides):
    cfg, checkpoint = one_run(read_runs(overrides))
    return write_dashboard(cfg, checkpoint)


def run_plot(overrides):
    """--mode=plot reads runs' logs, not a checkpoint: its config is the defaults and the flags."""
    return plot_results(replace(AnalyzeConfig(), **overrides))


def run_finetune(overrides):
    resolved = read_runs(overrides, new_run_modes=("finetune",))  # it starts a run: no checkpoint to read
    if len(resolved) > 1:
        raise ValueError("--mode=finetune tunes one model: give each key one value")
    cfg = resolved[0][0]
    ctx = start_process(cfg, overrides, resolved)  # as sae.py starts: the device and dtype, the config checked, one process
    return finetune_lora(cfg, ctx.device, ctx.autocast)


def run_persistence(overrides):
    return score_on_another_model(read_runs(overrides), overrides)  # start_process echoes the overrides


def run_overlap(overrides):
    return overlap_of_runs(read_runs(overrides))


# analyze.py's modes, each read by its handler; sae.py's own are train and cache
MODES = {"export": run_export, "steer": run_steer, "dashboard": run_dashboard, "plot": run_plot,
         "finetune": run_finetune, "persistence": run_persistence, "overlap": run_overlap}


def main(argv):
    overrides = parse_overrides(AnalyzeConfig(), argv)
    mode = overrides.get("mode")
    if mode not in MODES:
        raise ValueError(f"--mode={mode}: analyze.py's modes are {', '.join(MODES)}; sae.py trains and caches")
    return MODES[mode](overrides)


if __name__ == "__main__":
    sys.exit(cli(main, sys.argv[1:]))
