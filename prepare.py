"""
Text in, token shards out: the data step before `python sae.py`.

Streams FineWeb sample-10BT from the Hugging Face Hub (or reads local .txt/.jsonl/.json/.parquet
files), tokenizes with tiktoken's gpt2 encoding (or any tiktoken encoding, or a Hugging Face
tokenizer.json: --tokenizer), puts the document separator in front of every document, and writes
shards in llm.c's format: a header of 256 int32 (magic, version, n_tokens) then uint16 tokens, or
uint32 tokens in llm.c's Llama-3 layout when the vocabulary has more than 2**16 ids. Shard 0 is the
validation split, at most a tenth of the tokens. After build-nanogpt's fineweb.py.

$ python prepare.py                                   # 100M tokens of FineWeb sample-10BT
$ python prepare.py --dataset=fineweb-edu --tokens=10_000_000
$ python prepare.py --input='../shared/data/text/*.jsonl' --out_dir=data/local   # offline
$ python prepare.py --tokenizer=HuggingFaceTB/SmolLM2-135M --out_dir=data/smollm2   # or a local directory
"""
import argparse
import glob
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import tiktoken

# -----------------------------------------------------------------------------
# constants: the shard formats of llm.c (dev/data/data_common.py), separators, the datasets we know by name

HEADER_INTS = 256       # int32 header: [magic, version, n_tokens, 0, ...], 1024 bytes
SHARD_FORMATS = {       # token dtype -> llm.c's (magic, version); the reader accepts both
    np.dtype(np.uint16): (20240520, 1),  # "gpt-2": vocabularies of up to 2**16 ids (GPT-2, SmolLM2, Llama 2)
    np.dtype(np.uint32): (20240801, 7),  # "llama-3": larger ones (Llama 3 128256, Qwen2 151936, cl100k_base)
}
# The document separator, put in front of every document by us (never by the tokenizer's post-processor,
# which a tokenizer.json may or may not carry): --separator=auto takes the first of these that the vocabulary
# holds, as each family's own pretraining data uses it:
#   <|begin_of_text|>  Llama 3: BOS before each document (llm.c's fineweb.py prepends it)
#   <|endoftext|>      GPT-2 and every tiktoken encoding, SmolLM/SmolLM2, Qwen2: the EOS that separates
#                      documents, here in front of each (build-nanogpt; SmolLM: "all files are separated by EOS")
#   <s>                Llama 2, Mistral, TinyLlama: BOS before each document
#   <bos>              Gemma 2 and 3: BOS before each document (Gemma's models expect it first: Gemma Team 2024)
# Any other vocabulary needs --separator=TOKEN.
SEPARATORS = ("<|begin_of_text|>", "<|endoftext|>", "<s>", "<bos>")
# Tokenizer.fingerprint encodes this: prose, code, digit runs, whitespace runs and non-ASCII, where vocabularies
# and pre-tokenizers differ
FINGERPRINT_PROBE = ("The quick brown fox paid $1,234.56 in 1999 -- isn't it?\ndef f(x):\n    return x ** 2"
                     "  # squared\n\n\tnaïve café, Ünïcödé, 東京, Привет, 🙂\n")
