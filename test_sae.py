"""
Correctness tests, all on the CPU and offline: `TRITON_INTERPRET=1 python -m pytest -q test_sae.py`.

References are independent of the code under test: tiktoken and the raw JSON for prepare.py,
transformers' GPT2LMHeadModel for our GPT-2, numpy reads of the shard bytes for the loader.
Tests that need ../shared (tokenizer files, text sample) skip without it.
"""
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

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared"
TEXT_GLOB = str(SHARED / "data" / "text" / "*.jsonl")
needs_shared = pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data is missing (a user's clone)")

import prepare  # noqa: E402  (after the path constants: both are plain imports, no work done)
import sae  # noqa: E402
import kernels  # noqa: E402
from kernels import JL_EPS, jl_penalty_ref  # noqa: E402
from sae import DataLoaderLite, GPT, GPTConfig, SAE, SITES, TrainConfig, parse_args  # noqa: E402


# -----------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="session")
def enc(tmp_path_factory):
    """tiktoken's gpt2 encoding from ../shared/data/gpt2, installed into a fresh cache directory."""
    if not (SHARED / "data" / "gpt2").is_dir():
        pytest.skip("../shared/data/gpt2 is missing: no offline tiktoken files")
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    subprocess.run(["bash", str(SHARED / "data/gpt2/install_tiktoken_cache.sh"), str(cache)], check=True,
                   capture_output=True)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)  # for this process and the prepare.py subprocesses
    import tiktoken
    return tiktoken.get_encoding("gpt2")


def run_prepare(*args, env=None):
    """Runs prepare.py as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(HERE / "prepare.py"), *args], capture_output=True, text=True,
                          cwd=HERE, env={**os.environ, **(env or {})}, timeout=300)


def shard_files(out_dir):
    return sorted(glob.glob(os.path.join(out_dir, "*.bin")), key=lambda p: p.rsplit("_", 1)[1])  # by index


def read_shard_numpy(path):
    """An independent reader of llm.c's format: 256 int32 header, then uint16 tokens."""
    raw = open(path, "rb").read()
    header = np.frombuffer(raw[:1024], dtype=np.int32)
    tokens = np.frombuffer(raw[1024:], dtype=np.uint16)
    assert (header[0], header[1], header[2]) == (20240520, 1, len(tokens))
    return tokens


def reference_tokens(enc, texts):
    return np.concatenate([[50256] + enc.encode_ordinary(t) for t in texts]).astype(np.uint16)


def jsonl_texts():
    texts = []
    for path in sorted(glob.glob(TEXT_GLOB)):
        with open(path, encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts


# -----------------------------------------------------------------------------
# prepare.py

@needs_shared
def test_prepare_shards_decode_to_documents(enc, tmp_path):
    out = tmp_path / "shards"
    r = run_prepare(f"--input={TEXT_GLOB}", f"--out_dir={out}", "--shard_size=300000", "--val_tokens=100000")
    assert r.returncode == 0, r.stderr
    files = shard_files(out)
    names = [os.path.basename(f) for f in files]
    assert names == ["local_val_000000.bin"] + [f"local_train_{i:06d}.bin" for i in range(1, 5)]
    shards = [read_shard_numpy(f) for f in files]
    assert len(shards[0]) == 100_000 and all(len(s) == 300_000 for s in shards[1:-1])
    stream = np.concatenate(shards)
    texts = jsonl_texts()
    np.testing.assert_array_equal(stream, reference_tokens(enc, texts))  # 1,038,587 tokens, the README's count
    # split at the EOTs: every document decodes back to its text, and each has an EOT in front
    starts = np.flatnonzero(stream == 50256)
    assert len(starts) == len(texts) and starts[0] == 0
    for doc, text in zip(np.split(stream, starts[1:]), texts):
        assert enc.decode(doc[1:].tolist()) == text


@needs_shared
def test_prepare_rerun_changes_nothing_and_budget(enc, tmp_path):
    out = tmp_path / "shards"
    args = (f"--input={TEXT_GLOB}", f"--out_dir={out}", "--shard_size=50000", "--val_tokens=20000", "--tokens=123456")
    assert run_prepare(*args).returncode == 0
    before = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in glob.glob(f"{out}/*")}
    r = run_prepare(*args)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    after = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in glob.glob(f"{out}/*")}
    assert after == before
    stream = np.concatenate([read_shard_numpy(f) for f in shard_files(out)])
    np.testing.assert_array_equal(stream, reference_tokens(enc, jsonl_texts())[:123456])
    # other settings on the same out_dir are refused rather than mixed in
    r = run_prepare(*args[:-1], "--tokens=200000")
    assert r.returncode == 1 and "other settings (tokens differ)" in r.stderr


# a wrapper that runs prepare.main and dies (SIGKILL, or Ctrl-C) in the middle of writing the 3rd shard
DIE_WRITING_SHARD = """
import os, signal, sys
import prepare
calls, write_shard = [0], prepare.write_shard
def dying_write_shard(path, tokens):
    calls[0] += 1
    if calls[0] == 3:
        open(path + ".tmp", "wb").write(b"half a shard")
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise KeyboardInterrupt
    write_shard(path, tokens)
prepare.write_shard = dying_write_shard
prepare.main(sys.argv[2:])
"""


@needs_shared
@pytest.mark.parametrize("how", ["kill", "interrupt"])
def test_prepare_killed_run_leaves_no_partial_shard_and_resumes(enc, tmp_path, how):
    out = tmp_path / "shards"
    args = [f"--input={TEXT_GLOB}", f"--out_dir={out}", "--shard_size=70001", "--val_tokens=30011", "--tokens=400000"]
    r = subprocess.run([sys.executable, "-c", DIE_WRITING_SHARD, how, *args], cwd=HERE, capture_output=True,
                       text=True, timeout=300)
    if how == "kill":
        assert r.returncode == -signal.SIGKILL
    else:
        assert r.returncode == 130 and "rerun the same command to continue" in r.stderr
    files = shard_files(out)
    assert len(files) == 2  # shards 0 and 1 complete; shard 2 only ever existed under a temporary name
    for f in files:
        read_shard_numpy(f)  # every final name holds a complete, valid shard
    r = run_prepare(*args)  # resumes after the complete shards
    assert r.returncode == 0, r.stderr
    stream = np.concatenate([read_shard_numpy(f) for f in shard_files(out)])
    np.testing.assert_array_equal(stream, reference_tokens(enc, jsonl_texts())[:400000])


