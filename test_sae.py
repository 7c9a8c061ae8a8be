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
from sae import DataLoaderLite, GPT, GPTConfig, SITES, parse_args, HarvestConfig  # noqa: E402


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
LAST_MODULE = {"resid_mid": "h.{L}.attn.c_proj", "mlp_in": "h.{L}.ln_2", "mlp_hidden": "h.{L}.mlp.gelu",
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


def test_harvest_at_the_middle_is_about_half_a_forward():
    """FLOPs counted by torch, not timed: stopping at layer 6 of 12 skips the upper half and the unembedding."""
    from torch.utils.flop_counter import FlopCounterMode
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
    cfg = parse_args(HarvestConfig(), ["--layer=3", "--site=mlp_out", "--init_from=./dir"])
    assert (cfg.layer, cfg.site, cfg.init_from) == (3, "mlp_out", "./dir")
    config_file = tmp_path / "exp.py"
    config_file.write_text("layer = 9\nbatch_size = 4  # a comment\n")
    assert parse_args(HarvestConfig(), [str(config_file), "--batch_size=2"]).__dict__ == {
        **HarvestConfig().__dict__, "layer": 9, "batch_size": 2}
    with pytest.raises(ValueError, match="unknown config key 'layr'; valid keys: init_from"):
        parse_args(HarvestConfig(), ["--layr=3"])
    with pytest.raises(ValueError, match="expected int, got str"):
        parse_args(HarvestConfig(), ["--layer=six"])