HF_BATCH = 1024         # documents per encode_batch call (and per batch of the val-split count): Rust spreads it over all cores
DATASETS = {            # short name -> (Hub id, config)
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


class PrepareError(ValueError):
    """Bad input or an unreachable source: main() prints it as one line and exits 1."""


# -----------------------------------------------------------------------------
# shard files (sae.py reads them with read_shard)

def write_atomic(path, write, mode="w"):
    """write(file) into path.tmp, then renamed to path (atomic on POSIX): no partial file ever has the final name, and
    a crash leaves the previous one whole. The project's one (sae.py and analyze.py import it): here, because
    prepare.py imports no torch."""
    with open(path + ".tmp", mode) as f:
        write(f)
    os.replace(path + ".tmp", path)


def write_shard(path, tokens):
    """Writes uint16 or uint32 `tokens` (the layout follows the dtype) atomically (write_atomic)."""
    assert tokens.dtype in SHARD_FORMATS, f"tokens must be uint16 or uint32, not {tokens.dtype}"
    assert len(tokens) < 2**31, "n_tokens is an int32 in the header"
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = *SHARD_FORMATS[tokens.dtype], len(tokens)

    def write(f):
        f.write(header.tobytes())
        f.write(tokens.tobytes())
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename gives it the final name, which prepare.json then counts
    write_atomic(path, write, "wb")


def read_shard(path):
    """Validates the header and returns the tokens as a read-only uint16 or uint32 memmap (n_tokens,)."""
    hint = "HINT: re-run prepare.py to rewrite the shards"
    if os.path.getsize(path) < 4 * HEADER_INTS:
        raise ValueError(f"{path}: shorter than the {4 * HEADER_INTS}-byte shard header; {hint}")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    dtype = next((d for d, format in SHARD_FORMATS.items() if format == (header[0], header[1])), None)
    if dtype is None:
        expected = " or ".join(f"{magic}/{version}" for magic, version in SHARD_FORMATS.values())
        raise ValueError(f"{path}: magic/version {header[0]}/{header[1]}, expected {expected}; {hint}")
    n_tokens = int(header[2])
    expected_bytes = 4 * HEADER_INTS + dtype.itemsize * n_tokens
    if os.path.getsize(path) != expected_bytes:
        raise ValueError(f"{path}: header says {n_tokens} tokens ({expected_bytes} bytes), file has "
                         f"{os.path.getsize(path)} bytes; {hint}")
    return np.memmap(path, dtype=dtype, mode="r", offset=4 * HEADER_INTS, shape=(n_tokens,))


def shard_path(out_dir, name, index):
    split = "val" if index == 0 else "train"  # shard 0 is the validation split (llm.c, build-nanogpt)
    return os.path.join(out_dir, f"{name}_{split}_{index:06d}.bin")


# -----------------------------------------------------------------------------
# tokenizers: tiktoken encodings and Hugging Face tokenizer.json files behind one interface (sae.py uses it too)

class Tokenizer:
    """encode/encode_batch add no special token and read special-token text in a document as plain text
    (tiktoken's encode_ordinary); `separator` is the token prepare.py puts in front of every document."""

    def __init__(self, spec, kind, backend, separator="auto"):
        self.spec, self.kind, self.backend = spec, kind, backend
        if kind == "tiktoken":
            self.vocab_size = backend.n_vocab  # max token id + 1, the special tokens included
            lookup = lambda token: backend.encode_single_token(token) if token in backend.special_tokens_set else None
        else:
            vocab = backend.get_vocab(with_added_tokens=True)
            self.vocab_size = max(vocab.values()) + 1  # not len(vocab): ids may have gaps
            lookup = vocab.get
        candidates = SEPARATORS if separator == "auto" else (separator,)
        self.separator = next((t for t in candidates if lookup(t) is not None), None)
        if self.separator is None:
            raise PrepareError(f"--separator={separator}: not a token of {spec}" if separator != "auto" else
                               f"{spec} has none of {', '.join(SEPARATORS)}; name its document separator "
                               f"with --separator=TOKEN")
        self.separator_id = lookup(self.separator)

    def encode(self, text):
        if self.kind == "tiktoken":
            return self.backend.encode_ordinary(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        if self.kind == "tiktoken":
            return self.backend.encode_ordinary_batch(texts)
        # encode_batch_fast (tokenizers >= 0.20) skips the offsets we never read: 1.5x less CPU (SmolLM2, measured)
        encode_batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        if self.kind == "tiktoken":
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=False)  # separators shown, as tiktoken does

    def fingerprint(self):
        """sha256 of the vocabulary size and the ids of FINGERPRINT_PROBE: equal for equal vocabularies, however
        loaded (tiktoken's gpt2 and GPT-2's tokenizer.json agree)."""
        return hashlib.sha256(json.dumps([self.vocab_size, self.encode(FINGERPRINT_PROBE)]).encode()).hexdigest()

    def record(self):
        return {"spec": self.spec, "kind": self.kind, "vocab_size": self.vocab_size, "separator": self.separator,
                "separator_id": self.separator_id, "fingerprint": self.fingerprint()}


def load_tokenizer(spec, separator="auto"):
    """A tiktoken encoding name (gpt2, cl100k_base, ...), else a local directory or a Hub model id whose
    tokenizer.json is read with `tokenizers`. Raises PrepareError with one line."""
    if spec in tiktoken.list_encoding_names():
        try:
            encoding = tiktoken.get_encoding(spec)
        except Exception as e:  # tiktoken raises requests/urllib errors or ValueError when it cannot download
            how = ("fill a cache with ../shared/data/gpt2/install_tiktoken_cache.sh DIR and set "
                   "TIKTOKEN_CACHE_DIR=DIR" if spec == "gpt2" else
                   "run once online, or set TIKTOKEN_CACHE_DIR to a cache that holds them")
            raise PrepareError(f"could not load tiktoken's {spec} files (offline?): {how} "
                               f"({type(e).__name__})") from None
        return Tokenizer(spec, "tiktoken", encoding, separator)
    if os.path.isdir(spec):
        spec = os.path.abspath(spec)  # recorded in prepare.json, where sae.py may read it from another directory
        path = os.path.join(spec, "tokenizer.json")
        if not os.path.isfile(path):
            raise PrepareError(f"--tokenizer={spec}: this directory has no tokenizer.json")
    else:
        names = ", ".join(tiktoken.list_encoding_names())
        path = hub_file(spec, "tokenizer.json", f"--tokenizer={spec} (not a tiktoken encoding: {names})")
        if path is None:
            raise PrepareError(f"--tokenizer={spec}: the Hub model has no tokenizer.json")
    try:
        import tokenizers  # comes with transformers; imported here: the tiktoken path does not need it
    except ImportError:
        raise PrepareError(f"--tokenizer={spec}: reading a tokenizer.json needs `pip install tokenizers`") from None
    try:
        backend = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise PrepareError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
    backend.no_truncation()  # some tokenizer.json files truncate to 512 tokens; a document is never cut
    backend.no_padding()
    backend.encode_special_tokens = True  # "<|endoftext|>" in a document is text, as in tiktoken's encode_ordinary
    return Tokenizer(spec, "huggingface", backend, separator)


def hub_file(name_or_path, filename, flag):
    """A file of a local directory, or of a Hub repo fetched (and cached) by huggingface_hub (it comes with datasets);
    None if the repo has no such file. Offline and not cached, gated, or no such repo: one line that starts with
    `flag` (the flag that named it). sae.py reads model checkpoints with it too."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.exists(path) else None
    import huggingface_hub
    import huggingface_hub.utils.logging
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HFValidationError, LocalEntryNotFoundError, \
        RepositoryNotFoundError
    huggingface_hub.utils.logging.set_verbosity_error()  # no retry chatter: one line when offline
    try:
        return huggingface_hub.hf_hub_download(name_or_path, filename)
    except LocalEntryNotFoundError:  # before its parent class: offline, and not in the local cache
        raise PrepareError(f"{flag}: could not fetch '{name_or_path}' from the Hugging Face Hub (offline, and not in "
                           f"the local cache); pass a local directory written by save_pretrained") from None
    except EntryNotFoundError:
        return None
    except GatedRepoError:  # before its parent class RepositoryNotFoundError
        raise PrepareError(f"{flag}: '{name_or_path}' is gated on the Hugging Face Hub: accept its licence there and "
                           f"log in (hf auth login, or HF_TOKEN)") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise PrepareError(f"{flag}: '{name_or_path}' is neither a local directory nor a model on the Hugging Face "
                           f"Hub") from None


def read_prepare_json(path):
    """A prepare.json in this version's layout, or None where there is none: one that records no tokenizer (no
    record, no tokenizer or separator in its settings) holds gpt2 shards, each document after <|endoftext|>."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    meta.setdefault("tokenizer", {"spec": "gpt2", "kind": "tiktoken"})
    for key, value in (("tokenizer", "gpt2"), ("separator", "<|endoftext|>")):
        meta["settings"].setdefault(key, value)
    return meta


