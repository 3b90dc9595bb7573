"""Tokenizers: a built-in byte-level one, or any local HF `tokenizer.json`; saved beside checkpoints and rebuilt.

Both kinds share one small interface (`Tokenizer`): `encode`, `decode`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`,
`kind`. Nothing here downloads: a JSON tokenizer is always a file on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from .errors import MomctlError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

# Looked up in this order; the first name the vocabulary knows wins.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "<|im_end|>", "<|end|>", "[EOS]")
BOS_NAMES = ("<s>", "<bos>", "<|bos|>", "<|begin_of_text|>", "<|startoftext|>", "<|im_start|>", "[BOS]")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")

_INSTALL_HINT = "install it with: pip install 'momctl[tokenizers]'"


class Tokenizer(Protocol):
    """What the rest of momctl needs from a tokenizer."""

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, then `<|bos|>`=256, `<|eos|>`=257, `<|pad|>`=258.

    `decode(encode(text)) == text` for every string of Unicode scalar values. Lone surrogates (which UTF-8 cannot
    carry) are encoded as U+FFFD.
    """

    kind = "byte"
    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258
    special_tokens = {"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258}

    def encode_bytes(self, text: str) -> bytes:
        """The UTF-8 bytes of `text` (which are its token ids); used by data.py to tokenise without Python lists."""
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text).encode("utf-8")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return list(self.encode_bytes(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special and out-of-range ids are dropped, invalid UTF-8 becomes U+FFFD. Never raises."""
        return bytes(i for i in (int(i) for i in ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class JsonTokenizer:
    """A local HF `tokenizer.json` run by the `tokenizers` library (an optional extra).

    Special ids are looked up by name (EOS_NAMES, BOS_NAMES, PAD_NAMES) unless given. EOS is required; a tokenizer
    without a BOS or PAD token (GPT-2 style) uses its EOS id for them.

    Args:
        path: the `tokenizer.json` file.
        bos_id, eos_id, pad_id: override the looked-up ids (used when rebuilding a saved tokenizer).
    """

    kind = "json"

    def __init__(self, path: Path, *, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise MomctlError(f"reading {path} needs the 'tokenizers' library, which is not installed; "
                              f"{_INSTALL_HINT}") from None
        self.path = Path(path)
        self.sha256 = file_sha256(self.path)
        try:
            self._tokenizer = HFTokenizer.from_file(str(self.path))
        except Exception as err:  # the library raises plain Exception subclasses for every parse problem
            raise MomctlError(f"{self.path} is not a tokenizer.json the 'tokenizers' library can read ({err}); "
                              "pass the tokenizer.json of a Hugging Face tokenizer, or --tokenizer byte") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        found_eos = self._first_known(EOS_NAMES)
        self.eos_id = eos_id if eos_id is not None else found_eos
        if self.eos_id is None:
            raise MomctlError(f"{self.path} has no end-of-text token (looked for {', '.join(EOS_NAMES)}); add one "
                              "of them to the tokenizer's added_tokens, or use --tokenizer byte")
        self.bos_id = bos_id if bos_id is not None else _first_not_none(self._first_known(BOS_NAMES), self.eos_id)
        self.pad_id = pad_id if pad_id is not None else _first_not_none(self._first_known(PAD_NAMES), self.eos_id)

    def _first_known(self, names: tuple[str, ...]) -> int | None:
        for name in names:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts at once (the library runs them in parallel)."""
        return [e.ids for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens dropped; out-of-range ids are dropped too. Never raises."""
        kept = [i for i in (int(i) for i in ids) if 0 <= i < self.vocab_size]
        return self._tokenizer.decode(kept, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"JsonTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _first_not_none(value: int | None, default: int) -> int:
    return default if value is None else value


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (MomctlError if it cannot be read)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise MomctlError(f"cannot read {path} ({err.strerror}); check the path and its permissions") from None
    return digest.hexdigest()


def load_tokenizer(spec: str | None) -> Tokenizer:
    """The tokenizer a user names on the command line.

    Args:
        spec: None or "byte" for ByteTokenizer; a path to a `tokenizer.json`, or to a folder holding one, for
            JsonTokenizer.
    """
    if spec is None or spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise MomctlError(f"tokenizer {spec!r} is neither 'byte' nor an existing tokenizer.json ({path} not found); "
                          "pass --tokenizer byte, a path to a tokenizer.json, or a folder containing one")
    return JsonTokenizer(path)


def describe_tokenizer(tokenizer: Tokenizer) -> dict:
    """kind, vocab_size, sha256 (None for byte) and the bos/eos/pad ids."""
    return {
        "kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "sha256": getattr(tokenizer, "sha256", None),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
    }


def save_tokenizer(tokenizer: Tokenizer, folder: Path) -> dict:
    """Write what rebuilds `tokenizer` into `folder` (created if needed); returns `describe_tokenizer(tokenizer)`.

    Byte: `tokenizer_config.json` only. JSON: a copy of `tokenizer.json` plus `tokenizer_config.json` holding its
    sha256 and special ids. Files are replaced atomically, so a failure leaves any previous copy intact.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = describe_tokenizer(tokenizer)
    if tokenizer.kind == "json":
        tmp = temp_path_beside(folder / TOKENIZER_FILE)
        try:
            shutil.copyfile(tokenizer.path, tmp)
            os.replace(tmp, folder / TOKENIZER_FILE)
        finally:
            tmp.unlink(missing_ok=True)
    elif tokenizer.kind != "byte":
        raise MomctlError(f"cannot save a tokenizer of kind {tokenizer.kind!r}; expected 'byte' or 'json'")
    write_text_atomic(folder / CONFIG_FILE, json.dumps(info, indent=2) + "\n")
    return info


def load_saved_tokenizer(folder: Path) -> Tokenizer:
    """Rebuild the tokenizer `save_tokenizer` wrote into `folder`, checking the sha256 of a copied tokenizer.json."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    try:
        info = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError:
        raise MomctlError(f"{config_path} is missing or unreadable; the folder was not written by momctl's "
                          "save_tokenizer (re-save the checkpoint, or pass --tokenizer explicitly)") from None
    except json.JSONDecodeError as err:
        raise MomctlError(f"{config_path} is not valid JSON ({err}); re-save the tokenizer") from None
    kind = info.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind != "json":
        raise MomctlError(f"{config_path} has kind={kind!r}; expected 'byte' or 'json' (re-save the tokenizer)")
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise MomctlError(f"{path} is missing but {config_path} says kind='json'; copy the original tokenizer.json "
                          "there (sha256 " + str(info.get("sha256")) + ")")
    actual = file_sha256(path)
    if actual != info.get("sha256"):
        raise MomctlError(f"{path} has sha256 {actual} but {config_path} expects {info.get('sha256')}; the file "
                          "was changed after saving: restore the original tokenizer.json")
    return JsonTokenizer(path, bos_id=info.get("bos_id"), eos_id=info.get("eos_id"), pad_id=info.get("pad_id"))


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """"byte" or "json:<sha256>": equal fingerprints mean the same token ids for the same text."""
    if tokenizer.kind == "byte":
        return "byte"
    return f"json:{tokenizer.sha256}"


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file in the same folder and os.replace."""
    tmp = temp_path_beside(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temp_path_beside(path: Path) -> Path:
    """A unique temp name beside `path` (same filesystem, so os.replace is atomic; normal file permissions)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
