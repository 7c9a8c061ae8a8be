"""analyze.py's tests: export (loaded by SAELens's documented forward), steering, dashboards, plots, the LoRA
fine-tune and feature persistence. The command: `TRITON_INTERPRET=1 python -m pytest -q` (all test files)."""
import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import analyze
import sae
import sae_kernels
from sae import GPT, GPTConfig, SAE, TrainConfig
from conftest import cpu_env, HERE, hf_gpt2, hf_site_activations, load_ckpt, read_shard_numpy, run_sae, TINY, \
    TINY_GPT_RUN, TINY_LLAMA_RUN, token_ids, transformers


# -----------------------------------------------------------------------------
# export to SAELens's format (and TransformerLens's hooks), steering

def saelens_forward(cfg, w, x):
    """SAELens 6's inference forward for the architectures we export, as its sae_lens/saes/*.py compute it:
    standard relu(pre); topk: the k largest pre, relu'd, scattered; jumprelu: relu(pre) * (pre > threshold)."""
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]  # apply_b_dec_to_input
    if cfg["architecture"] == "topk":
        top = pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    elif cfg["architecture"] == "jumprelu":
        f = pre.relu() * (pre > w["threshold"])
    else:
        f = pre.relu()
    return f @ w["W_dec"] + w["b_dec"], f


@pytest.mark.parametrize("name,architecture", [("relu-l1_by_decoder_normTrue", "standard"), ("topk", "topk"),
                                               ("batchtopk", "jumprelu"), ("matryoshka", "jumprelu"),
                                               ("jumprelu", "jumprelu"), ("vae", "standard")])