def read_tokenizer_record(data_dir):
    """The tokenizer record (Tokenizer.record) in data_dir/prepare.json; None without a prepare.json."""
    meta = read_prepare_json(os.path.join(data_dir, "prepare.json"))
    return meta["tokenizer"] if meta else None


# -----------------------------------------------------------------------------
# documents: local files (the offline path) or a Hub dataset streamed with `datasets`

def read_local_documents(path, text_field):
    """Yields the documents of one file: a .txt is one document; .jsonl/.json hold objects with a
    text field (a .json may also be one array of them); .parquet has a text column."""
    def text_of(record, where):
        if not isinstance(record, dict) or text_field not in record:
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise PrepareError(f"{where}: no text field '{text_field}' (found {fields}); set --text_field")
        return record[text_field]

    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # pyarrow comes with datasets
        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise PrepareError(f"{path}: not a readable parquet file ({e})") from None
        if text_field not in parquet.schema_arrow.names:
            raise PrepareError(f"{path}: no text column '{text_field}' (found {parquet.schema_arrow.names}); "
                               f"set --text_field")
        for batch in parquet.iter_batches(columns=[text_field]):
            yield from batch.column(0).to_pylist()
        return

    raw = open(path, "rb").read()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise PrepareError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if path.endswith(".txt"):
        yield content
        return
    if path.endswith(".json") and content.lstrip()[:1] == "[":  # one JSON array of records
        try:
            records = json.loads(content)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, record in enumerate(records):
            yield text_of(record, f"{path} record {i}")
        return
    for lineno, line in enumerate(content.splitlines(), start=1):  # JSON lines
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        yield text_of(record, f"{path}:{lineno}")