@needs_shared
def test_prepare_reads_txt_json_and_parquet(enc, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = ["Hello world.", "A second document,\nwith two lines.", "Ünïcödé — and <|endoftext|> as plain text"]
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(texts[0], encoding="utf-8")  # a .txt file is one document
    (src / "b.json").write_text(json.dumps([{"body": texts[1]}]), encoding="utf-8")  # a JSON array
    pq.write_table(pa.table({"body": [texts[2]], "other": [1]}), src / "c.parquet")
    out = tmp_path / "shards"
    r = run_prepare(f"--input={src}/*", f"--out_dir={out}", "--text_field=body", "--val_tokens=5")
    assert r.returncode == 0, r.stderr
    stream = np.concatenate([read_shard_numpy(f) for f in shard_files(out)])
    np.testing.assert_array_equal(stream, reference_tokens(enc, texts))


def bad_input(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    return path


@needs_shared
@pytest.mark.parametrize("case", ["no_match", "not_utf8", "bad_json", "missing_field", "bad_parquet", "hub_offline"])
def test_prepare_bad_input_is_one_line(enc, tmp_path, case):
    env = {}
    if case == "no_match":
        args, expect = [f"--input={tmp_path}/nothing_*.jsonl"], "no file matches"
    elif case == "not_utf8":
        path = bad_input(tmp_path, "latin1.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n')
        args, expect = [f"--input={path}"], f"{path}:3: not UTF-8"
    elif case == "bad_json":
        path = bad_input(tmp_path, "broken.jsonl", b'{"text": "ok"}\n{"text": "no closing brace"\n')
        args, expect = [f"--input={path}"], f"{path}:2: not valid JSON"
    elif case == "missing_field":
        path = bad_input(tmp_path, "fields.jsonl", b'{"text": "ok"}\n{"content": "wrong field"}\n')
        args, expect = [f"--input={path}"], f"{path}:2: no text field 'text' (found ['content'])"
    elif case == "bad_parquet":
        path = bad_input(tmp_path, "broken.parquet", b"this is not parquet")
        args, expect = [f"--input={path}"], f"{path}: not a readable parquet file"
    else:  # the Hub cannot be reached: HF_HUB_OFFLINE makes datasets fail at once instead of retrying
        args, expect = [], "could not reach the Hugging Face Hub for dataset 'HuggingFaceFW/fineweb'"
        env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    r = run_prepare(*args, f"--out_dir={tmp_path / 'out'}", env=env)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == errors[0]  # the last thing printed, on a line of its own
    if case == "hub_offline":
        assert "--input" in errors[0]
    assert not glob.glob(f"{tmp_path / 'out'}/*.bin")


# -----------------------------------------------------------------------------
# GPT-2 against transformers, in both checkpoint layouts

transformers = pytest.importorskip("transformers")

TINY = dict(n_layer=3, n_head=3, n_embd=48, vocab_size=301, n_positions=64)       # no power of two
FULL_WIDTH = dict(n_layer=2, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)


def hf_gpt2(**kw):
    torch.manual_seed(0)
    config = transformers.GPT2Config(**kw, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"  # the textbook attention: independent of our SDPA call
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's init leaves biases and LayerNorms at 0 and 1: randomize all for a real test
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def save_hub_style(model, directory):
    """The Hub's original gpt2 layout: unprefixed keys, attn.bias / attn.masked_bias buffers, a .bin file."""
    os.makedirs(directory, exist_ok=True)
    model.config.to_json_file(os.path.join(directory, "config.json"))
    sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    n = model.config.n_positions
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, os.path.join(directory, "pytorch_model.bin"))


@pytest.fixture(scope="module", params=["tiny", "full_width"])
def checkpoints(request, tmp_path_factory):
    """(transformers model, save_pretrained directory, Hub-style directory) for one config."""
    hf = hf_gpt2(**(TINY if request.param == "tiny" else FULL_WIDTH))
    root = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(root / "save_pretrained")
    save_hub_style(hf, root / "hub_style")
    return hf, root / "save_pretrained", root / "hub_style"


@pytest.mark.parametrize("layout", ["save_pretrained", "hub_style"])
def test_gpt2_logits_match_transformers(checkpoints, layout):
    hf, saved, hub = checkpoints
    assert os.listdir(saved).count("model.safetensors") == 1 and os.path.exists(hub / "pytorch_model.bin")
    model = GPT.from_pretrained(str(saved if layout == "save_pretrained" else hub))
    idx = torch.randint(0, hf.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=0)


def hf_site_activation(hf, idx, layer, site):
    """The activation at (layer, site) in transformers' model, taken with forward hooks."""
    block, seen = hf.transformer.h[layer], {}
    hooks = {  # site -> (module, take the input (pre-hook) or the output)
        "resid_pre": (block, "in"), "resid_mid": (block.ln_2, "in"), "mlp_in": (block.ln_2, "out"),
        "mlp_hidden": (block.mlp.act, "out"), "mlp_out": (block.mlp, "out"), "resid_post": (block, "out"),
    }
    module, where = hooks[site]
    def keep(tensor_or_tuple):  # hooks must return None, or they replace what they see
        seen["a"] = tensor_or_tuple[0] if isinstance(tensor_or_tuple, tuple) else tensor_or_tuple
    if where == "in":
        handle = module.register_forward_pre_hook(
            lambda m, args, kwargs: keep(args if args else kwargs["hidden_states"]), with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda m, args, out: keep(out))
    with torch.no_grad():
        hf(idx)
    handle.remove()
    return seen["a"]


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("layer", [0, 1])  # the middle and the last block of the full-width config
def test_harvest_matches_transformers_hooks(checkpoints, site, layer):
    hf, saved, _ = checkpoints
    model = GPT.from_pretrained(str(saved))
    idx = torch.randint(0, hf.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        act = model.harvest(idx, layer, site)
    width = 4 * hf.config.n_embd if site == "mlp_hidden" else hf.config.n_embd
    assert act.shape == (2, 21, width)
    torch.testing.assert_close(act, hf_site_activation(hf, idx, layer, site), atol=1e-4, rtol=0)


# the module that computes each site last: harvesting must call exactly the modules of a full forward
# up to it, and none after
LAST_MODULE = {"resid_mid": "h.{L}.attn.c_proj", "mlp_in": "h.{L}.ln_2", "mlp_hidden": "h.{L}.mlp.c_fc",
               "mlp_out": "h.{L}.mlp.c_proj", "resid_post": "h.{L}.mlp.c_proj", "resid_pre": "h.{P}.mlp.c_proj"}


def module_calls(model, fn):
    calls = []
    handles = [m.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
               for name, m in model.named_modules() if not list(m.children())]
    with torch.no_grad():
        fn()
    for h in handles:
        h.remove()
    return calls


@pytest.mark.parametrize("site", SITES)
def test_harvest_computes_nothing_past_the_site(site):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=2, n_embd=20, vocab_size=50, block_size=16)).eval()
    idx = torch.randint(0, 50, (1, 9))
    full = module_calls(model, lambda: model(idx))
    layer = 2
    harvested = module_calls(model, lambda: model.harvest(idx, layer, site))
    last = LAST_MODULE[site].format(L=layer, P=layer - 1)
    assert harvested == full[:full.index(last) + 1]


def test_harvest_at_the_middle_is_about_half_a_forward(monkeypatch):
    """FLOPs counted by torch, not timed: stopping at layer 6 of 12 skips the upper half and the unembedding."""
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setattr(kernels, "ONEDNN", False)  # torch's counter sees aten's matmuls, not oneDNN's op
    model = GPT(GPTConfig()).eval()  # GPT-2 small's shape, random weights
    idx = torch.randint(0, 50257, (1, 64))
    def flops(fn):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()
    full = flops(lambda: model(idx))
    per_block = flops(lambda: model.harvest(idx, 1, "resid_pre"))  # exactly block 0
    harvest = flops(lambda: model.harvest(idx, 6, "mlp_in"))
    unembed = 2 * 64 * 768 * 50257
    assert full == 12 * per_block + unembed
    assert 6 * per_block < harvest < 7 * per_block  # six blocks and layer 6's attention
    assert 0.3 < harvest / full < 0.5


def test_bad_layer_and_site_are_clear_errors():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=8, vocab_size=10, block_size=8))
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"layer 2 is out of range: the model has layers 0\.\.1"):
        model.harvest(idx, 2, "mlp_in")
    with pytest.raises(ValueError, match="unknown site 'mlp_mid'; valid sites: resid_pre"):
        model.harvest(idx, 0, "mlp_mid")


