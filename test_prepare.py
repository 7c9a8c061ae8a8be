"""prepare.py's tests: shards against tiktoken, tokenizers and the raw JSON; resume after a kill; one-line errors.
The command: `TRITON_INTERPRET=1 python -m pytest -q` (all test files; docs/tests.md)."""
import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import prepare
from conftest import HERE, read_shard_layout, read_shard_numpy, run_prepare, SHARED


# -----------------------------------------------------------------------------
# prepare.py: token shards from local files or the Hub, with tiktoken or a tokenizer.json; resume and one-line
# errors

TEXT_GLOB = str(SHARED / "data" / "text" / "*.jsonl")


needs_shared = pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data is missing (a user's clone)")


def shard_files(out_dir):
    return sorted(glob.glob(os.path.join(out_dir, "*.bin")), key=lambda p: p.rsplit("_", 1)[1])  # by index


def reference_tokens(enc, texts):
    return np.concatenate([[50256] + enc.encode_ordinary(t) for t in texts]).astype(np.uint16)


def jsonl_texts():
    texts = []
    for path in sorted(glob.glob(TEXT_GLOB)):
        with open(path, encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts


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
    assert len(read_shard_numpy(shard_files(out)[0])) == 12345  # --tokens < 10 x --val_tokens: val is a tenth
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


# prepare.py with other tokenizers: toy tokenizer.json files of each family's shape, SmolLM2's, GPT-2's rebuilt

def shard_stream(out_dir):
    return np.concatenate([read_shard_layout(f)[1] for f in shard_files(out_dir)])


def bytes_to_unicode():
    """GPT-2's printable stand-in character for every byte (openai/gpt-2 src/encoder.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # a control or space byte: the next character from 256 on
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# toy tokenizers of each family's shape: a byte-level BPE without merges, so that byte b is id offset + b; the
# family's special tokens; and the post-processor its tokenizer.json carries (prepare.py must not apply it)
TOYS = {  # name -> (offset of byte 0, special tokens, BOS added by the post-processor, expected separator)
    "llama2": (3, {"<unk>": 0, "<s>": 1, "</s>": 2}, "<s>", "<s>"),
    "llama3": (0, {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001}, "<|begin_of_text|>", "<|begin_of_text|>"),
    "wide": (65400, {"<|endoftext|>": 70000}, None, "<|endoftext|>"),  # half the byte ids are past 2**16
    "gemma": (4, {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}, "<bos>", "<bos>"),
    "nameless": (2, {"<pad>": 0, "<eos>": 1}, None, None),  # no separator that the auto rule knows
}


# documents that hold special-token text (plain text to prepare.py), non-ASCII, newlines and tabs
TOY_TEXTS = [f"document {i}: naïve café, 東京 🙂\n\t<s> </s> <|begin_of_text|> <|endoftext|> {'word ' * (i % 13)}"
             for i in range(300)]


@pytest.fixture(scope="session")
def toys(tmp_path_factory):
    """name -> a directory with that toy's tokenizer.json; its max_length-16 truncation must not cut documents."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    root = tmp_path_factory.mktemp("toy_tokenizers")
    for name, (offset, specials, bos, _) in TOYS.items():
        vocab = {c: offset + b for b, c in bytes_to_unicode().items()}
        tok = Tokenizer(models.BPE({**vocab, **specials}, []))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        if bos:
            tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, specials[bos])])
        tok.enable_truncation(16)
        (root / name).mkdir()
        tok.save(str(root / name / "tokenizer.json"))
    return {name: root / name for name in TOYS}


