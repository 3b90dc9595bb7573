"""Training data: sources -> one flat token array -> deterministic random-window batches.

Sources (`load_dataset(spec, ...)`):
  builtin:python-docs   the standard library's docstrings (parsed with `ast`, never imported) + `pydoc_data` topics
  builtin:python-code   the standard library's .py sources
  builtin:all           both, docs first
  mqar[:k=v,...]        synthetic associative recall (momctl/mqar.py)
  a path                .txt (one document), a folder (every *.txt below it), .jsonl, .parquet, or a prepared .bin

Every document is followed by the tokenizer's EOS, so documents are separated by EOS. Built-in corpora are tokenised
once and cached as a .bin under `cache_dir()`. A `.bin` is a flat array of token ids (uint16 or uint32) beside a
sidecar `<name>.bin.json` holding {"dtype", "num_tokens", "vocab_size", "tokenizer", "documents", ...}.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import platform
import sysconfig
import tokenize
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .errors import MomctlError
from .tokenizers import ByteTokenizer, Tokenizer, temp_path_beside, tokenizer_fingerprint, write_text_atomic

BUILTIN_CORPORA = ("python-docs", "python-code", "all")
# Bump when the extraction rules change: it is part of the cache key.
BUILDER_VERSION = 1
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
                              "__pycache__"})
VAL_FRACTION = 0.05
MAX_VAL_TOKENS = 200_000
SPLITS = ("train", "val")
_CHUNK_CHARS = 1 << 22  # tokenise this much text at a time
_CHUNK_DOCS = 1024
_SOURCES_HELP = ("pass builtin:python-docs, builtin:python-code, builtin:all, mqar[:vocab_size=N,num_pairs=N], or a "
                 ".txt / .jsonl / .parquet / .bin file or a folder of .txt files")


def cache_dir() -> Path:
    """$MOMCTL_CACHE_DIR, else $XDG_CACHE_HOME/momctl, else ~/.cache/momctl (not created here)."""
    if os.environ.get("MOMCTL_CACHE_DIR"):
        return Path(os.environ["MOMCTL_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "momctl"
    return Path.home() / ".cache" / "momctl"


# Built-in corpus: the standard library, read from disk.


def stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib root and its .py files (skipping STDLIB_SKIP_DIRS), sorted by relative POSIX path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in STDLIB_SKIP_DIRS]
        files.extend(Path(folder) / name for name in names if name.endswith(".py"))
    return root, sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _docstrings(tree: ast.Module, module: str) -> Iterator[str]:
    """One document per module/class/function docstring, in source order: "<dotted name>\\n<cleaned docstring>".

    Definitions nested in other statements (`if`, `try`, function bodies) count too; expressions are not entered.
    """
    definitions = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    stack: list[tuple[ast.AST, str]] = [(tree, module)]
    while stack:
        node, name = stack.pop()
        if isinstance(node, definitions):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield f"{name}\n{doc}"
        children = [(child, f"{name}.{child.name}" if isinstance(child, definitions) else name)
                    for child in ast.iter_child_nodes(node)
                    if isinstance(child, ast.stmt | ast.excepthandler | ast.match_case)]
        # Reversed so the stack pops them in source order.
        stack.extend(reversed(children))


def _docs_documents(root: Path, files: list[Path]) -> Iterator[str]:
    """Docstrings of every parsable stdlib file (a file this Python cannot parse is skipped), then pydoc topics."""
    for path in files:
        try:
            with warnings.catch_warnings():  # invalid escapes etc. in old sources are not the user's problem
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        yield from _docstrings(tree, _module_name(path.relative_to(root)))
    topics = _pydoc_topics()
    for key in sorted(topics):
        yield topics[key]


def _pydoc_topics() -> dict[str, str]:
    """`pydoc_data.topics.topics` (the language reference pages `help()` shows); {} where a distro left it out."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return {}
    return topics


def _code_documents(files: list[Path]) -> Iterator[str]:
    """Each stdlib file's source text (decoded per its coding cookie; an undecodable file is skipped)."""
    for path in files:
        source = path.read_bytes()
        try:
            # The interpreter's rule: a PEP 263 coding cookie, else UTF-8.
            encoding, _ = tokenize.detect_encoding(io.BytesIO(source).readline)
            text = source.decode(encoding)
        except (SyntaxError, UnicodeDecodeError, LookupError):
            continue
        yield text