def test_unexpected_and_missing_keys_are_named(tmp_path):
    hf = hf_gpt2(**TINY)
    save_hub_style(hf, tmp_path)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    sd["h.0.attn.extra"] = torch.zeros(1)
    del sd["ln_f.bias"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing keys \['ln_f.bias'\], unexpected keys \['h.0.attn.extra'\]"):
        GPT.from_pretrained(str(tmp_path))


def test_offline_hub_model_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_home")}
    r = subprocess.run([sys.executable, "sae.py", "--init_from=gpt2"], cwd=HERE, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "could not fetch GPT-2 'gpt2'" in lines[0] and "local directory" in lines[0], r.stderr


# -----------------------------------------------------------------------------
# token loader

def write_test_shards(directory, lengths):
    """Shards of consecutive integers, so every token says where it came from."""
    start = 0
    for i, n in enumerate(lengths):
        prepare.write_shard(prepare.shard_path(str(directory), "t", i), np.arange(start, start + n, dtype=np.uint16))
        start += n


def test_loader_ranks_stride_disjointly_and_wrap(tmp_path):
    write_test_shards(tmp_path, [10, 100, 60])  # val, train 1, train 2
    B, T, W = 2, 5, 2
    loaders = [DataLoaderLite(str(tmp_path), "train", B, T, rank, W) for rank in range(W)]
    seen = [torch.cat([loader.next_batch().flatten() for _ in range(8)]) for loader in loaders]
    # one epoch: shard 1 gives 5 steps of 2 ranks (100 tokens), shard 2 gives 3 (60 tokens); then wraps
    epoch = torch.cat([seen[r][i * 10:(i + 1) * 10] for i in range(8) for r in range(W)])
    assert torch.equal(epoch[:160], torch.arange(10, 170))
    assert torch.equal(seen[0][:10], torch.arange(10, 20)) and torch.equal(seen[1][:10], torch.arange(20, 30))
    val = DataLoaderLite(str(tmp_path), "val", 1, 10)
    assert torch.equal(val.next_batch(), torch.arange(10).view(1, 10))


def test_loader_resumes_at_the_same_tokens(tmp_path):
    write_test_shards(tmp_path, [10, 97, 61])  # odd lengths: steps end mid-shard
    loader = DataLoaderLite(str(tmp_path), "train", 3, 4)
    for _ in range(9):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(20)]
    resumed = DataLoaderLite(str(tmp_path), "train", 3, 4)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch()) for a in expected)


@pytest.mark.parametrize("damage", ["magic", "truncated"])
def test_loader_rejects_a_bad_header_with_a_hint(tmp_path, damage):
    write_test_shards(tmp_path, [10, 100])
    path = prepare.shard_path(str(tmp_path), "t", 1)
    raw = bytearray(open(path, "rb").read())
    if damage == "magic":
        raw[0:4] = np.int32(12345).tobytes()
    else:
        raw = raw[:-6]
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="HINT: re-run prepare.py"):
        DataLoaderLite(str(tmp_path), "train", 2, 5)


# -----------------------------------------------------------------------------
# configurator

def test_parse_args_types_and_unknown_keys(tmp_path):
    cfg = parse_args(TrainConfig(), ["--layer=3", "--site=mlp_out", "--init_from=./dir", "--lr=1", "--resample_iters=[5]"])
    assert (cfg.layer, cfg.site, cfg.init_from, cfg.lr, cfg.resample_iters) == (3, "mlp_out", "./dir", 1.0, (5,))
    config_file = tmp_path / "exp.py"
    config_file.write_text("layer = 9\nbuffer_tokens = 2**14  # a comment\n")
    assert parse_args(TrainConfig(), [str(config_file), "--layer=2"]).__dict__ == {
        **TrainConfig().__dict__, "layer": 2, "buffer_tokens": 16384}
    with pytest.raises(ValueError, match="unknown config key 'layr'; valid keys: acts, b_dec_init"):
        parse_args(TrainConfig(), ["--layr=3"])
    with pytest.raises(ValueError, match="expected int, got str"):
        parse_args(TrainConfig(), ["--layer=six"])


def test_experiment_configs_parse_and_check():
    """Every config/*.py is valid: known keys, right types, each SAE of its sweep a valid config."""
    names = {}
    for path in sorted(glob.glob(str(HERE / "config" / "*.py"))):
        for name, run in sae.expand_sweep(sae.parse_overrides(TrainConfig(), [path])):
            sae.check_config(sae.replace(TrainConfig(), **run))
            names.setdefault(Path(path).stem, []).append(name)
    assert names["gpt2_compare"] == ["l1", "jl", "hybrid"] and len(names["gpt2_sweep_hybrid"]) == 9


# -----------------------------------------------------------------------------
# the SAE: losses, JL, decoder norms, resampling