def test_export_of_each_architecture_is_saelens_forward(arch_sweep, synthetic, name, architecture, tmp_path):
    from safetensors.torch import load_file
    r = run_sae("--mode=export", f"--ckpt={arch_sweep / name / 'ckpt.pt'}", f"--export_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    cfg, w = json.load(open(tmp_path / "cfg.json")), load_file(tmp_path / "sae_weights.safetensors")
    assert cfg["architecture"] == architecture and (cfg.get("k") == 4) == (architecture == "topk")
    assert sorted(w) == sorted(["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if architecture == "jumprelu" else []))
    ckpt = load_ckpt(arch_sweep / name)
    model, _, s = analyze.load_sae(ckpt)
    x = torch.from_numpy(np.load(synthetic[0])[:300])  # raw activations, as SAELens would read them
    x_hat_ref, f_ref = saelens_forward(cfg, w, x)
    with torch.no_grad():
        x_hat, f = model(x * s)[:2]  # ours on the scaled activations, norms folded by load_sae
    assert (f > 0).sum() > 0
    torch.testing.assert_close(f, f_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x_hat / s, x_hat_ref, atol=1e-4, rtol=1e-4)
    if name.startswith("relu"):  # the free norms are folded: unit rows in the export, up to the scale
        torch.testing.assert_close(w["W_dec"].norm(dim=1) * s, torch.ones(192), atol=1e-5, rtol=1e-5)


def test_export_of_fsq_is_refused_in_one_line(arch_sweep, tmp_path):
    r = run_sae("--mode=export", f"--ckpt={arch_sweep / 'fsq' / 'ckpt.pt'}", f"--export_dir={tmp_path}")
    assert r.returncode == 1 and r.stderr.strip().startswith("error: --arch=fsq has no SAELens format")
    assert len(r.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)


@pytest.fixture(scope="module")
def tiny_run(tiny_shards, tmp_path_factory):
    """A short SAE run on a tiny random GPT-2 (layer 1, mlp_in): its out_dir."""
    out = tmp_path_factory.mktemp("tiny_run")
    r = run_sae(*TINY_GPT_RUN, f"--data_dir={tiny_shards}", f"--out_dir={out}", "--max_iters=60",
                "--eval_interval=60", "--resample_iters=()")
    assert r.returncode == 0, r.stderr
    return out


def test_export_matches_saelens_format_and_folds_the_scale(tiny_run, tmp_path):
    from safetensors.torch import load_file
    r = run_sae("--mode=export", f"--out_dir={tiny_run}", f"--export_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.load(open(tmp_path / "cfg.json"))
    # the fields and values of ../shared/notes/saelens-format.md for a standard ReLU SAE
    assert {k: cfg[k] for k in ("d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations",
                                "reshape_activations", "architecture")} == {
        "d_in": 32, "d_sae": 96, "dtype": "float32", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none", "architecture": "standard"}
    assert cfg["metadata"]["hook_name"] == "blocks.1.ln2.hook_normalized" and cfg["metadata"]["context_size"] == 32
    weights = load_file(tmp_path / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {"W_enc": (32, 96), "b_enc": (96,), "W_dec": (96, 32),
                                                               "b_dec": (32,)}
    assert all(v.dtype == torch.float32 for v in weights.values())
    # SAELens's forward on raw activations equals ours on scaled ones, scaled back
    ckpt = load_ckpt(tiny_run)
    model, _, s = analyze.load_sae(ckpt)
    x = torch.randn(50, 32) * 3
    f_ref = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    x_hat_ref = f_ref @ weights["W_dec"] + weights["b_dec"]
    with torch.no_grad():
        weights = [ckpt["sae"][k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")]
        x_hat, f = sae_kernels.encode_relu_decode_ref(x * s, *weights)[:2]
    assert ckpt["config"]["l1_by_decoder_norm"]  # the default: free rows, exported as unit rows with f scaled by them
    f = f * ckpt["sae"]["W_dec"].norm(dim=1)  # (50, 96) * (96,)
    torch.testing.assert_close(f, f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_hat / s, x_hat_ref, atol=1e-5, rtol=1e-5)


def captured_input(module, fn):
    """The first positional input that `module` receives while fn() runs."""
    seen = {}
    def keep(module, args):  # returns None: the input goes on unchanged
        seen.setdefault("x", args[0].clone())
    handle = module.register_forward_pre_hook(keep)
    fn()
    handle.remove()
    return seen["x"]


STEER_READERS = {  # (family, site) -> the module whose input is that site's activation, edited or not
    ("gpt2", "mlp_in"): "h.1.mlp.c_fc", ("gpt2", "resid_post"): "h.2.ln_1", ("gpt2", "mlp_hidden"): "h.1.mlp.c_proj",
    ("llama", "mlp_in"): "model.layers.1.mlp.up_proj", ("llama", "resid_post"): "model.layers.2.input_layernorm",
    ("llama", "mlp_hidden"): "model.layers.1.mlp.down_proj"}


@pytest.mark.parametrize("family,site", list(STEER_READERS))
def test_steering_moves_the_site_by_scale_times_direction(family, site):
    torch.manual_seed(0)
    model = (GPT(GPTConfig(n_layer=3, n_head=2, n_embd=24, vocab_size=60, block_size=16)) if family == "gpt2" else
             sae.Llama(sae.LlamaConfig(vocab_size=60, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=12))).eval()
    width = sae.site_width(model.config, site)
    sae_model, act_scale = SAE(width, 40), 2.5
    idx = torch.randint(0, 60, (2, 9))
    module = dict(model.named_modules())[STEER_READERS[family, site]]
    with torch.no_grad():
        clean_logits = model(idx)
        clean = captured_input(module, lambda: model(idx))
        with analyze.steer(model, sae_model, {7: 3.0, 11: -1.5}, 1, site, act_scale):
            steered = captured_input(module, lambda: model(idx))
        with analyze.steer(model, sae_model, {7: 0.0}, 1, site, act_scale):
            zero_logits = model(idx)
        after = model(idx)
    direction = (3.0 * sae_model.W_dec[7] - 1.5 * sae_model.W_dec[11]).detach() / act_scale
    torch.testing.assert_close(steered - clean, direction.expand_as(clean), atol=1e-5, rtol=0)
    assert torch.equal(zero_logits, clean_logits)  # scale 0 changes nothing
    assert torch.equal(after, clean_logits) and not model.blocks[1]._forward_pre_hooks  # the model is as it was


def test_steering_ablate_and_clamp_change_the_feature():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=24, vocab_size=60, block_size=16)).eval()
    sae_model = SAE(24, 40)
    idx = torch.randint(0, 60, (1, 9))
    reader = model.h[0].mlp.c_fc
    with torch.no_grad():
        clean = captured_input(reader, lambda: model(idx))
        f_clean = sae_model(clean.reshape(-1, 24))[1]
        feature = int(f_clean.sum(dim=0).argmax())  # a feature that fires here
        with analyze.steer(model, sae_model, {feature: 0.0}, 0, "mlp_in", mode="ablate"):
            ablated = captured_input(reader, lambda: model(idx))
    # the activation moved by -f * W_dec[feature] at each position: exactly what ablating it in the SAE removes
    expected = clean - f_clean[:, feature].view(1, -1, 1) * sae_model.W_dec[feature]
    torch.testing.assert_close(ablated, expected, atol=1e-5, rtol=0)


def test_steer_mode_prints_both_continuations(tiny_run, enc):
    r = run_sae("--mode=steer", f"--out_dir={tiny_run}", "--feature=3", "--scale=50.0", "--prompt=Hello world",
                "--max_new_tokens=8")
    assert r.returncode == 0, r.stderr
    assert "--- unsteered\nHello world" in r.stdout and "--- feature 3 x 50\nHello world" in r.stdout
    r = run_sae("--mode=steer", f"--out_dir={tiny_run}", "--feature=999")
    assert r.returncode == 1 and "--feature=999: the SAE has features 0..95" in r.stderr


def test_a_batchtopk_sae_on_the_model_evaluates_steers_and_makes_a_dashboard(tiny_shards, enc, tmp_path):
    # through the model: CE and KL with its JumpReLU-threshold inference code spliced in, then the helpers
    r = run_sae(*TINY_GPT_RUN, f"--data_dir={tiny_shards}", f"--out_dir={tmp_path}", "--arch=batchtopk", "--k=8",
                "--max_iters=60", "--eval_interval=60", "--loss=l1")
    assert r.returncode == 0, r.stderr
    final = json.loads(open(tmp_path / "log.jsonl").readlines()[-1])
    assert np.isfinite(final["ce_sae"]) and np.isfinite(final["kl"]) and 0 < final["l0"] < 96
    r = run_sae("--mode=steer", f"--out_dir={tmp_path}", "--feature=3", "--scale=50.0", "--prompt=Hello world",
                "--max_new_tokens=8")
    assert r.returncode == 0 and "--- feature 3 x 50\nHello world" in r.stdout, r.stderr
    r = run_sae("--mode=dashboard", f"--out_dir={tmp_path}", "--features=top_freq:3", "--dashboard_tokens=640")
    assert r.returncode == 0 and (tmp_path / "dashboard.html").stat().st_size > 1000, r.stderr


def tl_normalized(x, family, eps):
    """TransformerLens's hook_normalized, computed here from the norm's input: LayerNorm (GPT-2) or RMSNorm."""
    x = x.double() - (x.double().mean(-1, keepdim=True) if family == "gpt2" else 0)  # RMSNorm does not centre
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def normalized_and_mlp_in(family, tiny_llama, tmp_path):
    """A saved model of the family whose layer-1 norm has gains and biases far from 1 and 0 (as a trained one's), and
    on random tokens: (its directory, the norm, TransformerLens's hook_normalized (N, 48) there, our mlp_in (N, 48))."""
    if family == "gpt2":
        hf = hf_gpt2(**TINY)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "ln_" in name:
                    p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-1, 1)
        hf.save_pretrained(tmp_path / "model")
        saved, norm = tmp_path / "model", hf.transformer.h[1].ln_2
    elif family == "gemma2":  # its MLP's pre-norm is pre_feedforward_layernorm, its gains 1 + weight
        config = transformers.Gemma2Config(vocab_size=301, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                           max_position_embeddings=64, rms_norm_eps=1e-5)
        torch.manual_seed(0)
        hf = transformers.Gemma2ForCausalLM(config).eval()
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.uniform_(-0.5, 0.5)  # gains 0.5 to 1.5
        hf.save_pretrained(tmp_path / "model")
        saved, norm = tmp_path / "model", hf.model.layers[1].pre_feedforward_layernorm
    else:
        saved, hf = tiny_llama
        norm = hf.model.layers[1].post_attention_layernorm
    seen = {}
    handle = norm.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        hf(torch.randint(0, 300, (2, 12)))
    handle.remove()
    return saved, norm, tl_normalized(seen["x"], family, 1e-5).reshape(-1, 48), seen["y"].reshape(-1, 48)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_export_folds_the_norm_for_transformerlens(family, tiny_llama, tmp_path):
    from safetensors.torch import load_file
    from dataclasses import asdict
    # n: what TransformerLens's hook holds; mlp_in: what our SAE read
    saved, norm, n, mlp_in = normalized_and_mlp_in(family, tiny_llama, tmp_path)
    d = 48
    g = torch.Generator().manual_seed(1)
    state = {"W_enc": torch.randn(d, 40, generator=g) / 7, "b_enc": torch.randn(40, generator=g) / 3,
             "W_dec": torch.nn.functional.normalize(torch.randn(40, d, generator=g), dim=1), "b_dec": torch.randn(d, generator=g)}
    checkpoint = {"config": asdict(TrainConfig(init_from=str(saved), layer=1, site="mlp_in", block_size=32)), "act_scale": 2.5,
                  "sae": state, "iter_num": 7}
    sae_cfg = analyze.export_saelens(checkpoint, str(tmp_path / "export"))
    assert sae_cfg["metadata"]["hook_name"] == "blocks.1.ln2.hook_normalized"
    w = {k: v.double() for k, v in load_file(tmp_path / "export" / "sae_weights.safetensors").items()}
    f_tl = torch.relu((n - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # SAELens's standard SAE on TransformerLens's hook
    x_hat, f = sae_kernels.encode_relu_decode_ref(mlp_in * 2.5, *state.values())[:2]
    torch.testing.assert_close(f_tl.float(), f, atol=1e-4, rtol=1e-4)
    bias = norm.bias.detach() if family == "gpt2" else 0  # and it writes n_hat = (x_hat - bias) / gain
    gain = norm.weight.detach() + (1 if family == "gemma2" else 0)
    torch.testing.assert_close((f_tl @ w["W_dec"] + w["b_dec"]).float(), (x_hat / 2.5 - bias) / gain,
                               atol=1e-4, rtol=1e-4)


# --- transcoders: export to SAELens's transcoder classes, steering at the target

def saelens_transcoder_forward(cfg, w, x):
    """SAELens 6.54's transcoder forward, as sae_lens/saes/transcoder.py computes it: no input bias (its
    process_sae_in skips b_dec), pre = x @ W_enc + b_enc, relu (jumprelu_*: times 1[pre > threshold]),
    y = f @ W_dec + b_dec, + x @ W_skip^T for the skip_* classes."""
    pre = x @ w["W_enc"] + w["b_enc"]
    f = pre.relu() * (pre > w["threshold"]) if cfg["architecture"].startswith("jumprelu") else pre.relu()
    y = f @ w["W_dec"] + w["b_dec"]
    return (y + x @ w["W_skip"].T if "skip" in cfg["architecture"] else y), f


def exported_transcoder(family, arch, skip, tiny_llama, tmp_path):
    """A random transcoder mlp_in -> mlp_out (layer 1 of a saved model of the family) exported to tmp_path/export:
    -> (its cfg.json, TransformerLens's hook_normalized n (N, 48), our features f and prediction of mlp_out in model
    units from the model's own mlp_in)."""
    from dataclasses import asdict
    saved, norm, n, mlp_in = normalized_and_mlp_in(family, tiny_llama, tmp_path)
    d, d_sae, s_in, s_out = 48, 40, 2.5, 0.4
    torch.manual_seed(1)
    ours = SAE(d, d_sae, arch=arch, d_out=d, skip=skip)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
        if arch == "jumprelu":
            ours.threshold.uniform_(0, 0.5)
    state = ours.state_dict()
    if arch == "batchtopk":
        state["threshold"] = torch.tensor(0.3, dtype=torch.float64)
        ours.threshold.fill_(0.3)
    config = TrainConfig(init_from=str(saved), layer=1, site="mlp_in", target_site="mlp_out", block_size=32, arch=arch,
                         skip=skip, l1_by_decoder_norm=False, d_sae=d_sae)
    checkpoint = {"config": asdict(config), "act_scale": s_in, "target_scale": s_out, "sae": state, "iter_num": 7}
    cfg = analyze.export_saelens(checkpoint, str(tmp_path / "export"))
    with torch.no_grad():
        y_hat, f = ours.eval()(mlp_in * s_in)[:2]
    assert (f > 0).any() and (f == 0).any()
    return cfg, n, f, y_hat / s_out


TRANSCODER_KINDS = [("relu", True), ("relu", False), ("jumprelu", True), ("batchtopk", False)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("arch,skip", TRANSCODER_KINDS)
def test_transcoder_export_is_saelens_transcoder_on_transformerlens_hooks(family, arch, skip, tiny_llama, tmp_path):
    """A transcoder mlp_in -> mlp_out exported: SAELens's transcoder class of its kind, reading TransformerLens's
    hook_normalized (the norm's gain and bias folded, b_in into b_enc, both scales) gives our features and our
    prediction of mlp_out in model units."""
    from safetensors.torch import load_file
    cfg, n, f, y_hat = exported_transcoder(family, arch, skip, tiny_llama, tmp_path)
    d, d_sae = 48, 40
    assert cfg["architecture"] == {("relu", False): "transcoder", ("relu", True): "skip_transcoder",
                                   ("jumprelu", True): "jumprelu_skip_transcoder",
                                   ("batchtopk", False): "jumprelu_transcoder"}[arch, skip]
    assert (cfg["d_in"], cfg["d_out"], cfg["d_sae"], cfg["apply_b_dec_to_input"]) == (d, d, d_sae, False)
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"]) == ("blocks.1.ln2.hook_normalized",
                                                                                 "blocks.1.hook_mlp_out")
    w = {k: v.double() for k, v in load_file(tmp_path / "export" / "sae_weights.safetensors").items()}
    assert ("W_skip" in w) == skip and "b_in" not in w and w["W_dec"].shape == (d_sae, d)
    y_tl, f_tl = saelens_transcoder_forward(cfg, w, n)
    torch.testing.assert_close(f_tl.float(), f, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y_tl.float(), y_hat, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch,skip", TRANSCODER_KINDS)
def test_transcoder_export_loads_in_saelens_itself(arch, skip, tiny_llama, tmp_path):
    """The same exports loaded by SAELens itself (`SAE.load_from_disk` picks the class from cfg.json): its encode and
    forward on TransformerLens's hook_normalized give our features and prediction. SAELens is not a dependency (nor
    installed in CI, where this skips): `pip install sae-lens==6.54.12` beside the project's packages to run it."""
    sae_lens = pytest.importorskip("sae_lens")
    cfg, n, f, y_hat = exported_transcoder("llama", arch, skip, tiny_llama, tmp_path)
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path / "export"), device="cpu")
    assert type(loaded).__name__ == {"transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder",
                                     "jumprelu_transcoder": "JumpReLUTranscoder",
                                     "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder"}[cfg["architecture"]]
    with torch.no_grad():
        f_theirs, y_theirs = loaded.encode(n.float()), loaded(n.float())
    torch.testing.assert_close(f_theirs, f, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y_theirs, y_hat, atol=1e-4, rtol=1e-4)


def test_topk_transcoder_export_is_refused_in_one_line(tmp_path):
    from dataclasses import asdict
    state = SAE(8, 16, arch="topk", d_out=8).state_dict()
    checkpoint = {"config": asdict(TrainConfig(acts="x.npy", arch="topk", target_site="mlp_out", d_sae=16)),
                  "act_scale": 1.0, "sae": state, "iter_num": 1}
    with pytest.raises(ValueError, match=r"^--arch=topk transcoder has no SAELens format \(SAELens 6.54 has no TopK "
                                         r"transcoder\); export supports relu, vae, jumprelu, batchtopk, matryoshka$"):
        analyze.export_saelens(checkpoint, str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()

# --- transcoders: export to circuit-tracer's transcoder_set (a transcoder per layer), its forward computed here and
# circuit-tracer itself as the client

@pytest.fixture(scope="module")
def three_layer_llama(tmp_path_factory):
    """A random 3-layer Llama saved by transformers, with norm gains far from 1: (its directory, our model of it)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=301, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # a gain folded where it must not be would show
    out = tmp_path_factory.mktemp("three_layer_llama")
    hf.save_pretrained(out)
    return out, sae.load_model(str(out))


def random_transcoder(cfg, d, seed):
    """Our transcoder of cfg's kind with every parameter random (b_in, b_enc, b_dec, W_skip; free decoder norms for
    relu; thresholds, some of jumprelu's negative), as SAE.from_config builds it from a checkpoint."""
    torch.manual_seed(seed)
    ours = SAE.from_config((d, d), cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
        if cfg.arch == "jumprelu":
            ours.threshold.uniform_(-0.3, 1.0)  # a negative threshold: ours still relus, circuit-tracer's JumpReLU not
        if cfg.arch == "batchtopk":
            ours.threshold.fill_(0.4)
    return ours.eval()


def write_transcoder_set(run, model_dir, layers, archs, skips, d=48, d_sae=40, site="mlp_in", scales=(2.5, 0.4),
                         make=random_transcoder):
    """run/layer{i}/ckpt.pt for each of layers and run/sweep.json, the layout of a sweep (sae.save_sweep_checkpoint);
    scales: (s_in, s_out) for all, or a list of them by position -> [(layer, our transcoder)]."""
    from dataclasses import asdict
    runs, ours = [], []
    for j, (i, arch, skip) in enumerate(zip(layers, archs, skips)):
        out = run / (f"layer{i}" if layers.count(i) == 1 else f"layer{i}_{j}")
        out.mkdir(parents=True, exist_ok=True)
        cfg = TrainConfig(init_from=str(model_dir), out_dir=str(out), layer=i, site=site, target_site="mlp_out",
                          arch=arch, skip=skip, d_sae=d_sae, block_size=32)
        tc = make(cfg, d, seed=j)
        s_in, s_out = scales[j] if isinstance(scales, list) else scales
        runs.append((cfg, {"config": asdict(cfg), "act_scale": s_in, "target_scale": s_out,
                           "sae": tc.state_dict(), "iter_num": 7}))
        ours.append((i, tc))
    sae.save_sweep_checkpoint(str(run), runs, 7)
    return ours


def read_flat_yaml(path):
    """config.yaml's flat `key: "value"` lines (independent of pyyaml, which the project does not have)."""
    return {k: json.loads(v) for k, v in (line.split(": ", 1) for line in Path(path).read_text().splitlines())}


def circuit_tracer_forward(w, x):
    """circuit-tracer 0.5.0's SingleLayerTranscoder on x (N, d_model), as transcoder/single_layer_transcoder.py computes
    it: pre = F.linear(x, W_enc, b_enc); JumpReLU pre * (pre > threshold) with a threshold, else ReLU;
    y = f @ W_dec + b_dec (+ x @ W_skip^T)."""
    pre = x @ w["W_enc"].T + w["b_enc"]                    # (N, d_model) @ (d_model, d_sae)
    f = pre * (pre > w["activation_function.threshold"]) if "activation_function.threshold" in w else pre.relu()
    y = f @ w["W_dec"] + w["b_dec"]                         # (N, d_sae) @ (d_sae, d_model)
    return (y + x @ w["W_skip"].T if "W_skip" in w else y), f


CT_SETS = {"relu": (("relu",) * 3, (False,) * 3), "relu_skip": (("relu",) * 3, (True,) * 3),
           "jumprelu_skip": (("jumprelu",) * 3, (True,) * 3), "batchtopk": (("batchtopk",) * 3, (False,) * 3),
           "mixed": (("jumprelu", "relu", "batchtopk"), (True, False, False))}


@pytest.mark.parametrize("site", ["mlp_in", "resid_mid"])
@pytest.mark.parametrize("kind", list(CT_SETS))
def test_circuit_tracer_export_is_its_transcoder_forward_on_each_layer(kind, site, three_layer_llama, tmp_path):
    """analyze.py --mode=export --export_format=circuit_tracer on a sweep of a transcoder per layer: config.yaml's keys
    and hooks, exactly the keys its strict loader takes, and circuit-tracer's forward (computed here from the files)
    on the model's own activation at the input hook gives our features and our prediction of mlp_out in model units.
    mixed: a layer without a skip path gets W_skip = 0 (its set has one on every layer or none)."""
    from safetensors.torch import load_file
    model_dir, model = three_layer_llama
    archs, skips = CT_SETS[kind]
    ours = write_transcoder_set(tmp_path / "run", model_dir, [2, 0, 1], [archs[i] for i in (2, 0, 1)],
                                [skips[i] for i in (2, 0, 1)], site=site)  # sweep order need not be layer order
    r = run_sae("--mode=export", "--export_format=circuit_tracer", f"--out_dir={tmp_path / 'run'}",
                f"--export_dir={tmp_path / 'ct'}")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "ct")) == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors",
                                                  "layer_2.safetensors"]
    hooks = {"mlp_in": ("mlp.hook_in", "mlp.hook_out"), "resid_mid": ("hook_resid_mid", "hook_mlp_out")}[site]
    assert read_flat_yaml(tmp_path / "ct" / "config.yaml") == {
        "model_kind": "transcoder_set", "model_name": str(model_dir), "feature_input_hook": hooks[0],
        "feature_output_hook": hooks[1], "scan": "gpt_sae/ct"}
    idx = torch.randint(0, 301, (2, 16), generator=torch.Generator().manual_seed(0))
    for layer, tc in ours:
        w = {k: v.double() for k, v in load_file(tmp_path / "ct" / f"layer_{layer}.safetensors").items()}
        jump = archs[layer] != "relu"
        assert sorted(w) == sorted(["W_enc", "W_dec", "b_enc", "b_dec"] + ["W_skip"] * any(skips) +
                                   ["activation_function.threshold"] * jump)
        assert (w["W_enc"].shape, w["W_dec"].shape, w["b_enc"].shape, w["b_dec"].shape) == ((40, 48), (40, 48), (40,),
                                                                                            (48,))
        if not skips[layer] and any(skips):
            assert not w["W_skip"].any()
        with torch.no_grad():
            acts = model.harvest(idx, layer, (site, "mlp_out")).reshape(-1, 96)  # [x_in | y] (N, 48 + 48)
            y_hat, f = tc(acts[:, :48] * 2.5)[:2]  # ours reads s_in x and predicts s_out y
        assert (f > 0).any() and (f == 0).any()
        y_ct, f_ct = circuit_tracer_forward(w, acts[:, :48].double())
        torch.testing.assert_close(f_ct.float(), f, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y_ct.float(), y_hat / 0.4, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def three_layer_families(tmp_path_factory):
    """Random 3-layer Qwen3, Gemma 2 and Gemma 3 of width 48 saved by transformers, norm gains far from 1: name ->
    (its directory, our model of it)."""
    shape = dict(vocab_size=301, hidden_size=48, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rms_norm_eps=1e-5)
    models = {}
    for name, config_class, model_class, offset in (
            ("qwen3", transformers.Qwen3Config, transformers.Qwen3ForCausalLM, 1.0),
            ("gemma2", transformers.Gemma2Config, transformers.Gemma2ForCausalLM, 0.0),  # gains 1 + w
            ("gemma3", transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, 0.0)):
        torch.manual_seed(0)
        hf = model_class(config_class(**shape)).eval()
        with torch.no_grad():
            for key, p in hf.named_parameters():
                if "norm" in key:
                    p.uniform_(offset - 0.5, offset + 0.5)
        out = tmp_path_factory.mktemp(name)
        hf.save_pretrained(out)
        models[name] = out, sae.load_model(str(out))
    return models


@pytest.mark.parametrize("family,site,hooks", [
    ("gemma2", "mlp_in", ("ln2.hook_normalized", "hook_mlp_out")),  # no mlp.hook_in: the norm's gain folded
    ("gemma2", "resid_mid", ("hook_resid_mid", "hook_mlp_out")),
    ("gemma3", "mlp_in", ("mlp.hook_in", "hook_mlp_out")),
    ("qwen3", "mlp_in", ("mlp.hook_in", "mlp.hook_out"))])
def test_circuit_tracer_export_names_each_familys_hooks(family, site, hooks, three_layer_families, tmp_path):
    """circuit-tracer's nnsight mapping names other hooks for Gemma and Qwen3 (CIRCUIT_TRACER_ARCH_HOOKS): the export
    writes them, and its forward on the activation at that hook (Gemma 2's ln2.hook_normalized computed here from
    resid_mid: the norm's output before its gain) gives our features and prediction, skip paths included."""
    from safetensors.torch import load_file
    model_dir, model = three_layer_families[family]
    ours = write_transcoder_set(tmp_path / "run", model_dir, [0, 1, 2], ["relu"] * 3, [True] * 3, site=site)
    r = run_sae("--mode=export", "--export_format=circuit_tracer", f"--out_dir={tmp_path / 'run'}",
                f"--export_dir={tmp_path / 'ct'}")
    assert r.returncode == 0, r.stderr
    config = read_flat_yaml(tmp_path / "ct" / "config.yaml")
    assert (config["feature_input_hook"], config["feature_output_hook"]) == hooks
    idx = torch.randint(0, 301, (2, 16), generator=torch.Generator().manual_seed(0))
    for layer, tc in ours:
        w = {k: v.double() for k, v in load_file(tmp_path / "ct" / f"layer_{layer}.safetensors").items()}
        with torch.no_grad():
            acts = model.harvest(idx, layer, ("resid_mid", "mlp_in", "mlp_out")).reshape(-1, 144).double()
        x = acts[:, :48] if site == "resid_mid" else acts[:, 48:96]  # what our transcoder read
        with torch.no_grad():
            y_hat, f = tc(x.float() * 2.5)[:2]
        x_ct = tl_normalized(acts[:, :48], "rms", 1e-5) if hooks[0] == "ln2.hook_normalized" else x
        y_ct, f_ct = circuit_tracer_forward(w, x_ct)
        assert (f > 0).any()
        torch.testing.assert_close(f_ct.float(), f, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y_ct.float(), y_hat / 0.4, atol=1e-4, rtol=1e-4)


def test_circuit_tracer_export_refuses_hooks_a_family_lacks(three_layer_families, tmp_path):
    """Qwen3's mapping names no hook_resid_mid: a resid_mid transcoder set on it is refused in one line."""
    model_dir, _ = three_layer_families["qwen3"]
    write_transcoder_set(tmp_path / "run", model_dir, [0, 1, 2], ["relu"] * 3, [False] * 3, site="resid_mid")
    r = run_sae("--mode=export", "--export_format=circuit_tracer", f"--out_dir={tmp_path / 'run'}",
                f"--export_dir={tmp_path / 'ct'}")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "circuit-tracer names no hooks for resid_mid -> mlp_out" in lines[0], r.stderr
    assert not (tmp_path / "ct").exists()


def write_clt(run, model_dir, arch, skip=False, s_in=(2.5, 1.5, 0.8), s_out=(0.4, 0.7, 1.2), d=48, d_sae=40):
    """run/ckpt.pt of a random cross-layer transcoder over the 3 layers (every parameter random, jumprelu thresholds
    some negative, batchtopk's estimated, relu with free decoder norms), as sae.py saves one -> our CLT"""
    from dataclasses import asdict
    run.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(init_from=str(model_dir), out_dir=str(run), layers="all", cross_layer=True, site="mlp_in",
                      target_site="mlp_out", arch=arch, skip=skip, d_sae=d_sae, block_size=32)
    torch.manual_seed(5)
    clt = sae.CrossLayerTranscoder.from_config((d, d), cfg, 3)
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_(0, 0.3)
        if arch == "jumprelu":
            clt.threshold.uniform_(-0.3, 1.0)
        if arch == "batchtopk":
            clt.threshold.copy_(torch.tensor([0.4, 0.2, 0.5], dtype=torch.float64))
    sae.save_checkpoint(str(run / "ckpt.pt"), {"config": asdict(cfg), "act_scale": list(s_in), "target_scale": list(s_out),
                                               "sae": clt.state_dict(), "iter_num": 7})
    return clt.eval()


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_circuit_tracer_export_of_a_cross_layer_transcoder_is_its_clt_forward(arch, three_layer_llama, tmp_path):
    """A cross-layer transcoder exported as circuit-tracer's cross_layer_transcoder: its files' keys and shapes, and its
    forward computed here from them (target t = sum over l <= t of f_l @ W_dec_l[:, t - l] + b_dec_t, f_l its ReLU or
    JumpReLU of x_l @ W_enc_l^T + b_enc_l) on the model's mlp_in of every layer equals our CLT's prediction of every
    layer's mlp_out in model units (ours reads s_in,l x_l and predicts s_out,t y_t, scales per layer)."""
    from safetensors.torch import load_file
    model_dir, model = three_layer_llama
    s_in, s_out = (2.5, 1.5, 0.8), (0.4, 0.7, 1.2)
    clt = write_clt(tmp_path / "run", model_dir, arch, s_in=s_in, s_out=s_out)
    r = run_sae("--mode=export", "--export_format=circuit_tracer", f"--out_dir={tmp_path / 'run'}",
                f"--export_dir={tmp_path / 'ct'}")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "ct")) == sorted(["config.yaml"] + [f"W_{w}_{l}.safetensors"
                                                                            for w in ("dec", "enc") for l in range(3)])
    assert read_flat_yaml(tmp_path / "ct" / "config.yaml") == {
        "model_kind": "cross_layer_transcoder", "model_name": str(model_dir), "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out", "scan": "gpt_sae/ct"}
    enc = [{k: v.double() for k, v in load_file(tmp_path / "ct" / f"W_enc_{l}.safetensors").items()} for l in range(3)]
    dec = [load_file(tmp_path / "ct" / f"W_dec_{l}.safetensors")[f"W_dec_{l}"].double() for l in range(3)]
    jump = arch != "relu"
    for l in range(3):
        assert sorted(enc[l]) == sorted([f"W_enc_{l}", f"b_enc_{l}", f"b_dec_{l}"] + [f"threshold_{l}"] * jump)
        assert enc[l][f"W_enc_{l}"].shape == (40, 48) and dec[l].shape == (40, 3 - l, 48)
    idx = torch.randint(0, 301, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        acts = model.harvest(idx, (0, 1, 2), ("mlp_in", "mlp_out")).reshape(-1, 3, 96)  # [x_l | y_l] per layer
        xs = [acts[:, l, :48] for l in range(3)]
        y_hat, fs = clt([x * s for x, s in zip(xs, s_in)])  # (N, 3 x 48)
    assert all((f > 0).any() and (f == 0).any() for f in fs)
    fs_ct = []
    for l in range(3):
        pre = xs[l].double() @ enc[l][f"W_enc_{l}"].T + enc[l][f"b_enc_{l}"]  # (N, 48) @ (48, 40)
        fs_ct.append(pre * (pre > enc[l][f"threshold_{l}"]) if jump else pre.relu())
    for t in range(3):
        y_ct = enc[t][f"b_dec_{t}"] + sum(fs_ct[l] @ dec[l][:, t - l] for l in range(t + 1))  # (N, 40) @ (40, 48)
        torch.testing.assert_close(y_ct.float(), y_hat[:, 48 * t:48 * (t + 1)] / s_out[t], atol=1e-4, rtol=1e-4)
    for flags, expect in ((dict(arch="topk"), "--arch=topk: circuit-tracer reads a ReLU or a JumpReLU, and this CLT's "
                                              "code is neither"),
                          (dict(arch="relu", skip=True), "circuit-tracer's CLT loader reads no skip path (load_clt); "
                                                         "train the CLT with --skip=False")):
        write_clt(tmp_path / "bad", model_dir, **flags)
        r = run_sae("--mode=export", "--export_format=circuit_tracer", f"--out_dir={tmp_path / 'bad'}",
                    f"--export_dir={tmp_path / 'bad_ct'}")
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: {expect}"], r.stderr
        assert not (tmp_path / "bad_ct").exists()


def test_circuit_tracer_export_refuses_what_it_cannot_load_in_one_line(three_layer_llama, tmp_path):
    """A topk transcoder, an SAE, a missing layer, a duplicated one, unequal widths, another site pair and a bad
    --export_format: each one line, and nothing written."""
    from dataclasses import asdict
    model_dir, _ = three_layer_llama
    cases = {
        "topk": (r"^--arch=topk has no circuit-tracer form \(its k features per token are no threshold's, and "
                 r"circuit-tracer's loader has no TopK\); export supports relu, vae, jumprelu, batchtopk, matryoshka$",
                 dict(layers=[0, 1, 2], archs=["relu", "topk", "relu"], skips=[False] * 3)),
        "missing": (rf"^circuit-tracer needs one transcoder for each layer 0\.\.2 of {model_dir}: missing \[1\]$",
                    dict(layers=[0, 2], archs=["relu"] * 2, skips=[False] * 2)),
        "duplicated": (rf"^circuit-tracer needs one transcoder for each layer 0\.\.2 of {model_dir}: duplicated \[1\]$",
                       dict(layers=[0, 1, 1, 2], archs=["relu"] * 4, skips=[False] * 4)),
        "pair": (r"^layer 0 \(layer0\) reads mlp_in and predicts mlp_hidden; circuit-tracer's transcoders read and "
                    r"write mlp_in -> mlp_out, resid_mid -> mlp_out$", None),
        "sae": (r"^--export_format=circuit_tracer exports transcoders; layer 1 \(layer1\) is an SAE of mlp_in \(a "
                r"transcoder has --target_site=mlp_out\)$", None),
        "width": (r"^the transcoders have d_sae 16, 40; circuit-tracer's set needs one width$", None),
    }
    for name, (message, spec) in cases.items():
        run = tmp_path / name
        if spec:
            write_transcoder_set(run, model_dir, **spec)
        else:
            write_transcoder_set(run, model_dir, [0, 1, 2], ["relu"] * 3, [False] * 3)
            ckpt = torch.load(run / f"layer{0 if name == 'pair' else 1}" / "ckpt.pt", weights_only=True)
            if name == "pair":  # a transcoder to another site (the same weights' shapes: only the config changes)
                ckpt["config"]["target_site"] = "mlp_hidden"
            elif name == "sae":  # an SAE of the layer's mlp_in
                ckpt.update(sae=SAE(48, 40).state_dict(), config={**ckpt["config"], "target_site": ""})
            else:  # a narrower transcoder at layer 1
                ckpt["sae"] = SAE(48, 16, d_out=48).state_dict()
                ckpt["config"]["d_sae"] = 16
            torch.save(ckpt, run / f"layer{0 if name == 'pair' else 1}" / "ckpt.pt")
        resolved = sae.resolve_runs(sae.parse_overrides(analyze.AnalyzeConfig(), [f"--out_dir={run}", "--mode=export"]), analyze.AnalyzeConfig)
        with pytest.raises(ValueError, match=message):
            analyze.export_circuit_tracer(resolved, str(tmp_path / f"ct_{name}"))
        assert not (tmp_path / f"ct_{name}").exists(), name
    r = run_sae("--mode=export", "--export_format=neuronpedia", f"--out_dir={tmp_path / 'topk'}",
                f"--export_dir={tmp_path / 'ct_cli'}")
    assert r.returncode == 1 and r.stderr.strip() == ("error: --export_format=neuronpedia: valid values are saelens, "
                                                      "circuit_tracer"), r.stderr
    r = run_sae("--mode=export", "--export_format=circuit_tracer", f"--out_dir={tmp_path / 'topk'}",
                f"--export_dir={tmp_path / 'ct_cli'}")
    assert r.returncode == 1 and r.stderr.startswith("error: --arch=topk has no circuit-tracer form") and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "ct_cli").exists()
    r = run_sae("--mode=export", f"--out_dir={tmp_path / 'missing'}", f"--export_dir={tmp_path / 'ct_cli'}")
    assert r.returncode == 1 and r.stderr.startswith("error: --mode=export reads one SAE"), r.stderr  # SAELens's: one


# run in circuit-tracer's own venv ($CIRCUIT_TRACER_PYTHON): it imports none of our modules (that venv has its own
# transformers); arrays come and go as .npy files in `work`
CIRCUIT_TRACER_CLIENT = r"""
import json, sys
import numpy as np, torch
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.graph import compute_graph_scores
model_dir, export_dir, work = sys.argv[1:]
model = ReplacementModel.from_pretrained(model_dir, export_dir, backend="nnsight", device=torch.device("cpu"),
                                         dtype=torch.float32)
tcs = getattr(model.transcoders, "_module", model.transcoders)  # nnsight wraps it in an Envoy
x = torch.from_numpy(np.load(f"{work}/x.npy"))  # (n_layers, T, d_model): our mlp_in
ids = torch.from_numpy(np.load(f"{work}/ids.npy"))  # (T,)
with torch.no_grad():
    f = tcs.encode(x)  # (n_layers, T, d_transcoder)
    y = tcs.decode(f, x)  # (n_layers, T, d_model)
_, acts = model.get_activations(ids)  # its own hooks on its own forward of the model
graph = attribute(ids, model, max_n_logits=3, desired_logit_prob=0.5, batch_size=32, max_feature_nodes=64)
for name, a in (("f", f), ("y", y), ("acts", acts)):
    np.save(f"{work}/{name}.npy", a.float().numpy())
json.dump({"scores": [float(s) for s in compute_graph_scores(graph)], "n_layers": len(tcs),
           "activations": [type(t.activation_function).__name__ for t in tcs], "skip": tcs.skip_connection,
           "hooks": [tcs.feature_input_hook, tcs.feature_output_hook], "active": int(graph.active_features.shape[0])},
          open(f"{work}/out.json", "w"))
"""


def circuit_tracer_python():
    """$CIRCUIT_TRACER_PYTHON, an interpreter with circuit-tracer 0.5.0, or skipped (CI has none)."""
    python = os.environ.get("CIRCUIT_TRACER_PYTHON")
    if not python:
        pytest.skip("CIRCUIT_TRACER_PYTHON is not set: an interpreter with circuit-tracer 0.5.0 "
                    "(docs/research-helpers.md)")
    if subprocess.run([python, "-c", "import circuit_tracer"], capture_output=True).returncode != 0:
        pytest.skip(f"CIRCUIT_TRACER_PYTHON={python} cannot import circuit_tracer")
    return python


def run_circuit_tracer_client(python, model_dir, tmp_path, x, ids, client=None):
    """client (CIRCUIT_TRACER_CLIENT by default) on the export in tmp_path/ct, x (n_layers, T, d) at its input hook and
    ids (1, T): -> (its out.json, the directory of its .npy outputs)."""
    work = tmp_path / "work"
    work.mkdir()
    np.save(work / "x.npy", x.numpy()), np.save(work / "ids.npy", ids[0].numpy())
    r = subprocess.run([python, "-c", client or CIRCUIT_TRACER_CLIENT, str(model_dir), str(tmp_path / "ct"), str(work)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.load(open(work / "out.json")), work


def smollm2_transcoder(cfg, d, seed):
    """A transcoder of SmolLM2's width, random and sparse: unit encoder columns and b_enc = -1 (pre ~ N(-1, 1) at
    E|x| = sqrt(d): about a sixth of the features fire), random biases, skip path, free decoder norms and thresholds."""
    torch.manual_seed(seed)
    tc = SAE.from_config((d, d), cfg)
    with torch.no_grad():
        tc.W_enc.copy_(torch.nn.functional.normalize(torch.randn_like(tc.W_enc), dim=0))  # (d, d_sae), unit columns
        tc.b_enc.normal_(-1.0, 0.2), tc.b_in.normal_(0, 0.1), tc.b_dec.normal_(0, 0.1)
        tc.W_dec.mul_(torch.empty(tc.W_dec.shape[0], 1).uniform_(0.5, 2.0))  # relu's free norms, folded at export
        if cfg.skip:
            tc.W_skip.normal_(0, 0.01)
        if cfg.arch == "jumprelu":
            tc.threshold.uniform_(0, 0.5)
        if cfg.arch == "batchtopk":
            tc.threshold.fill_(0.3)
    return tc.eval()


def test_circuit_tracer_loads_the_export_of_smollm2_transcoders_and_attributes(request, tmp_path, monkeypatch):
    """circuit-tracer 0.5.0 itself as the client (its own venv: $CIRCUIT_TRACER_PYTHON; skipped without it) loads the
    export of 30 random SmolLM2-135M transcoders (relu, jumprelu, batchtopk; skip paths on half) with
    ReplacementModel.from_pretrained(backend="nnsight"): its transcoders' encode and decode on our mlp_in give our
    features and prediction, its own hook (mlp.hook_in) on its own forward gives our features, and attribute() builds a
    graph whose replacement and completeness scores are finite and in [0, 1]."""
    python = circuit_tracer_python()
    smollm2_dir = request.getfixturevalue("smollm2_dir")  # after the check: without circuit-tracer, no conversion
    monkeypatch.setattr(sae_kernels, "INTERPRET", False)  # the CPU paths: the kernels' tests are elsewhere; 30 s less
    model = sae.load_model(str(smollm2_dir))
    n_layer, d = model.config.n_layer, model.config.n_embd
    ids = torch.tensor([[0, 504, 3575, 282, 4649, 314, 7042, 30]])  # <|endoftext|> first, as our shards start
    seen = {}  # every layer's mlp_in and mlp_out from one forward: the outputs of the modules SiteBlock names so
    handles = [module.register_forward_hook(lambda m, args, out, key=(i, site): seen.update({key: out[0]}))
               for i, block in enumerate(model.blocks) for site, module in (("mlp_in", block.mlp_norm),
                                                                         ("mlp_out", block.mlp_out))]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    acts = [torch.cat([seen[i, "mlp_in"], seen[i, "mlp_out"]], dim=-1) for i in range(n_layer)]  # each (T, 2 d)
    # as harvest gives them, to fp32 rounding (2.8e-5 measured: the CPU matmul's blocking differs between the calls)
    torch.testing.assert_close(acts[7], model.harvest(ids, 7, ("mlp_in", "mlp_out"))[0], atol=1e-4, rtol=1e-4)
    x = torch.stack([a[:, :d] for a in acts])  # (n_layer, T, d)
    scales = [(d ** 0.5 / a[:, :d].norm(dim=1).mean().item(), d ** 0.5 / a[:, d:].norm(dim=1).mean().item())
              for a in acts]  # E|s x| = sqrt(d), as training normalises
    ours = write_transcoder_set(tmp_path / "run", smollm2_dir, list(range(n_layer)),
                                [("relu", "jumprelu", "batchtopk")[i % 3] for i in range(n_layer)],
                                [i % 2 == 0 for i in range(n_layer)], d=d, d_sae=64, scales=scales,
                                make=smollm2_transcoder)
    resolved = sae.resolve_runs(sae.parse_overrides(analyze.AnalyzeConfig(), [f"--out_dir={tmp_path / 'run'}", "--mode=export"]),
                              analyze.AnalyzeConfig)
    analyze.export_circuit_tracer(resolved, str(tmp_path / "ct"))
    out, work = run_circuit_tracer_client(python, smollm2_dir, tmp_path, x, ids)
    assert out["n_layers"] == n_layer and out["skip"] and out["hooks"] == ["mlp.hook_in", "mlp.hook_out"]
    assert out["activations"] == [("function", "JumpReLU", "JumpReLU")[i % 3] for i in range(n_layer)]
    f_ct, y_ct, acts_ct = (torch.from_numpy(np.load(work / f"{n}.npy")) for n in ("f", "y", "acts"))
    for (layer, tc), (s_in, s_out) in zip(ours, scales):
        with torch.no_grad():
            y_hat, f = tc(x[layer] * s_in)[:2]
        assert (f > 0).any() and (f == 0).any(), layer
        torch.testing.assert_close(f_ct[layer], f, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y_ct[layer], y_hat / s_out, atol=1e-4, rtol=1e-4)
        # its forward runs transformers' SmolLM2, ours our own: the same model to fp32 rounding; position 0 it zeroes
        assert not acts_ct[layer, 0].any()
        torch.testing.assert_close(acts_ct[layer, 1:], f[1:], atol=2e-4, rtol=1e-3)  # 1.3e-5 measured
    replacement, completeness = out["scores"]
    assert 0 <= replacement <= 1 and 0 <= completeness <= 1 and out["active"] > 0, out


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen3"])
def test_circuit_tracer_loads_the_export_of_each_new_familys_transcoders(family, request, tmp_path, monkeypatch):
    """circuit-tracer 0.5.0 itself ($CIRCUIT_TRACER_PYTHON; skipped without it) on a random 3-layer model of each
    family (SmolLM2's tokenizer, config.json in transformers 4's keys, which its transformers 4.57 reads): it loads
    the export of a relu transcoder set with skip paths, its encode of the activation at its input hook gives our
    features (for Gemma 2 that hook is ln2.hook_normalized, the norm's output before its gain, computed here from
    resid_mid), its own hooks on its own forward of the model give our features, and attribute() builds a graph."""
    import shutil
    from test_sae import write_v4_keys
    python = circuit_tracer_python()
    smollm2_dir = request.getfixturevalue("smollm2_dir")
    monkeypatch.setattr(sae_kernels, "INTERPRET", False)
    config_class, model_class, gain = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, 1.0),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, 0.0),  # gains 1 + w
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, 0.0)}[family]
    extra = dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=4) \
        if family == "gemma3" else {}
    torch.manual_seed(0)
    hf = model_class(config_class(vocab_size=49152, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                  max_position_embeddings=64, rms_norm_eps=1e-5, **extra)).eval()
    with torch.no_grad():
        for key, p in hf.named_parameters():
            if "norm" in key:
                p.uniform_(gain - 0.5, gain + 0.5)
    model_dir = tmp_path / "model"
    hf.save_pretrained(model_dir)
    write_v4_keys(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the config too: else transformers builds the family's
        shutil.copy(smollm2_dir / name, model_dir / name)       # own tokenizer class, adding Gemma's <bos> past the vocab
    model = sae.load_model(str(model_dir))
    ours = write_transcoder_set(tmp_path / "run", model_dir, [0, 1, 2], ["relu"] * 3, [True] * 3,
                                make=smollm2_transcoder, scales=(1.0, 1.0))
    resolved = sae.resolve_runs(sae.parse_overrides(analyze.AnalyzeConfig(), [f"--out_dir={tmp_path / 'run'}", "--mode=export"]),
                              analyze.AnalyzeConfig)
    analyze.export_circuit_tracer(resolved, str(tmp_path / "ct"))
    ids = torch.tensor([[0, 504, 3575, 282, 4649, 314, 7042, 30]])
    with torch.no_grad():
        acts = [model.harvest(ids, layer, ("resid_mid", "mlp_in"))[0] for layer in range(3)]  # (T, 48 + 48)
    ln2 = family == "gemma2"
    x = torch.stack([tl_normalized(a[:, :48], "rms", 1e-5).float() if ln2 else a[:, 48:] for a in acts])
    out, work = run_circuit_tracer_client(python, model_dir, tmp_path, x, ids)
    assert out["hooks"] == list(analyze.CIRCUIT_TRACER_ARCH_HOOKS[hf.config.architectures[0]][("mlp_in", "mlp_out")])
    f_ct, acts_ct = (torch.from_numpy(np.load(work / f"{n}.npy")) for n in ("f", "acts"))
    for layer, tc in ours:
        with torch.no_grad():
            f = tc(acts[layer][:, 48:]).f
        assert (f > 0).any() and (f == 0).any(), layer
        torch.testing.assert_close(f_ct[layer], f, atol=1e-4, rtol=1e-4)
        assert not acts_ct[layer, 0].any()  # position 0 it zeroes
        torch.testing.assert_close(acts_ct[layer, 1:], f[1:], atol=1e-4, rtol=1e-3)  # 2e-7 measured
    replacement, completeness = out["scores"]
    assert 0 <= replacement <= 1 and 0 <= completeness <= 1 and out["active"] > 0, out


# the same for a cross-layer transcoder: its decode takes the sparse codes of every layer
CIRCUIT_TRACER_CLT_CLIENT = r"""
import json, sys
import numpy as np, torch
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.graph import compute_graph_scores
model_dir, export_dir, work = sys.argv[1:]
model = ReplacementModel.from_pretrained(model_dir, export_dir, backend="nnsight", device=torch.device("cpu"),
                                         dtype=torch.float32)
clt = getattr(model.transcoders, "_module", model.transcoders)  # nnsight wraps it in an Envoy
x = torch.from_numpy(np.load(f"{work}/x.npy"))  # (n_layers, T, d_model): our mlp_in
ids = torch.from_numpy(np.load(f"{work}/ids.npy"))  # (T,)
with torch.no_grad():
    f = clt.encode(x)  # (n_layers, T, d_transcoder)
    y = clt.decode(f.to_sparse())  # (n_layers, T, d_model): every target from the layers at or below it
graph = attribute(ids, model, max_n_logits=3, desired_logit_prob=0.5, batch_size=32, max_feature_nodes=64)
for name, a in (("f", f), ("y", y)):
    np.save(f"{work}/{name}.npy", a.float().numpy())
json.dump({"scores": [float(s) for s in compute_graph_scores(graph)], "kind": type(clt).__name__,
           "n_layers": clt.n_layers, "hooks": [clt.feature_input_hook, clt.feature_output_hook],
           "active": int(graph.active_features.shape[0])}, open(f"{work}/out.json", "w"))
"""


def test_circuit_tracer_loads_the_export_of_a_smollm2_cross_layer_transcoder_and_attributes(request, tmp_path):
    """circuit-tracer 0.5.0 itself (skipped without $CIRCUIT_TRACER_PYTHON) loads the export of a random cross-layer
    transcoder over SmolLM2-135M's 30 layers (jumprelu, 32 features a layer) as its CrossLayerTranscoder: its encode
    on our mlp_in gives our codes, its decode our prediction of every layer's mlp_out, and attribute() builds a graph."""
    from dataclasses import asdict
    python = circuit_tracer_python()
    smollm2_dir = request.getfixturevalue("smollm2_dir")
    model = sae.load_model(str(smollm2_dir))
    n_layer, d = model.config.n_layer, model.config.n_embd
    ids = torch.tensor([[0, 504, 3575, 282, 4649, 314, 7042, 30]])
    with torch.no_grad():
        x = model.harvest(ids, tuple(range(n_layer)), "mlp_in")[0].view(-1, n_layer, d).transpose(0, 1)  # (L, T, d)
    s_in = [d ** 0.5 / x[l].norm(dim=1).mean().item() for l in range(n_layer)]
    s_out = [0.5 + 0.02 * l for l in range(n_layer)]
    cfg = TrainConfig(init_from=str(smollm2_dir), out_dir=str(tmp_path / "run"), layers="all", cross_layer=True,
                      site="mlp_in", target_site="mlp_out", arch="jumprelu", d_sae=32)
    torch.manual_seed(0)
    clt = sae.CrossLayerTranscoder.from_config((d, d), cfg, n_layer)
    with torch.no_grad():  # unit encoder columns and b_enc -1: about a sixth of the features fire
        for W in clt.W_enc:
            W.copy_(torch.nn.functional.normalize(torch.randn_like(W), dim=0))
        clt.b_enc.normal_(-1.0, 0.2), clt.b_in.normal_(0, 0.1), clt.b_dec.normal_(0, 0.1), clt.threshold.uniform_(0, 0.5)
    (tmp_path / "run").mkdir()
    sae.save_checkpoint(str(tmp_path / "run" / "ckpt.pt"), {"config": asdict(cfg), "act_scale": s_in,
                                                           "target_scale": s_out, "sae": clt.state_dict(), "iter_num": 1})
    r = run_sae("--mode=export", "--export_format=circuit_tracer", f"--out_dir={tmp_path / 'run'}",
                f"--export_dir={tmp_path / 'ct'}")
    assert r.returncode == 0, r.stderr
    out, work = run_circuit_tracer_client(python, smollm2_dir, tmp_path, x, ids, CIRCUIT_TRACER_CLT_CLIENT)
    assert out["kind"] == "CrossLayerTranscoder" and out["n_layers"] == n_layer
    assert out["hooks"] == ["mlp.hook_in", "mlp.hook_out"]
    f_ct, y_ct = (torch.from_numpy(np.load(work / f"{n}.npy")) for n in ("f", "y"))
    with torch.no_grad():
        y_hat, fs = clt([x[l] * s_in[l] for l in range(n_layer)])  # (T, L d), [(T, d_sae)]
    for l in range(n_layer):
        assert (fs[l] > 0).any() and (fs[l] == 0).any(), l
        torch.testing.assert_close(f_ct[l], fs[l], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(y_ct[l], y_hat[:, l * d:(l + 1) * d] / s_out[l], atol=1e-4, rtol=1e-4)
    replacement, completeness = out["scores"]
    assert 0 <= replacement <= 1 and 0 <= completeness <= 1 and out["active"] > 0, out


@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_steering_a_transcoder_reads_its_input_and_writes_at_its_target(mode):
    """A transcoder feature's steering edits mlp_out (seen in resid_post, block 2's input) by the feature's decoder
    row in model units; clamp reads the feature at mlp_in, from the model's own input."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=24, vocab_size=60, block_size=16)).eval()
    tc, s_in, s_out = SAE(24, 40, d_out=24, skip=True), 2.5, 0.5
    with torch.no_grad():
        tc.b_enc.normal_(0, 1.0)
    idx = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        clean = captured_input(model.h[2].ln_1, lambda: model(idx))
        mlp_in = captured_input(model.h[1].mlp.c_fc, lambda: model(idx)).reshape(-1, 24)
        f = tc(mlp_in * s_in)[1]  # (B*T, 40)
        feature = int(f.sum(dim=0).argmax())
        with analyze.steer(model, tc, {feature: 3.0}, 1, ("mlp_in", "mlp_out"), (s_in, s_out), mode=mode):
            steered = captured_input(model.h[2].ln_1, lambda: model(idx))
    amount = torch.full((len(f),), 3.0) - (f[:, feature] if mode == "clamp" else 0)  # (B*T,)
    expected = amount[:, None] * tc.W_dec[feature].detach() / s_out
    torch.testing.assert_close((steered - clean).reshape(-1, 24), expected, atol=1e-5, rtol=0)
    assert not model.blocks[1]._forward_pre_hooks


@pytest.fixture(scope="module")
def tiny_transcoder(tiny_shards, tmp_path_factory):
    """A skip transcoder mlp_in -> mlp_out on the tiny random GPT-2 (layer 1), 40 steps: its out_dir."""
    out = tmp_path_factory.mktemp("tiny_transcoder")
    r = run_sae(*TINY_GPT_RUN, f"--data_dir={tiny_shards}", f"--out_dir={out}", "--target_site=mlp_out", "--skip=True",
                "--max_iters=40", "--eval_interval=40", "--resample_iters=()")
    assert r.returncode == 0, r.stderr
    return out


def test_a_trained_transcoder_exports_steers_and_gets_a_dashboard(tiny_transcoder, enc, tmp_path):
    """The helpers on a trained transcoder, through the command line: export (SAELens's forward on raw activations,
    both scales folded), steering, and a dashboard whose logit effects are its decoder rows read from mlp_out."""
    from safetensors.torch import load_file
    r = run_sae("--mode=export", f"--out_dir={tiny_transcoder}", f"--export_dir={tmp_path / 'export'}")
    assert r.returncode == 0, r.stderr
    cfg = json.load(open(tmp_path / "export" / "cfg.json"))
    w = load_file(tmp_path / "export" / "sae_weights.safetensors")
    ckpt = load_ckpt(tiny_transcoder)
    model_tc, saved, s_in = analyze.load_sae(ckpt)
    s_out = analyze.target_scale(ckpt)
    gpt = sae.load_lm(saved)
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        acts = gpt.harvest(idx, 1, ("mlp_in", "mlp_out"))  # (B, T, 64): both in model units
        x_in = acts[..., :32].reshape(-1, 32)
        n = gpt.blocks[1].mlp_norm
        n_hat = (x_in - n.bias) / n.weight  # TransformerLens's hook_normalized: the norm before its gain and bias
        y_tl, _ = saelens_transcoder_forward(cfg, w, n_hat)
        y_hat = model_tc(x_in * s_in).x_hat
    torch.testing.assert_close(y_tl, y_hat / s_out, atol=1e-4, rtol=1e-4)
    r = run_sae("--mode=steer", f"--out_dir={tiny_transcoder}", "--feature=3", "--scale=50.0", "--prompt=Hello world",
                "--max_new_tokens=4")
    assert r.returncode == 0 and "--- feature 3 x 50\nHello world" in r.stdout, r.stderr
    page = tmp_path / "dash.html"
    r = run_sae("--mode=dashboard", f"--out_dir={tiny_transcoder}", "--features=0:3", "--dashboard_tokens=640",
                f"--dashboard_file={page}")
    assert r.returncode == 0, r.stderr
    assert "layer 1 mlp_in -&gt; mlp_out transcoder" in open(page).read() or \
        "layer 1 mlp_in -> mlp_out transcoder" in open(page).read()
    effects = analyze.logit_effects(gpt, 1, "mlp_out", model_tc.W_dec[:3] / s_out)  # (3, vocab)
    top = [enc.decode([t]) for t in effects[0].topk(10).indices.tolist()]
    assert all(repr(t) in open(page).read() or __import__("html").escape(repr(t)) in open(page).read() for t in top[:3])


# -----------------------------------------------------------------------------
# feature dashboards

@pytest.fixture(scope="module")
def dashboard(tiny_run, enc):
    path = tiny_run / "dash.html"
    r = run_sae("--mode=dashboard", f"--out_dir={tiny_run}", "--features=0:5", "--dashboard_tokens=640",
                f"--dashboard_file={path}")
    assert r.returncode == 0, r.stderr
    return path


def test_dashboard_html_structure(dashboard, tiny_run):
    from html.parser import HTMLParser

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.ids, self.tags, self.titles, self.attrs = [], set(), [], []
        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.tags.add(tag)
            self.attrs.extend(attrs)
            if "id" in attrs:
                self.ids.append(attrs["id"])
            if tag == "span" and "title" in attrs:
                self.titles.append(float(attrs["title"]))

    page = open(dashboard, encoding="utf-8").read()
    parsed = Collect()
    parsed.feed(page)
    assert parsed.ids == ["density"] + [f"feature-{i}" for i in range(5)]
    assert not {"script", "link", "img", "iframe"} & parsed.tags and not {"src", "href"} & set(parsed.attrs)
    assert "http" not in page  # self-contained: opens from disk with no network
    assert "svg" in parsed.tags and parsed.titles and max(parsed.titles) > 0
    # the firing frequency shown for feature 0 against a direct computation on the same val tokens
    ckpt = load_ckpt(tiny_run)
    model_sae, saved, s = analyze.load_sae(ckpt)
    gpt = sae.load_lm(saved)
    val = read_shard_numpy(glob.glob(f"{saved.data_dir}/*_val_*.bin")[0])[:640].astype(np.int64)
    with torch.no_grad():
        acts = gpt.harvest(torch.from_numpy(val).view(20, 32), saved.layer, saved.site)[:, 1:]  # position 0 left out
        f = sae_kernels.encode_relu_decode_ref(acts.reshape(-1, 32) * s, *(ckpt["sae"][k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")))[1]
    fired = int((f[:, 0] > 0).sum())
    assert f"firing frequency {fired / len(f):.4%} ({fired} tokens)" in page


def png_distinct_bytes(path):
    """Distinct byte values in a PNG's decompressed pixel data: a blank page has a handful."""
    import zlib
    raw = open(path, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, data = 8, b""
    while pos < len(raw):
        length = int.from_bytes(raw[pos:pos + 4], "big")
        if raw[pos + 4:pos + 8] == b"IDAT":
            data += raw[pos + 8:pos + 8 + length]
        pos += 12 + length
    return len(set(zlib.decompress(data)))


CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.path.exists(p)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_dashboard_renders_in_headless_chromium(dashboard, tmp_path):
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "dashboard.png"
    r = subprocess.run(flags + ["--window-size=1200,1600", f"--screenshot={shot}", dashboard.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.exists(), r.stderr
    assert png_distinct_bytes(shot) > 50  # text, shading and charts, not an empty page
    dom = subprocess.run(flags + ["--dump-dom", dashboard.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert all(f'id="feature-{i}"' in dom for i in range(5)) and 'id="density"' in dom


def test_feature_selection():
    freq = torch.tensor([0.1, 0.5, 0.0, 0.3])
    assert analyze.select_features("1:3", freq) == [1, 2] and analyze.select_features("top_freq:2", freq) == [1, 3]
    for bad in ("3:1", "0:9", "top:2", "all"):
        with pytest.raises(ValueError, match="expected a:b with 0 <= a < b <= 4, or top_freq:K"):
            analyze.select_features(bad, freq)


# -----------------------------------------------------------------------------
# plots and tables from log.jsonl

def write_fake_run(root, name, config, finals):
    """A run directory as training leaves it: config.json and log.jsonl (one evaluation per record)."""
    run = Path(root) / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({**dataclasses.asdict(sae.TrainConfig()), **config}))
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in finals))


def fake_eval(it, l0, fvu, layer_cost=0.1):
    return {"iter": it, "mse": 100 * fvu, "fvu": fvu, "l0": l0, "l1": 3.0, "dead_frac": 0.01, "dense_frac": 0.0,
            "mean_max_cos": 0.3, "ce_clean": 3.5, "ce_sae": 3.5 + fvu * layer_cost, "ce_zero": 3.5 + layer_cost,
            "kl": fvu * layer_cost, "ce_recovered": 1 - fvu}


def test_at_l0_interpolates_in_log_l0_and_never_extrapolates():
    points = [(16.0, 0.5), (64.0, 0.3), (8.0, 0.6)]
    assert analyze.at_l0(points, 32.0) == pytest.approx(0.4)   # halfway between 16 and 64 in log L0
    assert analyze.at_l0(points, 8.0) == pytest.approx(0.6)
    assert analyze.at_l0(points, 11.313708498984761) == pytest.approx(0.55)  # sqrt(8 * 16)
    assert analyze.at_l0(points, 100.0) is None and analyze.at_l0(points, 4.0) is None
    assert analyze.at_l0([(10.0, float("nan")), (50.0, 1.0)], 32.0) is None  # a missing metric is no point


def test_plot_command_draws_the_figures_and_the_matched_table_from_fake_logs(tmp_path):
    """--mode=plot on a small fake set of logs: the frontier and layer figures are PNG images, and the table's
    values at L0 32 are the interpolation computed here by hand."""
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    for l1, l0 in ((1.0, 64.0), (2.0, 16.0), (4.0, 4.0)):  # relu: FVU 0.3 at L0 64, 0.5 at 16 -> 0.4 at 32
        write_fake_run(runs / "relu", f"l1_coeff{l1}", {"arch": "relu", "l1_coeff": l1, "layer": 15},
                       [fake_eval(0, 2000.0, 1.0), fake_eval(100, l0, {64.0: 0.3, 16.0: 0.5, 4.0: 0.7}[l0])])
    for k in (40, 80):  # topk: L0 40 to 80, outside 32: no value at 32
        write_fake_run(runs / "topk", f"k{k}", {"arch": "topk", "k": k, "layer": 15}, [fake_eval(100, float(k), 0.2)])
    for layer in (5, 25):  # a second and third layer: the layers figure, with the zero-ablation cost per layer
        write_fake_run(runs / "layers", f"layer{layer}", {"arch": "relu", "layer": layer},
                       [fake_eval(100, 30.0, 0.4, layer_cost=0.05 * layer)])
    for block in (128, 512):  # the context-length comparison: both evaluated by position on 512-token contexts
        record = {**fake_eval(100, 30.0, 0.4), "context": 512, "positions": {
            b: {**fake_eval(100, 30.0, 0.3 + 0.1 * i * (block == 128)), "tokens": 100} for i, b in
            enumerate(("1-63", "64-127", "128-255", "256-511"))}}
        write_fake_run(runs / "context", f"block{block}", {"arch": "topk", "block_size": block, "layer": 10}, [record])
    r = run_sae("--mode=plot", f"--plot_runs={runs}", f"--plot_dir={tmp_path / 'figures'}")
    assert r.returncode == 0, r.stderr
    import matplotlib.image
    for name in ("frontier.png", "layers.png", "positions.png"):
        image = matplotlib.image.imread(tmp_path / "figures" / name)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 1000, (name, image.shape)
        assert image[..., :3].std() > 0.05, f"{name} is blank"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in (tmp_path / "figures" / "matched_l0.md").read_text().splitlines() if line.startswith("| ")}
    header = rows.pop("method")
    relu = dict(zip(header, rows["relu"]))
    assert relu["SAEs"] == "3" and relu["L0 range"] == "4.0–64.0"  # the layer-15 frontier: the other layers are apart
    assert float(relu["FVU"]) == pytest.approx(0.4, abs=1e-3)
    assert float(relu["CE increase (nats)"]) == pytest.approx(0.04, abs=1e-3)  # 0.4 x the 0.1-nat ablation cost
    assert float(relu["CE loss recovered"]) == pytest.approx(0.6, abs=1e-3)
    assert dict(zip(header, rows["topk"]))["FVU"] == "—"
    listed = [line.split("|") for line in (tmp_path / "figures" / "runs.md").read_text().splitlines()[2:]]
    assert len(listed) == 8  # every run with a final evaluation once (block128 has only its 512-token one)
    assert {(row[4].strip(), row[6].strip()) for row in listed if "relu/" in row[1]} == {
        ("l1_coeff 1", "0.300"), ("l1_coeff 2", "0.500"), ("l1_coeff 4", "0.700")}  # (setting, FVU)
    # without matplotlib: one line, exit 1
    fake = tmp_path / "no_matplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {**cpu_env(), "PYTHONPATH": str(fake.parent)}
    r = subprocess.run([sys.executable, str(HERE / "analyze.py"), "--mode=plot", f"--plot_runs={runs}"], cwd=tmp_path,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.strip() == "error: --mode=plot needs matplotlib: pip install matplotlib"


def test_frontier_gap_compares_each_hybrid_with_its_plain_frontier_at_its_own_l0(tmp_path):
    """frontier_gap.md: a hybrid SAE at L0 sqrt(10 x 100) against the relu frontier through (10, 0.5) and (100, 0.2):
    the frontier's FVU there is the log-L0 midpoint 0.35, so the gap is +0.05; one outside the range gets no gap; the
    plain runs stay out of the table unless --mode=overlap wrote their numbers."""
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    write_fake_run(runs, "relu-a", {"arch": "relu", "l1_coeff": 1.0}, [fake_eval(100, 100.0, 0.2)])
    write_fake_run(runs, "relu-b", {"arch": "relu", "l1_coeff": 4.0}, [fake_eval(100, 10.0, 0.5)])
    (runs / "relu-b" / "overlap.json").write_text(json.dumps({"features": 90, "shared_peak": 0.5, "distinct_peaks": 0.8,
                                                             "shared_peak_subset": 0.25}))
    hybrid = {"arch": "relu", "loss": "hybrid", "jl_form": "welch", "jl_coeff": 3e4}
    write_fake_run(runs, "welch-in", hybrid, [fake_eval(100, 10 ** 1.5, 0.4)])
    write_fake_run(runs, "welch-out", {**hybrid, "jl_coeff": 3e5}, [fake_eval(100, 5.0, 0.7)])
    r = run_sae("--mode=plot", f"--plot_runs={runs}", f"--plot_dir={tmp_path / 'figures'}")
    assert r.returncode == 0, r.stderr
    rows = {line.split(" | ")[0].strip("| ").split("/")[-1]: line.split(" | ")
            for line in (tmp_path / "figures" / "frontier_gap.md").read_text().splitlines() if "runs/" in line}
    assert set(rows) == {"welch-in", "welch-out", "relu-b"}
    assert rows["welch-in"][1] == "relu hybrid welch 30000" and rows["welch-in"][3] == "0.400 (+0.050)"
    assert rows["welch-out"][3] == "0.700" and rows["relu-b"][-1].strip(" |") == "0.250"


def test_plot_draws_the_fine_tuning_comparison_from_fake_logs(tmp_path):
    """finetune.png and finetune.md: each SAE on its model, on the fine-tune, and the fine-tune's own SAE of the same
    setting beside it; the fine-tune's SAEs stay out of the base model's frontier."""
    pytest.importorskip("matplotlib")
    runs = tmp_path / "runs"
    other = {**fake_eval(100, 30.0, 0.5), "ce_clean": 3.2, "eval_model": "models/tuned",
             "persistence": {"compared": 900, "within_2x": 0.75, "silent": 0.01}}
    for k, fvu in ((16, 0.4), (32, 0.3)):
        write_fake_run(runs / "base", f"k{k}", {"arch": "topk", "k": k, "init_from": "models/base"},
                       [fake_eval(100, float(k), fvu)] + ([other] if k == 32 else []))
    write_fake_run(runs / "tuned", "k32", {"arch": "topk", "k": 32, "init_from": "models/tuned/"},
                   [fake_eval(100, 32.0, 0.35)])
    r = run_sae("--mode=plot", f"--plot_runs={runs}", f"--plot_dir={tmp_path / 'figures'}")
    assert r.returncode == 0, r.stderr
    import matplotlib.image
    image = matplotlib.image.imread(tmp_path / "figures" / "finetune.png")
    assert image.shape[1] > 1000 and image[..., :3].std() > 0.05
    rows = [line for line in (tmp_path / "figures" / "finetune.md").read_text().splitlines() if line.startswith("| topk")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[0] == "topk, k 32" and cells[1] == "3.500 → 3.200"
    assert cells[2] == "0.300 / 0.500 / 0.350" and cells[-2:] == ["0.750 (900)", "0.010"]
    table = (tmp_path / "figures" / "matched_l0.md").read_text()
    assert "| topk | 2 | 16.0–32.0 |" in table  # the base model's two, not the fine-tune's


# -----------------------------------------------------------------------------
# fine-tuning (LoRA) and feature persistence

def tiny_gpt2_dir(root):
    hf = hf_gpt2(**TINY)
    hf.save_pretrained(root)
    return root, hf


def add_lora_by_hand_(hf, family, adapters, scale):
    """The reference: each adapted weight of a transformers model moved by scale B A, computed here in float64 from
    the adapters' own A and B (GPT-2's Conv1D weights are (in, out): the transpose)."""
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, (A, B) in adapters.items():
            key = ("transformer.h." if family == "gpt2" else "model.layers.") + name + ".weight"
            delta = scale * (B.double() @ A.double())  # (out, r) @ (r, in)
            params[key].add_((delta.T if family == "gpt2" else delta).float())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_starts_at_the_model_and_its_merged_directory_is_the_tuned_model(family, request, tmp_path):
    """LoRA leaves the model unchanged at the start (B = 0); with random adapters our forward equals transformers'
    model with W + (alpha / r) B A put in by hand; merged and saved, the directory loads in transformers and in
    load_model as that same model."""
    saved, _ = tiny_gpt2_dir(tmp_path / "base") if family == "gpt2" else request.getfixturevalue("tiny_llama")
    model = sae.load_model(str(saved))
    vocab = model.config.vocab_size
    idx = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(idx)
    names = analyze.add_lora_(model, rank=3, alpha=6.0)
    assert len(names) == (4 if family == "gpt2" else 7) * len(model.blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), base, atol=1e-6, rtol=0)
        adapters = {}
        for name in names:
            lora = model.blocks.get_submodule(name).parametrizations.weight[0]
            lora.A.normal_(std=0.3), lora.B.normal_(std=0.3)
            adapters[name] = (lora.A.clone(), lora.B.clone())
        tuned = model(idx)
    hf_class = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
    reference = hf_class.from_pretrained(saved, torch_dtype=torch.float32).eval()
    add_lora_by_hand_(reference, family, adapters, scale=2.0)
    with torch.no_grad():
        expected = reference(idx).logits
    assert (tuned - base).abs().max() > 0.1  # the adapters matter
    torch.testing.assert_close(tuned, expected, atol=2e-4, rtol=0)
    analyze.merge_lora_(model)
    assert not any(n.endswith((".A", ".B")) for n, _ in model.named_parameters())
    analyze.save_hf_model(model, str(saved), str(tmp_path / "merged"))
    assert os.path.isfile(tmp_path / "merged" / "config.json")
    with torch.no_grad():
        torch.testing.assert_close(hf_class.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()(idx).logits,
                                   expected, atol=2e-4, rtol=0)
        torch.testing.assert_close(sae.load_model(str(tmp_path / "merged"))(idx), expected, atol=2e-4, rtol=0)


FINETUNE_RUN = ["--mode=finetune", "--block_size=32", "--harvest_batch=4", "--eval_tokens=256", "--finetune_iters=30",
                "--eval_interval=10", "--log_interval=10", "--finetune_lr=0.01", "--lora_rank=4"]


DIE_FINETUNING = """
import os, signal, sys
import analyze, sae
calls, next_batch = [0], sae.DataLoaderLite.next_batch
def dying_next_batch(self):
    calls[0] += 1
    if calls[0] == 16:  # after the save at iter 10, in the middle of the next interval
        os.kill(os.getpid(), signal.SIGKILL)
    return next_batch(self)
sae.DataLoaderLite.next_batch = dying_next_batch
analyze.main(sys.argv[1:])
"""


def test_finetune_lowers_the_val_loss_resumes_exactly_and_writes_a_model(tiny_llama, llama_shards, tmp_path):
    """--mode=finetune on a tiny Llama: the val loss it reports is transformers' loss of the base model before and
    of the written model after, and it falls; a run killed mid-way resumes from its last save to the same weights."""
    saved, hf = tiny_llama
    args = [f"--init_from={saved}", f"--data_dir={llama_shards}", *FINETUNE_RUN]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = run_sae(*args, f"--finetune_dir={whole}")
    assert r.returncode == 0, r.stderr
    record = json.load(open(whole / "finetune.json"))
    losses = [e["val_loss"] for e in record["val_loss"]]
    assert [e["iter"] for e in record["val_loss"]] == [0, 10, 20, 30] and losses[-1] < losses[0] - 0.05
    assert {"config.json", "model.safetensors", "tokenizer.json", "lora.pt"} <= set(os.listdir(whole))
    assert not os.path.exists(f"{whole}.partial")
    val = torch.from_numpy(token_ids(glob.glob(f"{llama_shards}/*_val_*.bin")[0])[:256]).view(8, 32)
    tuned = transformers.LlamaForCausalLM.from_pretrained(whole, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert losses[0] == pytest.approx(hf(val, labels=val).loss.item(), abs=1e-4)
        assert losses[-1] == pytest.approx(tuned(val, labels=val).loss.item(), abs=1e-4)
    r = subprocess.run([sys.executable, "-c", DIE_FINETUNING, *args, f"--finetune_dir={killed}", "--dtype=float32"],
                       cwd=HERE, capture_output=True, text=True, timeout=300, env=cpu_env())
    assert r.returncode == -signal.SIGKILL and not os.path.exists(killed)
    r = run_sae(*args, f"--finetune_dir={killed}")
    assert r.returncode == 0 and "at iter 10" in r.stdout, r.stderr
    from safetensors.torch import load_file
    a, b = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(killed / "finetune.json"))["val_loss"] == record["val_loss"]
    r = run_sae(*args, f"--finetune_dir={killed}")
    assert r.returncode == 1 and r.stderr.strip() == f"error: --finetune_dir={killed} exists; delete it or name another"
    r = run_sae(*args, f"--finetune_dir={tmp_path / 'bad'}", "--lora_targets=q_proj,c_attn")
    assert r.returncode == 1 and r.stderr.strip() == ("error: --lora_targets: no linear layer of the blocks is named "
                                                      "c_attn; they are down_proj, gate_proj, k_proj, o_proj, q_proj, "
                                                      "up_proj, v_proj")
    assert not os.path.exists(tmp_path / "bad.partial")


def test_persistence_scores_an_sae_on_a_fine_tune(tiny_llama, llama_shards, tmp_path):
    """analyze.py --mode=persistence --eval_model: on the SAE's own model it repeats the native evaluation and every compared feature
    keeps its frequency; on a fine-tune its clean CE is transformers' loss of the fine-tune, and persistence is the
    count taken here from transformers' activations of both models."""
    saved, hf = tiny_llama
    run = tmp_path / "sae"
    r = run_sae(f"--init_from={saved}", *TINY_LLAMA_RUN, f"--data_dir={llama_shards}", "--max_iters=40",
                "--eval_interval=40", "--resample_iters=()", f"--out_dir={run}", "--site=mlp_in")
    assert r.returncode == 0, r.stderr
    tuned_dir = tmp_path / "tuned"
    assert run_sae(f"--init_from={saved}", f"--data_dir={llama_shards}", *FINETUNE_RUN,
                   f"--finetune_dir={tuned_dir}").returncode == 0
    for other in (saved, tuned_dir):
        r = run_sae("--mode=persistence", f"--out_dir={run}", f"--eval_model={other}")
        assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    native, same, tuned = log[-3:]
    assert same["eval_model"] == str(saved) and tuned["eval_model"] == str(tuned_dir)
    for key in ("fvu", "l0", "ce_sae", "kl"):
        assert same[key] == pytest.approx(native[key], abs=1e-9), key
    assert same["persistence"]["within_2x"] == 1.0 and same["persistence"]["silent"] == 0.0
    val = torch.from_numpy(token_ids(glob.glob(f"{llama_shards}/*_val_*.bin")[0])[:256]).view(8, 32)
    tuned_hf = transformers.LlamaForCausalLM.from_pretrained(tuned_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        assert tuned["ce_clean"] == pytest.approx(tuned_hf(val, labels=val).loss.item(), abs=1e-4)
    # persistence by hand: the SAE's code on transformers' mlp_in activations of both models, positions 1 on
    ckpt = load_ckpt(run)
    model_sae, _, scale = analyze.load_sae(ckpt)
    counts = []
    with torch.no_grad():
        for model in (hf, tuned_hf):
            act = hf_site_activations(model, val, 1, ("mlp_in",))["mlp_in"][:, 1:]
            counts.append((model_sae(act.reshape(-1, act.shape[-1]) * scale)[1] > 0).sum(0).double())
    compared = counts[0] >= analyze.PERSISTENCE_MIN_FIRINGS
    ratio = counts[1][compared] / counts[0][compared]
    assert tuned["persistence"]["compared"] == int(compared.sum()) > 10
    assert tuned["persistence"]["within_2x"] == pytest.approx(((ratio >= 0.5) & (ratio <= 2)).double().mean().item(), abs=0.02)
    assert tuned["persistence"]["within_2x"] < 1.0  # the fine-tune moved some features
    r = run_sae("--mode=persistence", f"--out_dir={run}")
    assert r.returncode == 1 and r.stderr.strip() == ("error: --mode=persistence needs --eval_model=DIR: the model (e.g. "
                                                      "a fine-tune) to score the SAE on")
    assert len(open(run / "log.jsonl").readlines()) == len(log)  # nothing written


# -----------------------------------------------------------------------------
# feature overlap: how many features peak on the same token as another

def test_top_token_overlap_against_a_loop_over_features():
    """A random relu SAE on random rows with tokens from a small vocabulary (so peaks collide): each counted feature's
    peak token recomputed by sorting its column, and the shares counted by hand."""
    g = torch.Generator().manual_seed(0)
    model = SAE(7, 29, arch="relu")
    model.W_enc.data = torch.randn(7, 29, generator=g)
    model.b_enc.data = torch.linspace(-12, 0, 29)  # the first features fire rarely: below the count
    rows, tokens = torch.randn(3001, 7, generator=g), torch.randint(0, 6, (3001,), generator=g)
    rows[tokens == 2] += 4 * model.W_enc.data[:, 28] / model.W_enc.data[:, 28].norm()  # feature 28: a token-2 feature
    result = analyze.top_token_overlap(model, rows, tokens, top=10, batch=256)  # batches of 256: the merge is tested
    f = model(rows).f
    peaks, shares = {}, {}
    for i in range(29):
        column = f[:, i]
        if (column > 0).sum() >= 10:
            top_rows = sorted(range(len(column)), key=lambda r: -column[r].item())[:10]
            votes = [tokens[r].item() for r in top_rows]
            peaks[i] = min(set(votes), key=lambda t: (-votes.count(t), t))  # the most common, the smallest on a tie
            shares[i] = votes.count(peaks[i]) / 10
    shared = sum(1 for i in peaks if sum(p == peaks[i] for p in peaks.values()) > 1)
    assert 5 < result["features"] == len(peaks) < 29
    assert result["shared_peak"] == pytest.approx(shared / len(peaks))
    assert result["distinct_peaks"] == pytest.approx(len(set(peaks.values())) / len(peaks))
    assert 0 < result["shared_peak"] < 1  # the case is not degenerate
    assert result["peak_share"] == pytest.approx(sum(shares.values()) / len(shares))
    assert result["single_token"] == pytest.approx(sum(v == 1 for v in shares.values()) / len(shares))
    assert shares[28] == 1 and 0 < result["single_token"] < 1
    assert result["shared_peak_subset"] is None  # fewer features than the subsets' 1,000
    # in subsets of 5 counted features (in feature order), drawn as the function draws them, 3 sets
    counted = sorted(peaks)
    subsets = [[counted[j] for j in torch.randperm(len(counted), generator=torch.Generator().manual_seed(i))[:5]]
               for i in range(3)]
    by_hand = sum(sum(1 for i in s if sum(peaks[j] == peaks[i] for j in s) > 1) / 5 for s in subsets) / 3
    result = analyze.top_token_overlap(model, rows, tokens, top=10, batch=256, subset=(5, 3))
    assert result["shared_peak_subset"] == pytest.approx(by_hand)


def test_overlap_mode_writes_each_runs_numbers(tiny_shards, tmp_path):
    """--mode=overlap on a sweep of two SAEs of a random GPT-2: overlap.json in each run, the table printed."""
    out = tmp_path / "runs"
    r = run_sae(*TINY_GPT_RUN, f"--data_dir={tiny_shards}", "--arch=relu,topk", "--k=4", "--max_iters=20",
                "--eval_interval=20", "--resample_iters=()", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    r = run_sae("--mode=overlap", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    for name in ("relu", "topk"):
        result = json.load(open(out / name / "overlap.json"))
        assert result["val_rows"] == 256 // 32 * 31 and result["iter"] == 20 and 0 <= result["shared_peak"] <= 1
        assert str(out / name) in r.stdout
