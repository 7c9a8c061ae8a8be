"""
Text in, GPT-2 token shards out: the data step before `python sae.py`.

Streams FineWeb sample-10BT from the Hugging Face Hub (or reads local .txt/.jsonl/.json/.parquet
files), tokenizes with tiktoken's gpt2 encoding (<|endoftext|> in front of every document) in a
process pool, and writes shards in llm.c's format: a header of 256 int32 (magic, version, n_tokens)
then uint16 tokens. Shard 0 is the validation split. After build-nanogpt's fineweb.py.

$ python prepare.py                                   # 100M tokens of FineWeb sample-10BT
$ python prepare.py --dataset=fineweb-edu --tokens=10_000_000
$ python prepare.py --input='../shared/data/text/*.jsonl' --out_dir=data/local   # offline
"""
import argparse
import glob
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import tiktoken

# -----------------------------------------------------------------------------
# constants: the shard format of llm.c (dev/data/data_common.py) and the datasets we know by name

HEADER_INTS = 256      # int32 header: [magic, version, n_tokens, 0, ...], 1024 bytes
SHARD_MAGIC = 20240520  # llm.c's magic for GPT-2 token shards
SHARD_VERSION = 1       # version 1 = uint16 tokens
EOT = 50256             # <|endoftext|>, in front of every document
DATASETS = {            # short name -> (Hub id, config)
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


class PrepareError(ValueError):
    """Bad input or an unreachable source: main() prints it as one line and exits 1."""


# -----------------------------------------------------------------------------
# shard files (sae.py reads them with read_shard)

def write_shard(path, tokens):
    """Writes uint16 `tokens` under a temporary name, then renames: no partial shard ever has a final name."""
    assert tokens.dtype == np.uint16
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX


def read_shard(path):
    """Validates the header and returns the tokens as a read-only uint16 memmap (n_tokens,)."""
    hint = "HINT: re-run prepare.py to rewrite the shards"
    if os.path.getsize(path) < 4 * HEADER_INTS:
        raise ValueError(f"{path}: shorter than the {4 * HEADER_INTS}-byte shard header; {hint}")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: magic/version {header[0]}/{header[1]}, expected "
                         f"{SHARD_MAGIC}/{SHARD_VERSION}; {hint}")
    n_tokens = int(header[2])
    expected_bytes = 4 * HEADER_INTS + 2 * n_tokens
    if os.path.getsize(path) != expected_bytes:
        raise ValueError(f"{path}: header says {n_tokens} tokens ({expected_bytes} bytes), file has "
                         f"{os.path.getsize(path)} bytes; {hint}")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * HEADER_INTS, shape=(n_tokens,))


def shard_path(out_dir, name, index):
    split = "val" if index == 0 else "train"  # shard 0 is the validation split (llm.c, build-nanogpt)
    return os.path.join(out_dir, f"{name}_{split}_{index:06d}.bin")


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
# tokenization, in a process pool

def init_worker():
    global enc
    enc = tiktoken.get_encoding("gpt2")


def tokenize(text):
    """One document -> uint16 tokens, with <|endoftext|> first (build-nanogpt's fineweb.py)."""
    tokens = np.array([EOT] + enc.encode_ordinary(text))
    assert (0 <= tokens).all() and (tokens < 2**16).all(), "token ids must fit in uint16"
    return tokens.astype(np.uint16)


def load_gpt2_encoding():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/urllib errors or ValueError when it cannot download
        raise PrepareError(f"could not load tiktoken's gpt2 files (offline?): fill a cache with "
                           f"../shared/data/gpt2/install_tiktoken_cache.sh DIR and set TIKTOKEN_CACHE_DIR=DIR "
                           f"({type(e).__name__})") from None


# -----------------------------------------------------------------------------
# the run: documents -> tokens -> shards, resumable

def prepare(args):
    os.makedirs(args.out_dir, exist_ok=True)
    if args.input:
        files = list_input_files(args.input)
        source = {"input": [os.path.abspath(f) for f in files], "text_field": args.text_field}
        documents = (doc for f in files for doc in read_local_documents(f, args.text_field))
        name = args.name or "local"
    else:
        hub_id, default_config = DATASETS.get(args.dataset, (args.dataset, None))
        config = args.dataset_config or default_config
        source = {"dataset": hub_id, "dataset_config": config, "text_field": args.text_field}
        documents = read_hub_documents(hub_id, config, args.text_field)
        name = args.name or args.dataset.split("/")[-1].lower().replace("-", "_")
    settings = {**source, "name": name, "tokens": args.tokens, "shard_size": args.shard_size,
                "val_tokens": args.val_tokens}

    # prepare.json records the settings and how far a run got, so that a rerun resumes or does nothing
    meta_path = os.path.join(args.out_dir, "prepare.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else None
    if meta and meta["settings"] != settings:
        changed = sorted(k for k in settings if meta["settings"].get(k) != settings[k])
        raise PrepareError(f"{args.out_dir} was prepared with other settings ({', '.join(changed)} differ); "
                           f"use another --out_dir or delete it")
    if meta and meta["complete"]:
        print(f"{args.out_dir}: complete ({meta['tokens_written']:,} tokens in {meta['shards']} shards); "
              f"nothing to do")
        return meta
    meta = meta or {"settings": settings, "complete": False, "shards": 0, "documents_done": 0,
                    "tokens_written": 0, "carry": 0}

    def save_meta():
        tmp = meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, meta_path)
    save_meta()

    load_gpt2_encoding()  # fail here, in one line, if tiktoken's files cannot be had
    from tqdm import tqdm  # comes with datasets
    # resume: skip (without tokenizing) the documents that completed shards hold. `carry` tokens of the
    # next document already sit in the last shard; they are dropped when it is tokenized again.
    skip_docs, carry = meta["documents_done"], meta["carry"]
    for _ in zip(range(skip_docs), documents):
        pass
    shard_index, written = meta["shards"], meta["tokens_written"]
    written_before = written
    capacity = lambda i: args.val_tokens if i == 0 else args.shard_size
    buffer = np.empty(capacity(shard_index), dtype=np.uint16)
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
        buffer = np.empty(capacity(shard_index), dtype=np.uint16)

    try:
        # one worker a physical core (hyperthreads do not help tiktoken); imap keeps document order
        with mp.Pool(max(1, os.cpu_count() // 2), initializer=init_worker) as pool:
            for tokens in pool.imap(tokenize, documents, chunksize=16):
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
            if filled:  # the source ran out before the budget: the last shard is short
                flush(docs_seen, 0)
    finally:
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
    parser.add_argument("--val_tokens", type=int, default=1_000_000, help="tokens in shard 0, the val split")
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