def test_losses_against_hand_computation():
    torch.manual_seed(0)
    model = SAE(5, 7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(4, 5)
    cfg = TrainConfig(loss="hybrid", l1_coeff=0.3, l1_warmup_iters=10, jl_coeff=2.0, jl_warmup_mult=5.0, jl_warmup_iters=8)
    loss, terms, fired = sae.sae_loss(model, x, cfg, it=4)
    # by hand, with Python floats and loops
    W_enc, b_enc, W_dec, b_dec = (p.detach().double().tolist() for p in (model.W_enc, model.b_enc, model.W_dec, model.b_dec))
    mse = l1 = l0 = 0.0
    fired_by_hand = [0] * 7
    for row in x.double().tolist():
        feats = [max(0.0, sum((row[i] - b_dec[i]) * W_enc[i][j] for i in range(5)) + b_enc[j]) for j in range(7)]
        recon = [sum(feats[j] * W_dec[j][i] for j in range(7)) + b_dec[i] for i in range(5)]
        mse += sum((recon[i] - row[i]) ** 2 for i in range(5)) / 4
        l1 += sum(feats) / 4
        l0 += sum(v > 0 for v in feats) / 4
        fired_by_hand = [n + (v > 0) for n, v in zip(fired_by_hand, feats)]
    assert fired.tolist() == fired_by_hand and terms["l0"].item() == pytest.approx(l0)
    rows = [[v / sum(u * u for u in r) ** 0.5 for v in r] for r in W_dec]
    jl = sum(np.arctanh(min(abs(sum(a * b for a, b in zip(rows[i], rows[j]))), 1 - JL_EPS))
             for i in range(7) for j in range(7) if i != j) / 42
    l1_coeff = 0.3 * 5 / 10                      # linear warmup: iteration 4 is the 5th of 10
    jl_coeff = 2.0 * (1 + 4 * 0.5 * (1 + np.cos(np.pi * 4 / 8)))  # cosine from 5x to 1x over 8 iterations: 3x at 4
    assert terms["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert terms["l1"].item() == pytest.approx(l1, rel=1e-5)
    assert terms["jl"].item() == pytest.approx(jl, rel=1e-5)
    assert loss.item() == pytest.approx(mse + l1_coeff * l1 + jl_coeff * jl, rel=1e-5)
    assert sae.jl_coeff_at(cfg, 0) == pytest.approx(10.0) and sae.jl_coeff_at(cfg, 100) == pytest.approx(2.0)
    l1_only = sae.sae_loss(model, x, TrainConfig(loss="l1", l1_coeff=0.3, l1_warmup_iters=1), it=0)[0]
    jl_only = sae.sae_loss(model, x, TrainConfig(loss="jl", jl_coeff=2.0, jl_warmup_iters=1), it=5)[0]
    assert l1_only.item() == pytest.approx(mse + 0.3 * l1, rel=1e-5)
    assert jl_only.item() == pytest.approx(mse + 2.0 * jl, rel=1e-5)


def test_lr_schedules():
    cfg = TrainConfig(max_iters=100, warmup_iters=10, decay="linear", decay_frac=0.2)
    assert [sae.get_lr_mult(cfg, i) for i in (0, 9, 10, 79, 80, 90, 100)] == pytest.approx([0.1, 1, 1, 1, 1, 0.5, 0])
    cfg = TrainConfig(max_iters=110, warmup_iters=10, decay="cosine", min_lr_frac=0.1)
    assert [sae.get_lr_mult(cfg, i) for i in (10, 60, 110)] == pytest.approx([1.0, 0.55, 0.1])


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


def test_decoder_rows_stay_unit_norm_and_gradient_is_orthogonal():
    torch.manual_seed(0)
    model = SAE(13, 29)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cfg = TrainConfig(loss="hybrid", l1_coeff=0.1, jl_coeff=1.0)
    for it in range(20):
        loss, _, _ = sae.sae_loss(model, torch.randn(16, 13), cfg, it)
        opt.zero_grad()
        loss.backward()
        model.remove_parallel_grad_()
        assert (model.W_dec.grad * model.W_dec).sum(dim=1).abs().max() < 1e-5  # no component along a row
        opt.step()
        model.unit_norm_decoder_()
        torch.testing.assert_close(model.W_dec.norm(dim=1), torch.ones(29), atol=1e-6, rtol=0)


def test_resampling_touches_only_dead_features_and_resets_their_adam_state():
    torch.manual_seed(0)
    model = SAE(6, 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):  # fill Adam's moments
        loss = sae.sae_loss(model, torch.randn(8, 6), TrainConfig(l1_coeff=0.1), 5)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    moments = {name: {m: opt.state[p][m].clone() for m in ("exp_avg", "exp_avg_sq")} for name, p in model.named_parameters()}
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[2, 7]] = True
    x = torch.randn(50, 6) * 1e-3
    x[17] = torch.tensor([3.0, -4.0, 0.0, 12.0, 0.0, 0.0]) * 100  # by far the largest error: always picked
    assert sae.resample_dead_(model, opt, dead, x) == 2
    v = x[17] / x[17].norm()
    alive_norm = before["W_enc"][:, ~dead].norm(dim=0).mean()
    for j in range(10):
        if dead[j]:
            torch.testing.assert_close(model.W_dec[j], v)
            torch.testing.assert_close(model.W_enc[:, j], v * 0.2 * alive_norm)
            assert model.b_enc[j] == 0
        else:
            assert torch.equal(model.W_dec[j], before["W_dec"][j]) and torch.equal(model.W_enc[:, j], before["W_enc"][:, j])
            assert model.b_enc[j] == before["b_enc"][j]
    assert torch.equal(model.b_dec, before["b_dec"])
    for name, p in model.named_parameters():
        for m in ("exp_avg", "exp_avg_sq"):
            now, then = opt.state[p][m], moments[name][m]
            mask = {"W_dec": dead[:, None], "W_enc": dead[None, :], "b_enc": dead,
                    "b_dec": torch.zeros(1, dtype=torch.bool)}[name].expand_as(now)
            assert (now[mask] == 0).all() and torch.equal(now[~mask], then[~mask])


def test_feature_tracker_window_and_restart():
    tracker = sae.FeatureTracker(3, window=100, chunks=4)  # chunks of 25 tokens
    for step in range(8):  # 8 x 20 tokens; feature 0 fires always, feature 1 only in the first step
        tracker.update(torch.tensor([20, 20 if step == 0 else 0, 0]), 20)
    assert tracker.dead().tolist() == [False, True, True]
    assert tracker.freq()[0] == 1.0
    tracker.restart_(torch.tensor([False, True, False]))
    assert tracker.dead().tolist() == [False, False, True]  # just resampled: not dead until a window passes


# -----------------------------------------------------------------------------
# training runs, through the command line

def cpu_env():
    """The environment without TRITON_INTERPRET: whole runs use the CPU paths, not the (slow) interpreter;
    the kernels are tested directly."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_sae(*args, launcher=None, timeout=600):
    """Runs sae.py as a user would on a CPU."""
    cmd = (launcher or [sys.executable]) + [str(HERE / "sae.py"), *map(str, args)]
    env = cpu_env()
    return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A (N, d) activation file from a known dictionary of 96 directions in 48 dimensions, 4 active per row."""
    X, D = sae.synthetic_activations(n=40000, d=48, n_true=96, k=4, seed=0)
    path = tmp_path_factory.mktemp("acts") / "acts.npy"
    np.save(path, X)
    return path, D


ACTS_RUN = ["--d_sae=192", "--batch_size=512", "--lr=0.003", "--l1_coeff=1.0", "--l1_warmup_iters=100",
            "--eval_tokens=4000", "--log_interval=100", "--dead_window=20000"]


def load_ckpt(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", weights_only=True)


def test_acts_recovers_a_known_sparse_dictionary(synthetic, tmp_path):
    path, D = synthetic
    r = run_sae(f"--acts={path}", f"--out_dir={tmp_path}", *ACTS_RUN, "--max_iters=1500", "--eval_interval=500",
                "--resample_iters=()")
    assert r.returncode == 0, r.stderr
    W = torch.nn.functional.normalize(load_ckpt(tmp_path)["sae"]["W_dec"], dim=1)
    max_cos = (torch.from_numpy(D) @ W.T).max(dim=1).values  # (96,): each true direction's best learned row
    assert max_cos.mean() >= 0.9, max_cos.mean()
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [e["iter"] for e in log] == [0, 500, 1000, 1500] and "ce_clean" not in log[-1]  # no downstream with --acts
    assert log[-1]["fvu"] < 0.2 < log[0]["fvu"]


@pytest.mark.parametrize("source", ["acts", "gpt"])
def test_resume_continues_exactly(source, synthetic, tiny_shards, tmp_path):
    if source == "acts":
        args = [f"--acts={synthetic[0]}", *ACTS_RUN, "--loss=hybrid", "--jl_warmup_iters=10", "--resample_iters=(30,)",
                "--dead_window=2048", "--eval_interval=20"]
    else:
        args = [*TINY_GPT_RUN, f"--data_dir={tiny_shards}", "--resample_iters=(30,)", "--eval_interval=20"]
    full, half = tmp_path / "full", tmp_path / "half"
    assert run_sae(*args, f"--out_dir={full}", "--max_iters=40").returncode == 0
    assert run_sae(*args, f"--out_dir={half}", "--max_iters=20").returncode == 0
    r = run_sae("--init_from=resume", f"--out_dir={half}", "--max_iters=40")
    assert r.returncode == 0, r.stderr
    a, b = load_ckpt(full), load_ckpt(half)
    assert a["iter_num"] == b["iter_num"] == 40
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(a["sae"][key], b["sae"][key]), key
    assert a["data"] == b["data"] and torch.equal(a["tracker"]["counts"], b["tracker"]["counts"])
    log_full = [json.loads(line) for line in open(full / "log.jsonl")]
    log_half = [json.loads(line) for line in open(half / "log.jsonl")]
    assert log_full == log_half  # evaluations at 0, 20 and 40, the same numbers


@pytest.mark.parametrize("loss,names", [("hybrid", [""]), ("l1,hybrid", ["l1", "hybrid"])])
def test_two_gloo_processes_match_one(loss, names, synthetic, tmp_path):
    # 10 steps: the ranks' matmuls of half the batch round differently from one matmul of all of it (by 1e-7),
    # and over a few dozen steps at lr 3e-3 Adam's normalisation grows that in entries whose gradient is near 0
    args = [f"--acts={synthetic[0]}", *ACTS_RUN, f"--loss={loss}", "--max_iters=10", "--eval_interval=10",
            "--resample_iters=()"]
    assert run_sae(*args, f"--out_dir={tmp_path / 'one'}").returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = run_sae(*args, f"--out_dir={tmp_path / 'two'}", "--device=cpu", launcher=torchrun)
    assert r.returncode == 0, r.stderr
    for name in names:
        a, b = load_ckpt(tmp_path / "one" / name), load_ckpt(tmp_path / "two" / name)
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):  # the same global batch; only the summation order differs
            torch.testing.assert_close(a["sae"][key], b["sae"][key], atol=1e-5, rtol=1e-4)
    assert r.stdout.count("eval    10") == len(names)  # rank 0 alone logs, one line per SAE


def test_sweep_flags_expand_to_one_sae_per_combination():
    parse = lambda *argv: sae.parse_overrides(TrainConfig(), argv)
    overrides = parse("--loss=l1,jl,hybrid", "--l1_coeff=[1, 5]", "--jl_coeff=10")
    assert overrides == {"loss": ["l1", "jl", "hybrid"], "l1_coeff": [1.0, 5.0], "jl_coeff": 10.0}
    runs = sae.expand_sweep(overrides)
    # jl reads no l1_coeff: its two combinations are one SAE
    assert [name for name, _ in runs] == ["l1-l1_coeff1.0", "l1-l1_coeff5.0", "jl", "hybrid-l1_coeff1.0",
                                          "hybrid-l1_coeff5.0"]
    assert runs[4][1] == {"loss": "hybrid", "l1_coeff": 5.0, "jl_coeff": 10.0}
    assert sae.expand_sweep(parse("--loss=l1", "--jl_coeff=[1, 2]")) == [("", {"loss": "l1", "jl_coeff": 1.0})]
    assert parse("--lr=[1e-4]", "--l1_coeff=(5, 5, 1)") == {"lr": 1e-4, "l1_coeff": [5.0, 1.0]}  # repeats dropped
    with pytest.raises(ValueError, match=r"--max_iters=\[1, 2\]: expected int, got list"):
        parse("--max_iters=[1, 2]")  # not SWEEPABLE: the SAEs of a sweep share the data
    with pytest.raises(ValueError, match="one value only here"):
        sae.parse_args(TrainConfig(), ["--lr=[1e-4, 1e-3]"])


@pytest.mark.parametrize("source", ["acts", "gpt"])
def test_sweep_trains_each_sae_as_if_alone_and_resumes(source, synthetic, tiny_shards, tmp_path):
    """Several SAEs on one stream of batches: each ends bit for bit where its own run would, with the same
    evaluations (the shared clean and ablated forwards included), and the sweep resumes exactly."""
    if source == "acts":
        args = [f"--acts={synthetic[0]}", *ACTS_RUN, "--jl_warmup_iters=10", "--resample_iters=(30,)",
                "--dead_window=2048", "--eval_interval=20"]
    else:
        args = [*TINY_GPT_RUN, f"--data_dir={tiny_shards}", "--resample_iters=(30,)", "--eval_interval=20"]
    sweep, names = ["--loss=l1,hybrid", "--jl_coeff=[10, 100]"], ["l1", "hybrid-jl_coeff10.0", "hybrid-jl_coeff100.0"]
    full, half = tmp_path / "full", tmp_path / "half"
    r = run_sae(*args, *sweep, f"--out_dir={full}", "--max_iters=40")
    assert r.returncode == 0, r.stderr
    assert json.load(open(full / "sweep.json")) == {"names": names, "iter_num": 40}
    for name, alone in (("l1", ["--loss=l1"]), ("hybrid-jl_coeff100.0", ["--loss=hybrid", "--jl_coeff=100"])):
        assert run_sae(*args, *alone, f"--out_dir={tmp_path / name}", "--max_iters=40").returncode == 0
        a, b = load_ckpt(tmp_path / name), load_ckpt(full / name)
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(a["sae"][key], b["sae"][key]), (name, key)
        read = lambda config: {k: v for k, v in config.items() if k not in ("out_dir", *sae.UNUSED_BY[config["loss"]])}
        assert read(a["config"]) == read(b["config"])
        assert open(tmp_path / name / "log.jsonl").read() == open(full / name / "log.jsonl").read()
    assert run_sae(*args, *sweep, f"--out_dir={half}", "--max_iters=20").returncode == 0
    r = run_sae("--init_from=resume", f"--out_dir={half}", "--max_iters=40")
    assert r.returncode == 0, r.stderr
    for name in names:
        a, b = load_ckpt(full / name), load_ckpt(half / name)
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(a["sae"][key], b["sae"][key]), (name, key)
        assert open(full / name / "log.jsonl").read() == open(half / name / "log.jsonl").read()
    # the helpers read one SAE: a sweep's directory is a one-line error naming the choices; --ckpt picks one
    r = run_sae("--mode=export", f"--out_dir={full}", f"--export_dir={tmp_path / 'export'}")
    assert r.returncode == 1 and r.stderr.strip() == (f"error: --mode=export reads one SAE; pass "
                                                      f"--ckpt=<out_dir>/<name>/ckpt.pt, one of {', '.join(names)}")
    r = run_sae("--mode=export", f"--ckpt={full / 'l1' / 'ckpt.pt'}", f"--export_dir={tmp_path / 'export'}")
    assert r.returncode == 0 and (tmp_path / "export" / "sae_weights.safetensors").exists(), r.stderr
    r = run_sae("--init_from=resume", f"--out_dir={half}", "--max_iters=60", "--lr=[1e-3, 1e-4]")
    assert r.returncode == 1 and "cannot change what a saved run sweeps (lr)" in r.stderr


def test_sweep_checkpoint_is_all_or_nothing(tmp_path):
    cfgs = [TrainConfig(out_dir=str(tmp_path / name), loss=name) for name in ("l1", "jl")]
    for cfg in cfgs:
        os.makedirs(cfg.out_dir)
    def checkpoint(cfg, it):
        return {"iter_num": it, "config": sae.asdict(cfg), "sae": {"W": torch.full((3,), float(it))}}
    def ckpt_iters():
        return [torch.load(Path(cfg.out_dir) / "ckpt.pt", weights_only=True)["iter_num"] for cfg in cfgs]
    sae.save_sweep_checkpoint(str(tmp_path), [(cfg, checkpoint(cfg, 10)) for cfg in cfgs], 10)
    assert ckpt_iters() == [10, 10] and not list(tmp_path.glob("*/*.tmp"))
    # killed while writing the next save, before its commit: the save is discarded
    torch.save(checkpoint(cfgs[0], 20), Path(cfgs[0].out_dir) / "ckpt.pt.tmp")
    runs = sae.resolve_runs(["--init_from=resume", f"--out_dir={tmp_path}"])
    assert [c.loss for c, _ in runs] == ["l1", "jl"] and [ck["iter_num"] for _, ck in runs] == [10, 10]
    assert ckpt_iters() == [10, 10] and not list(tmp_path.glob("*/*.tmp"))
    # killed after the commit, before the second rename: resuming completes it
    for cfg in cfgs:
        torch.save(checkpoint(cfg, 30), Path(cfg.out_dir) / "ckpt.pt.tmp")
    json.dump({"names": ["l1", "jl"], "iter_num": 30}, open(tmp_path / "sweep.json", "w"))
    os.replace(Path(cfgs[0].out_dir) / "ckpt.pt.tmp", Path(cfgs[0].out_dir) / "ckpt.pt")
    runs = sae.resolve_runs(["--init_from=resume", f"--out_dir={tmp_path}", "--max_iters=50"])
    assert ckpt_iters() == [30, 30] and [c.max_iters for c, _ in runs] == [50, 50]
    assert [c.out_dir for c, _ in runs] == [cfg.out_dir for cfg in cfgs]
    # a checkpoint that is not at the committed iteration (copied over by hand) is named
    torch.save(checkpoint(cfgs[1], 10), Path(cfgs[1].out_dir) / "ckpt.pt")
    with pytest.raises(ValueError, match=f"{cfgs[1].out_dir}/ckpt.pt is at iter 10, {tmp_path}/sweep.json at 30"):
        sae.resolve_runs(["--init_from=resume", f"--out_dir={tmp_path}"])


# a tiny random GPT-2 from scratch over the offline text sample
TINY_GPT_RUN = ["--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=32", "--layer=1", "--d_sae=96",
                "--batch_size=256", "--buffer_tokens=2048", "--harvest_batch=4", "--block_size=32", "--eval_tokens=256",
                "--log_interval=50", "--dead_window=5000", "--lr=0.001", "--loss=hybrid", "--jl_warmup_iters=20"]


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, enc):
    out = tmp_path_factory.mktemp("tiny_shards")
    r = run_prepare(f"--input={SHARED / 'data/text/fineweb_first300.jsonl'}", f"--out_dir={out}", "--val_tokens=20000",
                    "--shard_size=100000")
    assert r.returncode == 0, r.stderr
    return out