def list_input_files(pattern):
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not files:
        raise PrepareError(f"--input={pattern}: no file matches")
    unknown = [f for f in files if not f.endswith(LOCAL_SUFFIXES)]
    if unknown:
        raise PrepareError(f"--input={pattern}: {unknown[0]} is not one of {', '.join(LOCAL_SUFFIXES)}")
    return files


def read_hub_documents(dataset, config, text_field):
    """Streams the train split of a Hub dataset, so a 100M-token prepare never downloads all of it."""
    import datasets  # imported here: slow to import, and the offline path does not need it
    import huggingface_hub.utils.logging
    huggingface_hub.utils.logging.set_verbosity_error()  # no retry chatter: one line if the Hub is down
    offline = (f"could not reach the Hugging Face Hub for dataset '{dataset}' (offline?); "
               f"use --input=GLOB with local .txt/.jsonl/.json/.parquet files")
    try:
        stream = datasets.load_dataset(dataset, name=config, split="train", streaming=True)
        for i, record in enumerate(stream):
            if text_field not in record:
                raise PrepareError(f"{dataset} row {i}: no text field '{text_field}' "
                                   f"(found {sorted(record)}); set --text_field")
            yield record[text_field]
    except ConnectionError:  # datasets raises ConnectionError when the Hub cannot be reached
        raise PrepareError(offline) from None
    except datasets.exceptions.DatasetNotFoundError as e:
        raise PrepareError(f"dataset '{dataset}' not found on the Hub ({e})") from None


# -----------------------------------------------------------------------------
# tokenization: tiktoken in a process pool, a tokenizer.json in batches; one token array per document

def init_worker(spec, separator_id, dtype):
    global worker
    worker = tiktoken.get_encoding(spec), separator_id, dtype


def tokenize(text):
    encoding, separator_id, dtype = worker
    return document_tokens(separator_id, encoding.encode_ordinary(text), dtype)


def document_tokens(separator_id, ids, dtype):
    """One document's ids -> its shard tokens, the separator first (build-nanogpt's fineweb.py)."""
    tokens = np.array([separator_id] + ids)
    assert (0 <= tokens).all() and (tokens <= np.iinfo(dtype).max).all(), f"token ids must fit in {dtype}"
    return tokens.astype(dtype)


def tokenize_documents(tokenizer, documents, dtype):
    """Yields each document's tokens (separator first) in order, whichever the tokenizer."""
    if tokenizer.kind == "tiktoken":
        # one worker a physical core (hyperthreads do not help tiktoken); imap keeps document order
        with mp.Pool(max(1, os.cpu_count() // 2), initializer=init_worker,
                     initargs=(tokenizer.spec, tokenizer.separator_id, dtype)) as pool:
            yield from pool.imap(tokenize, documents, chunksize=16)
        return
    documents = iter(documents)
    while batch := list(itertools.islice(documents, HF_BATCH)):  # one batch runs on every core (rayon)
        for ids in tokenizer.encode_batch(batch):
            yield document_tokens(tokenizer.separator_id, ids, dtype)


def shard_dtype(tokenizer):
    return np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)