def builtin_documents(name: str) -> Iterator[str]:
    """The documents of `builtin:<name>`, in their fixed order.

    Args:
        name: one of BUILTIN_CORPORA ("python-docs", "python-code", "all").
    """
    _check_builtin_name(name)
    root, files = stdlib_files()
    if name in ("python-docs", "all"):
        yield from _docs_documents(root, files)
    if name in ("python-code", "all"):
        yield from _code_documents(files)


def builtin_source_sha256(name: str) -> str:
    """sha256 over everything `builtin_documents(name)` reads (file paths and bytes, pydoc topics).

    It changes whenever the extracted text could, and costs a read instead of a parse, so a cache hit is cheap.
    """
    _check_builtin_name(name)
    root, files = stdlib_files()
    digest = hashlib.sha256(name.encode())
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    if name != "python-code":
        topics = _pydoc_topics()
        for key in sorted(topics):
            digest.update(key.encode() + b"\0" + topics[key].encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def _check_builtin_name(name: str) -> None:
    if name not in BUILTIN_CORPORA:
        known = ", ".join(f"builtin:{corpus}" for corpus in BUILTIN_CORPORA)
        raise MomctlError(f"unknown built-in corpus 'builtin:{name}'; the built-in corpora are {known}")


def builtin_cache_path(name: str, tokenizer: Tokenizer) -> Path:
    """Where the tokenised `builtin:<name>` lives: named by a hash of (corpus, Python version, tokenizer, text)."""
    key = json.dumps([name, platform.python_version(), tokenizer_fingerprint(tokenizer), builtin_source_sha256(name),
                      BUILDER_VERSION])
    return cache_dir() / "corpora" / f"builtin-{name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.bin"


def builtin_tokens(name: str, tokenizer: Tokenizer) -> np.ndarray:
    """Token ids of `builtin:<name>` (a read-only memmap): built and cached on first use, read from the cache after.

    Args:
        name: one of BUILTIN_CORPORA.
        tokenizer: the tokenizer; its fingerprint is part of the cache key.

    Returns:
        `[N]` uint16/uint32 token ids, each document followed by EOS.
    """
    path = builtin_cache_path(name, tokenizer)
    if path.is_file() and sidecar_path(path).is_file():
        try:
            return load_bin(path, tokenizer)
        except MomctlError:
            pass  # a damaged cache entry is rebuilt below
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bin(builtin_documents(name), path, tokenizer, source=f"builtin:{name}")
    return load_bin(path, tokenizer)


# User data: text files, folders, jsonl, parquet.


def _decode_utf8(data: bytes, path: Path, base_offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MomctlError(f"{path} is not UTF-8: invalid byte 0x{data[err.start]:02x} at byte offset "
                          f"{base_offset + err.start}; re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise MomctlError(f"cannot read {path} ({err.strerror}); check that it exists and is readable") from None


def _text_documents(path: Path) -> Iterator[str]:
    yield _decode_utf8(_read_bytes(path), path)


def _folder_documents(folder: Path) -> Iterator[str]:
    files = sorted((p for p in folder.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise MomctlError(f"folder {folder} holds no *.txt files; put UTF-8 .txt files in it (one document each), "
                          "or pass a .jsonl/.parquet file")
    for path in files:
        yield from _text_documents(path)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    """One document per non-blank line: the string in field `text_field` of the line's JSON object."""
    offset = 0
    try:
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                line = _decode_utf8(raw, path, offset)
                offset += len(raw)
                if line.strip():
                    yield _jsonl_text(line, path, line_number, text_field)
    except OSError as err:
        raise MomctlError(f"cannot read {path} ({err.strerror}); check that it exists and is readable") from None


def _jsonl_text(line: str, path: Path, line_number: int, text_field: str) -> str:
    where = f"{path}, line {line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise MomctlError(f"{where}: invalid JSON ({err.msg} at column {err.colno}); each line must be one JSON "
                          f'object such as {{"{text_field}": "..."}}') from None
    if not isinstance(record, dict):
        raise MomctlError(f"{where}: expected a JSON object, got {type(record).__name__}; each line must look like "
                          f'{{"{text_field}": "..."}}')
    if text_field not in record:
        fields = ", ".join(map(repr, record)) or "none"
        raise MomctlError(f"{where}: no field {text_field!r} (fields: {fields}); pass --text-field with the name of "
                          "the field holding the text")
    text = record[text_field]
    if not isinstance(text, str):
        raise MomctlError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
    return text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    """One document per row: the string in column `text_field`."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MomctlError(f"reading {path} needs pyarrow, which is not installed; install it with: "
                          "pip install 'momctl[parquet]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses for unreadable files
        raise MomctlError(f"cannot read {path} as parquet ({err}); check the file") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise MomctlError(f"{path} has no column {text_field!r} (columns: {', '.join(map(repr, columns))}); pass "
                          "--text-field with the name of the column holding the text")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise MomctlError(f"{path}, row {row}: column {text_field!r} holds {text!r}, expected a string; "
                                  "drop or fill such rows")
            row += 1
            yield text


def iter_documents(spec: str, *, text_field: str = "text") -> Iterator[str]:
    """The documents of a text source: `builtin:<name>` or a .txt / folder / .jsonl / .parquet path.

    Errors about the path itself (missing, unknown kind) raise here; errors inside a file raise while iterating.
    """
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        _check_builtin_name(name)
        return builtin_documents(name)
    path = Path(spec).expanduser()
    if not path.exists():
        raise MomctlError(f"data {spec!r} does not exist; {_SOURCES_HELP}")
    if path.is_dir():
        return _folder_documents(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _text_documents(path)
    if suffix == ".jsonl":
        return _jsonl_documents(path, text_field)
    if suffix == ".parquet":
        return _parquet_documents(path, text_field)
    if suffix == ".bin":
        raise MomctlError(f"{path} is already token ids; load it with load_dataset, or prepare from the text source")
    raise MomctlError(f"data {spec!r} has suffix {suffix or '(none)'!r}, which momctl cannot read; {_SOURCES_HELP}")


# Tokens and .bin files.


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for doc in documents:
        if not doc:  # an empty document adds nothing, not even an EOS
            continue
        chunk.append(doc)
        chars += len(doc)
        if chars >= _CHUNK_CHARS or len(chunk) >= _CHUNK_DOCS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def token_chunks(documents: Iterable[str], tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, int, int]]:
    """Tokenise documents a chunk at a time, each followed by EOS.

    Yields:
        (`[n]` token ids of dtype `token_dtype(tokenizer.vocab_size)`, documents in the chunk, UTF-8 bytes of text).
    """
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    for chunk in _chunks(documents):
        if isinstance(tokenizer, ByteTokenizer):
            encoded = [np.frombuffer(tokenizer.encode_bytes(doc), dtype=np.uint8) for doc in chunk]
            text_bytes = sum(len(ids) for ids in encoded)
        else:
            encoded = [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(chunk)]
            text_bytes = sum(len(doc.encode("utf-8", "surrogatepass")) for doc in chunk)
        parts = [part for ids in encoded for part in (ids, eos)]
        yield np.concatenate(parts).astype(dtype, copy=False), len(chunk), text_bytes


def tokenize_documents(documents: Iterable[str], tokenizer: Tokenizer) -> np.ndarray:
    """All documents as one `[N]` token array in memory (each followed by EOS)."""
    arrays = [tokens for tokens, _, _ in token_chunks(documents, tokenizer)]
    if not arrays:
        return np.zeros(0, dtype=token_dtype(tokenizer.vocab_size))
    return np.concatenate(arrays)


def sidecar_path(bin_path: Path) -> Path:
    """`data.bin` -> `data.bin.json`."""
    return bin_path.with_name(bin_path.name + ".json")


def write_bin(documents: Iterable[str], out: Path, tokenizer: Tokenizer, *, source: str) -> dict:
    """Stream documents' tokens into `out` and its sidecar, both replaced atomically; returns the sidecar dict.

    On any error (including an empty corpus) nothing is replaced and the temp files are removed.
    """
    out = Path(out)
    tmp_bin = temp_path_beside(out)
    num_tokens = num_documents = text_bytes = 0
    try:
        with open(tmp_bin, "wb") as f:
            for tokens, docs, nbytes in token_chunks(documents, tokenizer):
                f.write(tokens.tobytes())
                num_tokens += len(tokens)
                num_documents += docs
                text_bytes += nbytes
        if num_tokens == 0:
            raise MomctlError(f"data {source!r} has no text (0 tokens); give it at least one non-empty document")
        sidecar = {
            "dtype": token_dtype(tokenizer.vocab_size).name,
            "num_tokens": num_tokens,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "documents": num_documents,
            "text_bytes": text_bytes,
            "source": source,
        }
        os.replace(tmp_bin, out)
        write_text_atomic(sidecar_path(out), json.dumps(sidecar, indent=2) + "\n")
        return sidecar
    finally:
        tmp_bin.unlink(missing_ok=True)


def prepare_bin(spec: str, out: Path, tokenizer: Tokenizer, text_field: str = "text") -> dict:
    """Tokenise a text source into `out` (.bin) plus its sidecar `<out>.json`; returns the sidecar dict.

    Args:
        spec: `builtin:<name>` or a .txt / folder / .jsonl / .parquet path (not a .bin, not mqar).
        out: the .bin file to write; its folder is created. Replaced atomically, so a failure keeps an older one.
        tokenizer: the tokenizer; its fingerprint goes in the sidecar.
        text_field: the jsonl field / parquet column holding the text.
    """
    if spec == "mqar" or spec.startswith("mqar:"):
        raise MomctlError("mqar data is generated on the fly and has nothing to prepare; pass it directly as --data")
    out = Path(out)
    if out.suffix != ".bin":
        raise MomctlError(f"output {out} should end in .bin (got {out.suffix or 'no suffix'!r}); e.g. {out}.bin")
    documents = iter_documents(spec, text_field=text_field)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_bin(documents, out, tokenizer, source=spec)


def read_sidecar(path: Path) -> dict:
    """The checked sidecar of the .bin `path` (MomctlError if missing, malformed or not matching the file size)."""
    side = sidecar_path(path)
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except OSError:
        raise MomctlError(f"{path} has no readable sidecar {side}; write .bin files with `momctl data prepare`, "
                          "which writes both") from None
    except json.JSONDecodeError as err:
        raise MomctlError(f"{side} is not valid JSON ({err}); re-run `momctl data prepare`") from None
    missing = [key for key in ("dtype", "num_tokens", "tokenizer") if key not in info]
    if missing:
        raise MomctlError(f"{side} lacks {', '.join(missing)}; re-run `momctl data prepare`")
    if info["dtype"] not in ("uint16", "uint32"):
        raise MomctlError(f"{side} has dtype {info['dtype']!r}; expected 'uint16' or 'uint32'")
    expected = int(info["num_tokens"]) * np.dtype(info["dtype"]).itemsize
    size = path.stat().st_size
    if size != expected:
        raise MomctlError(f"{path} has {size} bytes but its sidecar says {info['num_tokens']} {info['dtype']} tokens "
                          f"({expected} bytes); the file is truncated or stale: re-run `momctl data prepare`")
    return info


def load_bin(path: Path, tokenizer: Tokenizer) -> np.ndarray:
    """The token ids of a prepared .bin, memory-mapped read-only, after checking it was made with `tokenizer`."""
    path = Path(path)
    if not path.is_file():
        raise MomctlError(f"data {str(path)!r} does not exist; {_SOURCES_HELP}")
    info = read_sidecar(path)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if info["tokenizer"] != fingerprint:
        raise MomctlError(f"{path} was tokenised with {info['tokenizer']!r} but the tokenizer in use is "
                          f"{fingerprint!r}; pass the tokenizer it was prepared with, or re-run `momctl data prepare`")
    if int(info["num_tokens"]) == 0:
        raise MomctlError(f"{path} holds 0 tokens; prepare it from a source with text")
    return np.memmap(path, dtype=np.dtype(info["dtype"]), mode="r", shape=(int(info["num_tokens"]),))


# Datasets and batches.


def batch_generator(seed: int, split: str, step: int) -> torch.Generator:
    """A CPU generator seeded from (seed, split, step) by sha256: the same in every process and on every rank."""
    digest = hashlib.sha256(f"momctl-batch:{seed}:{split}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def check_batch_args(split: str, step: int, seq_len: int, global_batch: int, start: int, count: int) -> None:
    """ValueError unless split is train/val and `start .. start+count-1` lies inside `0 .. global_batch-1`."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    if step < 0 or seq_len < 1 or global_batch < 1:
        raise ValueError(f"step={step}, seq_len={seq_len}, global_batch={global_batch}; expected step >= 0, "
                         "seq_len >= 1 and global_batch >= 1")
    if start < 0 or count < 1 or start + count > global_batch:
        raise ValueError(f"start={start}, count={count} with global_batch={global_batch}; expected 0 <= start and "
                         "1 <= count with start + count <= global_batch")


def split_sizes(num_tokens: int, seq_len: int) -> tuple[int, int]:
    """(train, val) token counts: validation is the last max(seq_len + 1, min(ceil(5%), 200_000)) tokens.

    So a large corpus gives the same split for any seq_len, and a tiny one still gets one window in each split.
    MomctlError if the corpus has fewer than 2 * (seq_len + 1) tokens.
    """
    window = seq_len + 1
    if num_tokens < 2 * window:
        raise MomctlError(f"the corpus has {num_tokens} tokens but seq_len={seq_len} needs at least {2 * window} "
                          f"(one window of {window} for training and one for validation); use a shorter --seq-len "
                          "or more data")
    val = max(window, min(-(-num_tokens * 5 // 100), MAX_VAL_TOKENS))
    val = min(val, num_tokens - window)
    return num_tokens - val, val


class TokenDataset:
    """A token corpus split into train (the head) and val (the tail), served as random windows.

    Args:
        name: what to call it in logs (the spec).
        train: `[N_train]` token ids (numpy, memmap allowed).
        val: `[N_val]` token ids.
        vocab_size: the tokenizer's vocabulary size.
    """

    def __init__(self, name: str, train: np.ndarray, val: np.ndarray, vocab_size: int):
        self.name = name
        self.train = train
        self.val = val
        self.vocab_size = vocab_size

    @classmethod
    def from_tokens(cls, name: str, tokens: np.ndarray, *, seq_len: int, vocab_size: int) -> TokenDataset:
        """Split `[N]` tokens by `split_sizes(N, seq_len)`: train = tokens[:N_train], val = the rest."""
        num_train, _ = split_sizes(len(tokens), seq_len)
        return cls(name, tokens[:num_train], tokens[num_train:], vocab_size)

    def __repr__(self) -> str:
        return f"TokenDataset({self.name!r}, train={len(self.train)} tokens, val={len(self.val)} tokens)"

    def get_batch(self, split: str, step: int, seq_len: int, global_batch: int, start: int, count: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences `start .. start+count-1` of the `global_batch` random windows of batch number `step`.

        All `global_batch` window offsets are drawn from `batch_generator(seed, split, step)` and then sliced, so
        ranks that each take a slice see exactly what one process taking the whole batch sees, and a resumed run
        sees the same batches.

        Args:
            split: "train" or "val".
            step: the batch number (>= 0).
            seq_len: tokens per sequence.
            global_batch: sequences in the whole batch, over all ranks and micro-batches.
            start, count: which of them to return.
            seed: the run's data seed.

        Returns:
            x, y: int64 `[count, seq_len]`, with y[:, t] = the token after x[:, t].
        """
        check_batch_args(split, step, seq_len, global_batch, start, count)
        tokens = self.train if split == "train" else self.val
        if len(tokens) < seq_len + 1:
            raise MomctlError(f"the {split} split has {len(tokens)} tokens, fewer than one window of seq_len + 1 = "
                              f"{seq_len + 1}; load the dataset with this seq_len or use a shorter one")
        generator = batch_generator(seed, split, step)
        offsets = torch.randint(0, len(tokens) - seq_len, (global_batch,), generator=generator)[start:start + count]
        index = offsets.numpy()[:, None] + np.arange(seq_len + 1)  # [count, seq_len + 1]
        windows = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def load_dataset(spec: str, tokenizer: Tokenizer | None, *, text_field: str = "text", seq_len: int):
    """The dataset a user names; every kind has `name`, `vocab_size` and `get_batch(...)`.

    Args:
        spec: `builtin:python-docs|python-code|all`, `mqar[:vocab_size=N,num_pairs=N]`, or a path to a .txt file,
            a folder of .txt files, a .jsonl / .parquet file (text in `text_field`), or a prepared .bin.
        tokenizer: turns text into ids (unused by mqar, may be None there).
        text_field: the jsonl field / parquet column holding the text.
        seq_len: the training sequence length (sets the minimum split sizes).

    Returns:
        TokenDataset, or MQARDataset for `mqar`.
    """
    if spec == "mqar" or spec.startswith("mqar:"):
        from .mqar import MQARDataset

        dataset = MQARDataset.from_spec(spec)
        dataset.check_seq_len(seq_len)
        return dataset
    if tokenizer is None:
        raise MomctlError(f"data {spec!r} is text and needs a tokenizer; pass --tokenizer byte or a tokenizer.json")
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        _check_builtin_name(name)
        tokens = builtin_tokens(name, tokenizer)
    elif spec.lower().endswith(".bin"):
        tokens = load_bin(Path(spec).expanduser(), tokenizer)
    else:
        tokens = tokenize_documents(iter_documents(spec, text_field=text_field), tokenizer)
        if len(tokens) == 0:
            raise MomctlError(f"data {spec!r} has no text (0 tokens); give it at least one non-empty document")
    return TokenDataset.from_tokens(spec, tokens, seq_len=seq_len, vocab_size=tokenizer.vocab_size)