def test_tiny_gpt_training_lowers_the_loss_and_writes_log_and_checkpoint(tiny_shards, tmp_path):
    r = run_sae(*TINY_GPT_RUN, f"--data_dir={tiny_shards}", f"--out_dir={tmp_path}", "--max_iters=300",
                "--eval_interval=100", "--resample_iters=(150,)")
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [e["iter"] for e in log] == [0, 100, 200, 300]
    for key in ("iter", "mse", "fvu", "l0", "l1", "dead_frac", "dense_frac", "mean_max_cos", "ce_clean", "ce_sae",
                "ce_zero", "ce_recovered", "kl"):
        assert all(key in e for e in log), key
    assert log[-1]["mse"] < 0.5 * log[0]["mse"] and log[-1]["fvu"] < log[0]["fvu"]
    assert log[-1]["ce_sae"] <= log[-1]["ce_zero"] + 0.5 and log[-1]["kl"] >= 0
    train_lines = [line for line in r.stdout.splitlines() if line.startswith("iter ")]
    assert all(k in train_lines[-1] for k in ("loss", "mse", "l1", "jl", "l0", "lr", "ms/step", "tok/s"))
    ckpt = load_ckpt(tmp_path)
    shapes = {k: tuple(v.shape) for k, v in ckpt["sae"].items()}
    assert shapes == {"W_enc": (32, 96), "b_enc": (96,), "W_dec": (96, 32), "b_dec": (32,)}
    torch.testing.assert_close(ckpt["sae"]["W_dec"].norm(dim=1), torch.ones(96), atol=1e-5, rtol=0)
    assert {"optimizer", "config", "iter_num", "act_scale", "data", "rng", "tracker", "freq_hist"} <= set(ckpt)
    assert ckpt["freq_hist"]["counts"].sum() + ckpt["freq_hist"]["n_zero"] == 96
    assert not list(tmp_path.glob("*.tmp"))
    # --eval_only evaluates the checkpoint and appends one more line with the same numbers
    r = run_sae("--eval_only=True", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    log2 = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(log2) == 5 and log2[-1] == pytest.approx(log2[-2])


def test_ce_numbers_against_transformers(checkpoints, tiny_shards, tmp_path):
    """ce_clean from the training run's evaluation equals transformers' loss on the same val contexts."""
    hf, saved, _ = checkpoints
    if hf.config.vocab_size < 50257:
        pytest.skip("needs the full vocabulary")
    r = run_sae(f"--init_from={saved}", "--layer=1", "--d_sae=64", "--batch_size=64", "--buffer_tokens=512",
                "--harvest_batch=2", "--block_size=16", "--eval_tokens=64", "--max_iters=1", "--eval_interval=1",
                f"--data_dir={tiny_shards}", f"--out_dir={tmp_path}", "--resample_iters=()")
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    val = torch.from_numpy(read_shard_numpy(glob.glob(f"{tiny_shards}/*_val_*.bin")[0])[:64].astype(np.int64)).view(4, 16)
    with torch.no_grad():
        ce = hf(val, labels=val).loss.item()
    assert log[0]["ce_clean"] == pytest.approx(ce, abs=1e-4)
    assert log[0]["ce_zero"] != pytest.approx(ce, abs=1e-3)


@pytest.mark.parametrize("case", ["unknown_flag", "wrong_type", "unknown_loss", "unknown_loss_in_sweep", "bad_acts",
                                  "nan_loss", "diverged"])
def test_bad_input_is_one_line(case, synthetic, tmp_path):
    acts = [f"--acts={synthetic[0]}", *ACTS_RUN, f"--out_dir={tmp_path}"]
    if case == "unknown_flag":
        r, expect = run_sae("--l1coeff=3"), "unknown config key 'l1coeff'; valid keys: acts"
    elif case == "wrong_type":
        r, expect = run_sae("--max_iters=lots"), "--max_iters='lots': expected int, got str"
    elif case == "unknown_loss":
        r, expect = run_sae(*acts, "--loss=l2"), "--loss='l2': valid values are l1, jl, hybrid"
    elif case == "unknown_loss_in_sweep":
        r, expect = run_sae(*acts, "--loss=l1,l2"), "--loss='l2': valid values are l1, jl, hybrid"
    elif case == "bad_acts":
        np.save(tmp_path / "bad.npy", np.zeros((10, 3, 2), dtype=np.float32))
        r, expect = run_sae(*acts, f"--acts={tmp_path / 'bad.npy'}"), "expected a 2-D float array (N, d_in)"
    elif case == "nan_loss":
        np.save(tmp_path / "nan.npy", np.full((2000, 8), np.nan, dtype=np.float32))
        r = run_sae(*acts, f"--acts={tmp_path / 'nan.npy'}", "--normalize=False", "--b_dec_init=zeros")
        expect = "loss is nan at iter 0; stopping (no checkpoint was written yet)"
    else:  # a good run, then a resumed one with an absurd learning rate: the good checkpoint stays
        assert run_sae(*acts, "--max_iters=10", "--eval_interval=10").returncode == 0
        r = run_sae("--init_from=resume", f"--out_dir={tmp_path}", "--max_iters=20", "--lr=1e30")
        expect = f"stopping (the last good checkpoint is {tmp_path}/ckpt.pt)"
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    if case == "diverged":
        assert load_ckpt(tmp_path)["iter_num"] == 10


# -----------------------------------------------------------------------------
# kernels.py: every path against its reference, at ragged sizes (no dimension a power of two)

interpreted = pytest.mark.skipif(not kernels.INTERPRET, reason="Triton kernels run on the CPU only with TRITON_INTERPRET=1 "
                                 "set before import (the README's test command)")
PATHS = [pytest.param("triton", marks=interpreted), "cpu"]


@pytest.fixture
def path(request, monkeypatch):
    """Selects the dispatch: 'triton' runs the kernels (interpreted), 'cpu' the PyTorch CPU paths."""
    monkeypatch.setattr(kernels, "INTERPRET", request.param == "triton")
    monkeypatch.setattr(kernels, "NO_TRITON", False)
    return request.param


def sae_params(d, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g) * scale).requires_grad_()
            for shape, scale in (((d, s), 0.3), ((s,), 0.1), ((s, d), 0.3), ((d,), 0.1))]