# -----------------------------------------------------------------------------
# the run: documents -> tokens -> shards, resumable

def decide_val_tokens(args, tokenizer, open_documents):
    """The val split is at most a tenth of a finite total, so that sae.py always has a train split. A local
    input is counted, up to min(--tokens, 10 x --val_tokens) tokens; a Hub stream counts as endless."""
    total = args.tokens
    if args.input:
        limit, total, documents = min(args.tokens, 10 * args.val_tokens), 0, open_documents()
        # a count needs no shard arrays nor a process pool (which stopping early would have to terminate): batches
        # in this process, one separator and the document's tokens each, as tokenize_documents writes them
        while total < limit and (batch := list(itertools.islice(documents, HF_BATCH))):
            total += sum(len(ids) + 1 for ids in tokenizer.encode_batch(batch))
        total = min(total, args.tokens)
    if total >= 10 * args.val_tokens:
        return args.val_tokens
    if total < 2:
        raise PrepareError(f"{total} tokens are too few for a val and a train split")
    val_tokens = max(1, total // 10)
    source = f"--tokens={total:,}" if total == args.tokens else f"the input has {total:,} tokens"
    print(f"{source}: val split capped at {val_tokens:,} (a tenth)")
    return val_tokens


def prepare(args):
    tokenizer = load_tokenizer(args.tokenizer, args.separator)  # fails here, in one line, before any file
    dtype = shard_dtype(tokenizer)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.input:
        files = list_input_files(args.input)
        source = {"input": [os.path.abspath(f) for f in files], "text_field": args.text_field}
        open_documents = lambda: (doc for f in files for doc in read_local_documents(f, args.text_field))
        name = args.name or "local"
    else:
        hub_id, default_config = DATASETS.get(args.dataset, (args.dataset, None))
        config = args.dataset_config or default_config
        source = {"dataset": hub_id, "dataset_config": config, "text_field": args.text_field}
        open_documents = lambda: read_hub_documents(hub_id, config, args.text_field)
        name = args.name or args.dataset.split("/")[-1].lower().replace("-", "_")
    settings = {**source, "name": name, "tokens": args.tokens, "shard_size": args.shard_size,
                "val_tokens": args.val_tokens, "tokenizer": tokenizer.spec, "separator": tokenizer.separator}

    # prepare.json records the settings and how far a run got, so that a rerun resumes or does nothing
    meta_path = os.path.join(args.out_dir, "prepare.json")
    meta = read_prepare_json(meta_path)
    if meta:
        changed = sorted(k for k in settings if meta["settings"].get(k) != settings[k])
        if changed:
            raise PrepareError(f"{args.out_dir} was prepared with other settings ({', '.join(changed)} differ); "
                               f"use another --out_dir or delete it")
    if meta and meta["complete"]:
        print(f"{args.out_dir}: complete ({meta['tokens_written']:,} tokens in {meta['shards']} shards); "
              f"nothing to do")
        return meta
    if meta:  # a resumed run keeps the val size it decided (a prepare.json without val_shard_tokens: the flag's)
        meta.update(settings=settings, tokenizer=tokenizer.record(),
                    val_shard_tokens=meta.get("val_shard_tokens", args.val_tokens))
    else:
        meta = {"settings": settings, "tokenizer": tokenizer.record(),
                "val_shard_tokens": decide_val_tokens(args, tokenizer, open_documents),
                "complete": False, "shards": 0, "documents_done": 0, "tokens_written": 0, "carry": 0}
    val_tokens = meta["val_shard_tokens"]

    def save_meta():
        write_atomic(meta_path, lambda f: json.dump(meta, f, indent=1))
    save_meta()

    from tqdm import tqdm  # comes with datasets
    # resume: skip (without tokenizing) the documents that completed shards hold. `carry` tokens of the
    # next document already sit in the last shard; they are dropped when it is tokenized again.
    documents = open_documents()
    skip_docs, carry = meta["documents_done"], meta["carry"]
    for _ in zip(range(skip_docs), documents):
        pass
    shard_index, written = meta["shards"], meta["tokens_written"]
    written_before = written
    capacity = lambda i: val_tokens if i == 0 else args.shard_size
    buffer = np.empty(capacity(shard_index), dtype=dtype)
    filled, docs_seen = 0, skip_docs
    progress = tqdm(total=args.tokens, initial=written, unit="tok", unit_scale=True, desc=name)
    t0 = time.time()

    def flush(n_docs_done, n_carry):
        nonlocal shard_index, written, filled, buffer
        path = shard_path(args.out_dir, name, shard_index)
        write_shard(path, buffer[:filled])
        written += filled
        meta.update(shards=shard_index + 1, tokens_written=written, documents_done=n_docs_done, carry=n_carry)
        save_meta()
        shard_index, filled = shard_index + 1, 0
        buffer = np.empty(capacity(shard_index), dtype=dtype)

    token_stream = tokenize_documents(tokenizer, documents, dtype)
    try:
        for tokens in token_stream:
            docs_seen += 1
            pos, carry = carry, 0  # tokens of this document that are already in a shard (resume)
            while pos < len(tokens) and written + filled < args.tokens:
                take = min(len(tokens) - pos, len(buffer) - filled, args.tokens - written - filled)
                buffer[filled:filled + take] = tokens[pos:pos + take]
                filled, pos = filled + take, pos + take
                progress.update(take)
                if filled == len(buffer) or written + filled == args.tokens:
                    # a shard is full; a document cut here continues in the next one, so the
                    # resume point is (documents finished, tokens of the current one written)
                    flush(docs_seen - 1, pos) if pos < len(tokens) else flush(docs_seen, 0)
            if written + filled >= args.tokens:
                break
        if written + filled <= val_tokens:  # only a Hub stream can end this early (a local input is counted)
            raise PrepareError(f"the source ran out after {written + filled:,} tokens, before any train token "
                               f"(the val split takes {val_tokens:,}); delete {args.out_dir} and rerun with a "
                               f"smaller --val_tokens")
        if filled:  # the source ran out before the budget: the last shard is short
            flush(docs_seen, 0)
    finally:
        token_stream.close()  # stops the tiktoken pool
        progress.close()  # ends the bar's line, so that an error prints on a line of its own
    meta["complete"] = True
    save_meta()
    dt = time.time() - t0
    n_bytes = sum(os.path.getsize(shard_path(args.out_dir, name, i)) for i in range(meta["shards"]))
    print(f"wrote {written:,} tokens in {meta['shards']} shards ({n_bytes / 2**20:.1f} MiB) to {args.out_dir} "
          f"in {dt:.1f}s ({(written - written_before) / max(dt, 1e-9):,.0f} tok/s)")
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dataset", default="fineweb", help="fineweb, fineweb-edu, or any Hub dataset id")
    parser.add_argument("--dataset_config", default=None, help="the Hub dataset's config (fineweb: sample-10BT)")
    parser.add_argument("--text_field", default="text", help="the field or column that holds the text")
    parser.add_argument("--input", default=None, help="GLOB of local .txt/.jsonl/.json/.parquet files (offline)")
    parser.add_argument("--out_dir", default="data/fineweb10B")
    parser.add_argument("--name", default=None, help="shard name prefix (default: the dataset's short name)")
    parser.add_argument("--tokens", type=int, default=100_000_000, help="total tokens, val included")
    parser.add_argument("--shard_size", type=int, default=10_000_000, help="tokens per train shard (20 MB)")
    parser.add_argument("--val_tokens", type=int, default=1_000_000,
                        help="tokens in shard 0, the val split (at most a tenth of the total)")
    parser.add_argument("--tokenizer", default="gpt2",
                        help="a tiktoken encoding (gpt2, cl100k_base, ...), or a Hub model id or local directory "
                             "with a tokenizer.json")
    parser.add_argument("--separator", default="auto",
                        help="the token put in front of every document (a special token for tiktoken); auto: "
                             "<|begin_of_text|>, else <|endoftext|>, else <s>, else <bos>, the first the vocabulary has")
    args = parser.parse_args(argv)
    for key in ("tokens", "shard_size", "val_tokens"):
        if getattr(args, key) <= 0:
            parser.error(f"--{key} must be positive")
    try:
        prepare(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\ninterrupted: complete shards are kept in {args.out_dir}; rerun the same command to continue",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