def toy_reference(name, texts, separator_id=None):
    offset, specials, _, separator = TOYS[name]
    separator_id = specials[separator] if separator_id is None else separator_id
    return np.concatenate([[separator_id] + [offset + b for b in t.encode("utf-8")] for t in texts])


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def gpt2_json_dir(tmp_path_factory):
    """GPT-2's tokenizer.json, built with `tokenizers` from ../shared/data/gpt2's encoder.json and vocab.bpe
    (byte-level BPE, GPT-2's split regex, no prefix space): the HF path's twin of tiktoken's gpt2."""
    if not (SHARED / "data" / "gpt2").is_dir():
        pytest.skip("../shared/data/gpt2 is missing")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.BPE.from_file(str(SHARED / "data/gpt2/encoder.json"), str(SHARED / "data/gpt2/vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    out = tmp_path_factory.mktemp("gpt2_json")
    tok.save(str(out / "tokenizer.json"))
    return out


@needs_shared
def test_prepare_smollm2_shards_equal_tokenizers_encode(smollm2_dir, tmp_path):
    from tokenizers import Tokenizer
    texts = jsonl_texts()
    out = tmp_path / "shards"
    r = run_prepare(f"--input={TEXT_GLOB}", f"--out_dir={out}", f"--tokenizer={smollm2_dir}", "--shard_size=300000",
                    "--val_tokens=100000")
    assert r.returncode == 0, r.stderr
    headers = [read_shard_layout(f)[0] for f in shard_files(out)]
    assert all(h[:2] == (20240520, 1) for h in headers) and headers[0][2] == 100_000  # vocab 49152: uint16
    stream = shard_stream(out)
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ids = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    np.testing.assert_array_equal(stream, np.concatenate([[0] + i for i in ids]))  # <|endoftext|> = 0 before each
    starts = np.flatnonzero(stream == 0)
    assert len(starts) == len(texts) and starts[0] == 0
    for doc, text in zip(np.split(stream, starts[1:]), texts):
        assert tok.decode(doc[1:].tolist()) == text
    record = json.load(open(out / "prepare.json"))["tokenizer"]
    assert record == prepare.read_tokenizer_record(str(out))
    assert {k: record[k] for k in ("spec", "kind", "vocab_size", "separator", "separator_id")} == {
        "spec": str(smollm2_dir.resolve()), "kind": "huggingface", "vocab_size": 49152, "separator": "<|endoftext|>",
        "separator_id": 0}
    assert record["fingerprint"] == prepare.load_tokenizer(str(smollm2_dir)).fingerprint()


@pytest.mark.parametrize("name", ["llama2", "llama3", "gemma", "wide"])
def test_prepare_family_separator_and_shard_layout(toys, name, tmp_path):
    """BOS (Llama 2, Llama 3, Gemma) or <|endoftext|> before each document, none from the post-processor, documents
    never truncated, special-token text in a document kept as text; uint32 shards past 2**16 ids."""
    offset, specials, _, separator = TOYS[name]
    out = tmp_path / "shards"
    r = run_prepare(f"--input={write_jsonl(tmp_path / 'docs.jsonl', TOY_TEXTS)}", f"--out_dir={out}",
                    f"--tokenizer={toys[name]}", "--shard_size=5000", "--val_tokens=100000")
    assert r.returncode == 0, r.stderr
    reference = toy_reference(name, TOY_TEXTS)
    vocab_size = max(offset + 255, *specials.values()) + 1
    wide = vocab_size > 2**16
    layouts = [read_shard_layout(f) for f in shard_files(out)]
    assert all(h[:2] == ((20240801, 7) if wide else (20240520, 1)) for h, _ in layouts)
    assert all(t.dtype == (np.uint32 if wide else np.uint16) for _, t in layouts)
    np.testing.assert_array_equal(shard_stream(out), reference)
    if name == "wide":
        assert (reference >= 2**16).any()
        for path, (_, tokens) in zip(shard_files(out), layouts):  # read_shard: a read-only uint32 memmap
            shard = prepare.read_shard(path)
            assert shard.dtype == np.uint32 and not shard.flags.writeable
            np.testing.assert_array_equal(shard.astype(np.int64), tokens)
    record = prepare.read_tokenizer_record(str(out))
    assert (record["kind"], record["vocab_size"], record["separator"], record["separator_id"]) == (
        "huggingface", vocab_size, separator, specials[separator])


def test_prepare_separator_override(toys, tmp_path):
    out = tmp_path / "shards"
    r = run_prepare(f"--input={write_jsonl(tmp_path / 'docs.jsonl', TOY_TEXTS)}", f"--out_dir={out}",
                    f"--tokenizer={toys['llama2']}", "--separator=</s>")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(shard_stream(out), toy_reference("llama2", TOY_TEXTS, separator_id=2))
    assert prepare.read_tokenizer_record(str(out))["separator"] == "</s>"
    # a vocabulary that the auto rule does not know works with a named separator
    out = tmp_path / "nameless"
    r = run_prepare(f"--input={tmp_path / 'docs.jsonl'}", f"--out_dir={out}", f"--tokenizer={toys['nameless']}",
                    "--separator=<eos>")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(shard_stream(out), toy_reference("nameless", TOY_TEXTS, separator_id=1))


@pytest.mark.parametrize("case", ["unknown_spec", "no_tokenizer_json", "bad_tokenizer_json", "hub_offline",
                                  "tiktoken_offline", "unknown_separator", "no_known_separator"])
def test_prepare_tokenizer_errors_are_one_line(enc, toys, tmp_path, case):
    env, spec, extra = {}, None, []
    empty = tmp_path / "empty"
    empty.mkdir()
    if case == "unknown_spec":
        spec, expect = "no such tokenizer!", "(not a tiktoken encoding: gpt2, "
    elif case == "no_tokenizer_json":
        spec, expect = str(empty), "this directory has no tokenizer.json"
    elif case == "bad_tokenizer_json":
        (empty / "tokenizer.json").write_text('{"model": "not a tokenizer"}')
        spec, expect = str(empty), "not a readable tokenizer.json"
    elif case == "hub_offline":  # HF_HUB_OFFLINE: fail at once instead of retrying
        spec, expect = "HuggingFaceTB/SmolLM2-135M", "could not fetch 'HuggingFaceTB/SmolLM2-135M' from the Hugging Face Hub (offline"
        env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    elif case == "tiktoken_offline":  # an empty cache and a proxy that refuses: offline even where CI is not
        spec, expect = "cl100k_base", "could not load tiktoken's cl100k_base files (offline?)"
        refuse = "http://127.0.0.1:9"
        env = {"TIKTOKEN_CACHE_DIR": str(empty), "HTTPS_PROXY": refuse, "https_proxy": refuse}
    elif case == "unknown_separator":
        spec, extra, expect = "gpt2", ["--separator=<s>"], "--separator=<s>: not a token of gpt2"
    else:
        spec, expect = str(toys["nameless"]), "has none of <|begin_of_text|>, <|endoftext|>, <s>, <bos>; name its"
    docs = write_jsonl(tmp_path / "docs.jsonl", TOY_TEXTS)
    r = run_prepare(f"--input={docs}", f"--out_dir={tmp_path / 'out'}", f"--tokenizer={spec}", *extra, env=env)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == errors[0]
    assert not glob.glob(f"{tmp_path / 'out'}/*.bin")


def test_prepare_refuses_another_tokenizer_and_reads_prepare_json_without_one(enc, toys, tmp_path):
    out = tmp_path / "shards"
    docs = write_jsonl(tmp_path / "docs.jsonl", TOY_TEXTS)
    assert run_prepare(f"--input={docs}", f"--out_dir={out}").returncode == 0
    r = run_prepare(f"--input={docs}", f"--out_dir={out}", f"--tokenizer={toys['llama2']}")
    assert r.returncode == 1 and "other settings (separator, tokenizer differ)" in r.stderr
    r = run_prepare(f"--input={docs}", f"--out_dir={out}", f"--tokenizer={toys['wide']}")  # same separator
    assert r.returncode == 1 and "other settings (tokenizer differ)" in r.stderr
    # a prepare.json with no tokenizer or separator in its settings, no record and no val_shard_tokens: gpt2 is assumed
    meta = json.load(open(out / "prepare.json"))
    for key in ("tokenizer", "separator"):
        del meta["settings"][key]
    del meta["tokenizer"], meta["val_shard_tokens"]
    json.dump(meta, open(out / "prepare.json", "w"))
    assert prepare.read_tokenizer_record(str(out)) == {"spec": "gpt2", "kind": "tiktoken"}
    r = run_prepare(f"--input={docs}", f"--out_dir={out}")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stderr
    r = run_prepare(f"--input={docs}", f"--out_dir={out}", f"--tokenizer={toys['llama2']}")
    assert r.returncode == 1 and "other settings (separator, tokenizer differ)" in r.stderr
    assert prepare.read_tokenizer_record(str(tmp_path)) is None  # no prepare.json


@needs_shared
def test_fingerprint_is_the_vocabulary_not_how_it_is_loaded(enc, gpt2_json_dir, toys, tmp_path, monkeypatch):
    from tokenizers import Tokenizer
    texts = jsonl_texts()
    # the tokenizer.json is GPT-2's: it encodes every text of the sample as tiktoken does
    hf = Tokenizer.from_file(str(gpt2_json_dir / "tokenizer.json"))
    assert [e.ids for e in hf.encode_batch(texts)] == enc.encode_ordinary_batch(texts)
    tiktoken_gpt2 = prepare.load_tokenizer("gpt2")
    json_gpt2 = prepare.load_tokenizer(str(gpt2_json_dir))
    assert (json_gpt2.vocab_size, json_gpt2.separator_id) == (tiktoken_gpt2.vocab_size, 50256) == (50257, 50256)
    assert json_gpt2.fingerprint() == tiktoken_gpt2.fingerprint()
    monkeypatch.chdir(gpt2_json_dir.parent)  # the same directory by a relative path: the same spec and print
    relative = prepare.load_tokenizer(gpt2_json_dir.name)
    assert relative.spec == str(gpt2_json_dir) and relative.fingerprint() == json_gpt2.fingerprint()
    others = {prepare.load_tokenizer(str(toys[name])).fingerprint() for name in ("llama2", "llama3", "wide")}
    assert len(others) == 3 and json_gpt2.fingerprint() not in others
    # the Tokenizer interface against its references
    assert tiktoken_gpt2.encode_batch(texts[:50]) == [enc.encode_ordinary(t) for t in texts[:50]]
    assert json_gpt2.encode_batch(texts[:50]) == [enc.encode_ordinary(t) for t in texts[:50]]
    assert json_gpt2.encode("<|endoftext|>") == enc.encode_ordinary("<|endoftext|>")  # text, not the token
    assert json_gpt2.decode([50256] + enc.encode_ordinary(texts[0])) == "<|endoftext|>" + texts[0]
    assert tiktoken_gpt2.decode([50256] + enc.encode_ordinary(texts[0])) == "<|endoftext|>" + texts[0]


@needs_shared
def test_prepare_gpt2_tokenizer_json_gives_tiktokens_shards(enc, gpt2_json_dir, tmp_path):
    """The Hugging Face path (batches through `tokenizers`) writes what tiktoken's process pool would."""
    out = tmp_path / "shards"
    r = run_prepare(f"--input={TEXT_GLOB}", f"--out_dir={out}", f"--tokenizer={gpt2_json_dir}",
                    "--shard_size=300000", "--val_tokens=100000")
    assert r.returncode == 0, r.stderr
    assert all(read_shard_layout(f)[0][:2] == (20240520, 1) for f in shard_files(out))
    np.testing.assert_array_equal(shard_stream(out), reference_tokens(enc, jsonl_texts()))


@needs_shared
def test_prepare_caps_the_val_split_at_a_tenth(enc, tmp_path):
    path = SHARED / "data" / "text" / "webtext_valid_63tok.jsonl"  # 302,336 tokens, under 10 x the default 1M
    texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    reference = reference_tokens(enc, texts)
    out = tmp_path / "shards"
    r = run_prepare(f"--input={path}", f"--out_dir={out}", "--shard_size=100000")
    assert r.returncode == 0, r.stderr
    val = len(reference) // 10
    assert f"the input has {len(reference):,} tokens: val split capped at {val:,} (a tenth)" in r.stdout
    lengths = [len(read_shard_layout(f)[1]) for f in shard_files(out)]
    assert lengths[0] == val and sum(lengths[1:]) == len(reference) - val > 0
    np.testing.assert_array_equal(shard_stream(out), reference)
    assert json.load(open(out / "prepare.json"))["val_shard_tokens"] == val
    # --tokens under 10 x --val_tokens: a tenth of --tokens
    out = tmp_path / "budget"
    r = run_prepare(f"--input={path}", f"--out_dir={out}", "--tokens=54321", "--val_tokens=10000")
    assert r.returncode == 0 and "--tokens=54,321: val split capped at 5,432 (a tenth)" in r.stdout, r.stderr
    assert len(read_shard_layout(shard_files(out)[0])[1]) == 5432
    np.testing.assert_array_equal(shard_stream(out), reference[:54321])


# prepare.main with the Hub stream replaced by a few documents (argv[1] of them)
SHORT_HUB_STREAM = """
import sys
import prepare
prepare.read_hub_documents = lambda dataset, config, text_field: iter(["word " * 100] * int(sys.argv[1]))
prepare.main(sys.argv[2:])
"""


def test_prepare_hub_stream_shorter_than_the_val_split_is_one_line(enc, tmp_path):
    out = tmp_path / "shards"
    run = lambda n, *args: subprocess.run([sys.executable, "-c", SHORT_HUB_STREAM, str(n), f"--out_dir={out}", *args],
                                          cwd=HERE, capture_output=True, text=True, timeout=300)
    r = run(5, "--tokens=100000", "--val_tokens=1000")  # 5 documents: not even the val split
    assert r.returncode == 1
    n = 5 * (1 + len(enc.encode_ordinary("word " * 100)))
    assert r.stderr.rstrip().splitlines()[-1] == (
        f"error: the source ran out after {n:,} tokens, before any train token (the val split takes 1,000); "
        f"delete {out} and rerun with a smaller --val_tokens")
    assert not glob.glob(f"{out}/*.bin")
    out = tmp_path / "budget"  # an endless stream is not counted: a --tokens under 10 x --val_tokens is capped
    r = run(100, "--tokens=5000", "--val_tokens=1000")
    assert r.returncode == 0 and "--tokens=5,000: val split capped at 500 (a tenth)" in r.stdout, r.stderr
    assert [len(read_shard_layout(f)[1]) for f in shard_files(out)] == [500, 4500]


@needs_shared
def test_prepare_killed_huggingface_run_resumes_to_the_same_tokens(enc, gpt2_json_dir, tmp_path):
    out = tmp_path / "shards"
    # --tokens under 10 x --val_tokens: the val split is capped (40,000), and the resumed run must keep it
    args = [f"--input={TEXT_GLOB}", f"--out_dir={out}", f"--tokenizer={gpt2_json_dir}", "--shard_size=70001",
            "--val_tokens=50000", "--tokens=400000"]
    r = subprocess.run([sys.executable, "-c", DIE_WRITING_SHARD, "kill", *args], cwd=HERE, capture_output=True,
                       text=True, timeout=300)  # the wrapper of the tiktoken kill test above
    assert r.returncode == -signal.SIGKILL
    assert len(shard_files(out)) == 2  # shards 0 and 1 complete; shard 2 only ever existed under a temporary name
    r = run_prepare(*args)
    assert r.returncode == 0, r.stderr
    assert [len(read_shard_layout(f)[1]) for f in shard_files(out)][:2] == [40000, 70001]
    np.testing.assert_array_equal(shard_stream(out), reference_tokens(enc, jsonl_texts())[:400000])