def test_encode_relu_decode_reference_against_numpy_closed_form():
    """The reference's forward against float64 numpy, and its autograd gradients against the closed form."""
    N, d, s = 23, 13, 37
    x = torch.randn(N, d, dtype=torch.float64)
    params = [p.detach().double().requires_grad_() for p in sae_params(d, s)]
    R, Q = torch.randn(N, d, dtype=torch.float64), torch.randn(N, s, dtype=torch.float64)
    x_hat, f = kernels.encode_relu_decode_ref(x, *params)
    ((x_hat * R).sum() + (f * Q).sum()).backward()  # dx_hat = R, df = Q
    W_enc, b_enc, W_dec, b_dec = (p.detach().numpy() for p in params)
    xn, Rn, Qn = x.numpy(), R.numpy(), Q.numpy()
    fn = np.maximum((xn - b_dec) @ W_enc + b_enc, 0)
    np.testing.assert_allclose(f.detach().numpy(), fn, rtol=1e-12)
    np.testing.assert_allclose(x_hat.detach().numpy(), fn @ W_dec + b_dec, rtol=1e-12)
    dpre = (Rn @ W_dec.T + Qn) * (fn > 0)
    expected = {"W_enc": (xn - b_dec).T @ dpre, "b_enc": dpre.sum(0), "W_dec": fn.T @ Rn,
                "b_dec": Rn.sum(0) - W_enc @ dpre.sum(0)}
    for name, p in zip(("W_enc", "b_enc", "W_dec", "b_dec"), params):
        np.testing.assert_allclose(p.grad.numpy(), expected[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("N,d,s", [(37, 45, 83), (5, 24, 100)])
@pytest.mark.parametrize("reads_f", [True, False])  # a loss on f itself, or (as sae_loss) on x_hat and l1 only
def test_encode_relu_decode_matches_reference(path, N, d, s, reads_f):
    x = torch.randn(N, d)
    ref_params, params = sae_params(d, s), sae_params(d, s)
    R, Q, P = torch.randn(N, d), torch.randn(N, s), torch.randn(N)  # upstream gradients for x_hat, f and l1
    outs_ref = kernels.encode_relu_decode_ref(x, *ref_params, stats=True)
    outs = kernels.encode_relu_decode(x, *params, stats=True)
    assert outs[1].grad_fn is not None and "EncodeReluDecode" in type(outs[1].grad_fn).__name__
    for x_hat, f, (l1, _, _) in (outs_ref, outs):
        ((x_hat * R).sum() + (l1 * P).sum() + ((f * Q).sum() if reads_f else 0)).backward()
    # fp32, sums of at most ~100 products: 1e-5 relative covers the summation order of blocked matmuls
    for a, b in zip([*outs[:2], outs[2][0]], [*outs_ref[:2], outs_ref[2][0]]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    active = outs[1].detach() > 0  # f itself is checked against the reference above; the counts are exact
    assert torch.equal(outs[2][1], active.sum(dim=1, dtype=torch.int32))
    assert torch.equal(outs[2][2], active.sum(dim=0, dtype=torch.int32))
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-5)
    assert torch.equal(kernels.encode_relu_decode(x, *params)[1], outs[1])  # without stats: (x_hat, f), the same f


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("act", ["none", "relu", "gelu_tanh"])
def test_cpu_linear_matches_float64(onednn, act, monkeypatch):
    """kernels.linear (oneDNN where it works, else torch) on contiguous and transposed operands, against numpy."""
    if onednn and not kernels.ONEDNN:
        pytest.skip("oneDNN's linear is not available in this torch build")
    monkeypatch.setattr(kernels, "ONEDNN", onednn)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(37, 45, generator=g), torch.randn(83, 45, generator=g), torch.randn(83, generator=g)
    pre = x.double().numpy() @ w.double().numpy().T + b.double().numpy()
    expect = {"none": pre, "relu": np.maximum(pre, 0),
              "gelu_tanh": 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))}[act]
    for xx, ww in ((x, w), (x.T.contiguous().T, w.T.contiguous().T)):  # strided views of the same values
        y = kernels.linear(xx, ww, b, act)
        assert y.shape == (37, 83) and y.dtype == torch.float32
        np.testing.assert_allclose(y.numpy(), expect, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(kernels.linear(x, w).numpy(), x.double().numpy() @ w.double().numpy().T, atol=1e-4)


def test_no_triton_forces_the_references(monkeypatch):
    monkeypatch.setattr(kernels, "NO_TRITON", True)
    x_hat, f = kernels.encode_relu_decode(torch.randn(3, 4), *sae_params(4, 5))
    assert type(f.grad_fn).__name__ == "ReluBackward0"
    W = torch.nn.functional.normalize(torch.randn(6, 4), dim=1).requires_grad_()
    assert "JLPenalty" not in type(kernels.jl_penalty(W).grad_fn).__name__


def unit_rows(n, d, seed=0, duplicate=True):
    W = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)
    if duplicate:  # |cos| = 1 and |cos| = 1 - 1e-7: both past the clamp
        W[5] = W[3]
        W[9] = torch.nn.functional.normalize(W[3] + 1e-4 * torch.randn(d), dim=0)
    return W


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("n,d", [(70, 33), (37, 11), (129, 50)])
def test_jl_penalty_matches_reference(path, n, d):
    W_ref, W = unit_rows(n, d).requires_grad_(), unit_rows(n, d).requires_grad_()
    value_ref, value = jl_penalty_ref(W_ref), kernels.jl_penalty(W)
    assert "JLPenalty" in type(value.grad_fn).__name__
    (3.0 * value_ref).backward()
    (3.0 * value).backward()  # the backward scales the saved gradient
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
    value, grad = kernels._jl_blocked(W, block=block)
    assert value.item() == pytest.approx(jl_penalty_ref(W).item(), rel=1e-12)
    torch.testing.assert_close(grad, Wr.grad, atol=1e-12, rtol=1e-10)


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
        v = kernels.jl_penalty(Ws, sample=m, generator=g)
        v.backward()
        values.append(v.item())
        grads.append(Ws.grad)
    values, grads = torch.tensor(values), torch.stack(grads)
    # the mean of 2000 draws lies within 4 standard errors of the exact value (fails by chance ~1 in 15,000)
    assert abs(values.mean() - exact.item()) < 4 * values.std() / draws ** 0.5
    stderr = grads.std(dim=0) / draws ** 0.5
    assert ((grads.mean(dim=0) - Wr.grad).abs() < 5 * stderr + 1e-7).float().mean() > 0.99
    full = kernels.jl_penalty(W, sample=n)  # all rows: no sampling
    assert full.item() == pytest.approx(exact.item(), rel=1e-5)


def test_bench_quick_runs(tmp_path):
    """bench.py --quick runs every part and writes its JSON (its figures are never asserted: speed is not a test)."""
    r = subprocess.run([sys.executable, "bench.py", "--quick=True", f"--json={tmp_path / 'b.json'}"], cwd=HERE, env=cpu_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.load(open(tmp_path / "b.json"))
    assert {"machine", "peak_gflops", "ops", "jl_memory", "end_to_end"} <= set(report)
    assert {"train_l1", "train_jl", "train_hybrid", "three_per_pass"} <= set(report["end_to_end"])


def test_bench_saelens_without_it_or_without_data_is_one_line(tiny_shards, tmp_path):
    """The SAELens comparison needs sae-lens (not a dependency) and token shards: each missing is one line."""
    def bench(*args):
        return subprocess.run([sys.executable, "bench.py", "--saelens=True", *args], cwd=HERE, env=cpu_env(),
                              capture_output=True, text=True, timeout=300)
    r = bench(f"--data_dir={tmp_path}")
    assert r.returncode == 1 and r.stderr.strip() == f"error: --data_dir={tmp_path}: no train shards (run prepare.py; " \
                                                     f"offline: see the README)"
    import importlib.util
    if importlib.util.find_spec("sae_lens") is not None:
        pytest.skip("sae_lens is installed here")
    r = bench(f"--data_dir={tiny_shards}")
    assert r.returncode == 1 and r.stderr.strip() == ("error: SAELens: sae_lens is not installed: `pip install "
                                                      "sae-lens==6.54.12` (the baseline, not a dependency)")


# -----------------------------------------------------------------------------
# research helpers: export to SAELens's format, steering

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
    model, _, s = sae.load_sae(ckpt)
    x = torch.randn(50, 32) * 3
    f_ref = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    x_hat_ref = f_ref @ weights["W_dec"] + weights["b_dec"]
    with torch.no_grad():
        x_hat, f = kernels.encode_relu_decode_ref(x * s, *(ckpt["sae"][k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")))
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


@pytest.mark.parametrize("site,reader", [("mlp_in", "h.1.mlp.c_fc"), ("resid_post", "h.2.ln_1"),
                                         ("mlp_hidden", "h.1.mlp.c_proj")])
def test_steering_moves_the_site_by_scale_times_direction(site, reader):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=24, vocab_size=60, block_size=16)).eval()
    width = 96 if site == "mlp_hidden" else 24
    sae_model, act_scale = SAE(width, 40), 2.5
    idx = torch.randint(0, 60, (2, 9))
    module = dict(model.named_modules())[reader]
    with torch.no_grad():
        clean_logits = model(idx)
        clean = captured_input(module, lambda: model(idx))
        with sae.steer(model, sae_model, {7: 3.0, 11: -1.5}, 1, site, act_scale):
            steered = captured_input(module, lambda: model(idx))
        with sae.steer(model, sae_model, {7: 0.0}, 1, site, act_scale):
            zero_logits = model(idx)
        after = model(idx)
    direction = (3.0 * sae_model.W_dec[7] - 1.5 * sae_model.W_dec[11]).detach() / act_scale
    torch.testing.assert_close(steered - clean, direction.expand_as(clean), atol=1e-5, rtol=0)
    assert torch.equal(zero_logits, clean_logits)  # scale 0 changes nothing
    assert torch.equal(after, clean_logits) and not model.h[1]._forward_pre_hooks  # the model is as it was


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
        with sae.steer(model, sae_model, {feature: 0.0}, 0, "mlp_in", mode="ablate"):
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
    model_sae, saved, s = sae.load_sae(ckpt)
    gpt = sae.load_gpt(saved)
    val = read_shard_numpy(glob.glob(f"{saved.data_dir}/*_val_*.bin")[0])[:640].astype(np.int64)
    with torch.no_grad():
        acts = gpt.harvest(torch.from_numpy(val).view(20, 32), saved.layer, saved.site)[:, 1:]  # position 0 left out
        f = kernels.encode_relu_decode_ref(acts.reshape(-1, 32) * s, *(ckpt["sae"][k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")))[1]
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
    assert sae.select_features("1:3", freq) == [1, 2] and sae.select_features("top_freq:2", freq) == [1, 3]
    for bad in ("3:1", "0:9", "top:2", "all"):
        with pytest.raises(ValueError, match="expected a:b with 0 <= a < b <= 4, or top_freq:K"):
            sae.select_features(bad, freq)
