"""Data: the built-in corpus (built once, cached, deterministic), user data kinds, bad inputs, batch contract."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from momctl import data
from momctl.data import (
    TokenDataset,
    builtin_cache_path,
    builtin_documents,
    builtin_tokens,
    load_dataset,
    prepare_bin,
    read_sidecar,
    sidecar_path,
    split_sizes,
    tokenize_documents,
)
from momctl.errors import MomctlError
from momctl.tokenizers import ByteTokenizer

BYTE = ByteTokenizer()
EOS = BYTE.eos_id


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's real cache."""
    monkeypatch.setenv("MOMCTL_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def docs_cache(tmp_path_factory):
    """builtin:python-docs built once for this module (about 3 s); yields the cache folder."""
    folder = tmp_path_factory.mktemp("docs_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOMCTL_CACHE_DIR", str(folder))
        builtin_tokens("python-docs", BYTE)
    return folder


def expected_tokens(*documents):
    return [t for doc in documents for t in (*doc.encode("utf-8"), EOS)]


def sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_builtin_docs_is_large_and_separates_documents_with_eos(docs_cache, monkeypatch):
    monkeypatch.setenv("MOMCTL_CACHE_DIR", str(docs_cache))
    tokens = builtin_tokens("python-docs", BYTE)
    info = read_sidecar(builtin_cache_path("python-docs", BYTE))
    assert info["text_bytes"] > 1_000_000 and info["tokenizer"] == "byte" and info["num_tokens"] == len(tokens)
    assert int((tokens == EOS).sum()) == info["documents"] > 1000
    assert tokens[-1] == EOS
    first = next(builtin_documents("python-docs"))
    assert first.startswith("__future__\n")  # sorted paths: __future__.py comes first; "<dotted name>\n<docstring>"
    assert list(tokens[:len(first.encode()) + 1]) == expected_tokens(first)
    assert "Return" in BYTE.decode(tokens[:300_000].tolist())


def test_builtin_docs_is_cached_and_not_rebuilt(docs_cache, monkeypatch):
    monkeypatch.setenv("MOMCTL_CACHE_DIR", str(docs_cache))
    path = builtin_cache_path("python-docs", BYTE)
    mtime = path.stat().st_mtime_ns

    def no_rebuild(name):
        raise AssertionError("the cached corpus was rebuilt")

    monkeypatch.setattr(data, "builtin_documents", no_rebuild)
    dataset = load_dataset("builtin:python-docs", BYTE, seq_len=64)
    assert path.stat().st_mtime_ns == mtime
    assert len(dataset.train) + len(dataset.val) == read_sidecar(path)["num_tokens"]
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_builtin_docs_is_deterministic(docs_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MOMCTL_CACHE_DIR", str(docs_cache))
    first = builtin_tokens("python-docs", BYTE)
    first_name = builtin_cache_path("python-docs", BYTE).name
    monkeypatch.setenv("MOMCTL_CACHE_DIR", str(tmp_path / "elsewhere"))
    second = builtin_tokens("python-docs", BYTE)
    assert builtin_cache_path("python-docs", BYTE).name == first_name
    assert sha256(first) == sha256(second)


def test_builtin_code_and_unknown_builtin():
    tokens = builtin_tokens("python-code", BYTE)
    assert len(tokens) > 5_000_000 and "def " in BYTE.decode(tokens[:200_000].tolist())
    digest = sha256(tokens)
    path = builtin_cache_path("python-code", BYTE)
    with open(path, "r+b") as f:  # a damaged cache entry is rebuilt, not trusted
        f.truncate(1000)
    assert sha256(builtin_tokens("python-code", BYTE)) == digest
    with pytest.raises(MomctlError, match="builtin:python-docs, builtin:python-code, builtin:all") as info:
        load_dataset("builtin:wikipedia", BYTE, seq_len=64)
    assert "builtin:wikipedia" in str(info.value)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOMCTL_CACHE_DIR", str(tmp_path / "a"))
    assert data.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("MOMCTL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "momctl"


def all_tokens(dataset):
    return list(np.concatenate([dataset.train, dataset.val]))


def test_user_text_file_and_folder(tmp_path):
    (tmp_path / "one.txt").write_text("héllo 🎉\n" * 4)
    assert all_tokens(load_dataset(str(tmp_path / "one.txt"), BYTE, seq_len=4)) == expected_tokens("héllo 🎉\n" * 4)

    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "z.txt").write_text("third doc")
    (folder / "a.txt").write_text("first doc")
    (folder / "b.txt").write_text("second doc")
    (folder / "notes.md").write_text("ignored")
    (folder / "empty.txt").write_text("")  # an empty document adds nothing, not even EOS
    expected = expected_tokens("first doc", "second doc", "third doc")
    assert all_tokens(load_dataset(str(folder), BYTE, seq_len=4)) == expected


def test_user_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "alpha beta", "id": 1}\n\n{"text": "gamma delta"}\n{"body": "x", "text": "épsilon"}\n')
    assert all_tokens(load_dataset(str(path), BYTE, seq_len=4)) == expected_tokens("alpha beta", "gamma delta",
                                                                                    "épsilon")
    path.write_text('{"body": "alpha beta"}\n{"body": "gamma"}\n')
    assert all_tokens(load_dataset(str(path), BYTE, seq_len=4, text_field="body")) == expected_tokens("alpha beta",
                                                                                                      "gamma")


def test_user_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["alpha beta", "gamma 🎉", "delta"], "n": [1, 2, 3]}), path)
    dataset = load_dataset(str(path), BYTE, seq_len=4, text_field="content")
    assert all_tokens(dataset) == expected_tokens("alpha beta", "gamma 🎉", "delta")
    with pytest.raises(MomctlError, match="no column 'text'.*'content'"):
        load_dataset(str(path), BYTE, seq_len=4)


def test_prepare_bin_and_load_it(tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"document number {i} ✓"}) + "\n" for i in range(50)))
    out = tmp_path / "prepared" / "docs.bin"
    info = prepare_bin(str(source), out, BYTE)
    assert info == read_sidecar(out)
    assert sidecar_path(out).name == "docs.bin.json"
    assert {k: info[k] for k in ("dtype", "vocab_size", "tokenizer", "documents")} == {
        "dtype": "uint16", "vocab_size": 259, "tokenizer": "byte", "documents": 50}
    direct = load_dataset(str(source), BYTE, seq_len=16)
    from_bin = load_dataset(str(out), BYTE, seq_len=16)
    assert isinstance(from_bin.train, np.memmap)
    assert all_tokens(from_bin) == all_tokens(direct) and info["num_tokens"] == len(all_tokens(direct))
    x_direct, _ = direct.get_batch("train", 5, 16, 4, 0, 4, seed=1)
    x_bin, _ = from_bin.get_batch("train", 5, 16, 4, 0, 4, seed=1)
    assert torch.equal(x_direct, x_bin)

    # A failed prepare keeps the previous output and leaves no temp files.
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(MomctlError, match="line 2"):
        prepare_bin(str(tmp_path / "bad.jsonl"), out, BYTE)
    assert read_sidecar(out) == info and sorted(p.name for p in out.parent.iterdir()) == ["docs.bin", "docs.bin.json"]


def test_bin_with_another_tokenizer_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 20)
    out = tmp_path / "a.bin"
    prepare_bin(str(tmp_path / "a.txt"), out, BYTE)
    sidecar = json.loads(sidecar_path(out).read_text())
    sidecar_path(out).write_text(json.dumps({**sidecar, "tokenizer": "json:" + "0" * 64}))
    with pytest.raises(MomctlError, match="tokenised with 'json:0+' but the tokenizer in use is 'byte'"):
        load_dataset(str(out), BYTE, seq_len=4)
    sidecar_path(out).unlink()
    with pytest.raises(MomctlError, match="no readable sidecar"):
        load_dataset(str(out), BYTE, seq_len=4)


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize("name,content,kwargs,words", [
    ("missing.txt", None, {}, ["missing.txt", "does not exist", "builtin:python-docs"]),
    ("empty.txt", "", {}, ["0 tokens"]),
    ("latin1.txt", "héllo".encode("latin-1"), {}, ["latin1.txt", "not UTF-8", "byte offset 1", "re-encode"]),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "h\xe9"}\n', {}, ["latin1.jsonl", "byte offset 26"]),
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', {}, ["bad.jsonl, line 2", "invalid JSON"]),
    ("field.jsonl", '{"text": "ok"}\n{"body": "x"}\n', {}, ["field.jsonl, line 2", "no field 'text'", "'body'",
                                                          "--text-field"]),
    ("list.jsonl", '["text"]\n', {}, ["line 1", "expected a JSON object"]),
    ("number.jsonl", '{"text": 3}\n', {}, ["line 1", "is int, expected a string"]),
    ("data.csv", "a,b\n", {}, ["'.csv'", ".jsonl"]),
    ("short.txt", "abc", {"seq_len": 8}, ["has 4 tokens", "needs at least 18", "--seq-len"]),
    ("no_txt/readme.md", "x", {}, ["no *.txt files"]),
])
def test_bad_user_data_raises_a_useful_error(tmp_path, name, content, kwargs, words):
    spec = str(tmp_path / name) if content is None else write(tmp_path / name, content)
    if name.startswith("no_txt"):
        spec = str(tmp_path / "no_txt")
    with pytest.raises(MomctlError) as info:
        load_dataset(spec, BYTE, **{"seq_len": 4, **kwargs})
    for word in words:
        assert word in str(info.value)


def test_split_sizes_rule():
    assert split_sizes(10_000_000, 1024) == (9_800_000, 200_000)  # capped
    assert split_sizes(100_000, 64) == (95_000, 5_000)  # 5%
    assert split_sizes(40, 8) == (31, 9)  # tiny: one window each
    assert split_sizes(18, 8) == (9, 9)
    with pytest.raises(MomctlError, match="has 17 tokens"):
        split_sizes(17, 8)


def arange_dataset(num_tokens=1000, seq_len=8):
    return TokenDataset.from_tokens("arange", np.arange(num_tokens, dtype=np.uint32), seq_len=seq_len,
                                    vocab_size=num_tokens)


def test_get_batch_shape_shift_and_determinism():
    dataset = arange_dataset()
    x, y = dataset.get_batch("train", step=3, seq_len=8, global_batch=6, start=0, count=6, seed=7)
    assert x.shape == y.shape == (6, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive tokens: windows are contiguous and y is x shifted by one
    again = dataset.get_batch("train", step=3, seq_len=8, global_batch=6, start=0, count=6, seed=7)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(x, dataset.get_batch("train", 4, 8, 6, 0, 6, seed=7)[0])
    assert not torch.equal(x, dataset.get_batch("train", 3, 8, 6, 0, 6, seed=8)[0])


def test_get_batch_halves_concatenate_to_the_whole():
    dataset = arange_dataset()
    whole = dataset.get_batch("train", 11, 8, 8, 0, 8, seed=0)
    halves = [dataset.get_batch("train", 11, 8, 8, start, 4, seed=0) for start in (0, 4)]
    quarters = [dataset.get_batch("train", 11, 8, 8, start, 2, seed=0) for start in (0, 2, 4, 6)]
    for parts in (halves, quarters):
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])


def test_get_batch_is_the_same_in_another_process():
    code = ("import hashlib, numpy as np; from momctl.data import TokenDataset; "
            "d = TokenDataset.from_tokens('a', np.arange(1000, dtype=np.uint32), seq_len=8, vocab_size=1000); "
            "print(d.get_batch('val', 2, 8, 4, 1, 2, seed=3)[0].tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == str(arange_dataset().get_batch("val", 2, 8, 4, 1, 2, seed=3)[0].tolist())


def test_train_and_val_windows_come_from_disjoint_ranges():
    dataset = arange_dataset(num_tokens=400, seq_len=8)
    num_train = len(dataset.train)
    assert num_train + len(dataset.val) == 400
    for step in range(50):
        x, y = dataset.get_batch("train", step, 8, 16, 0, 16, seed=0)
        assert int(y.max()) < num_train
        x, y = dataset.get_batch("val", step, 8, 16, 0, 16, seed=0)
        assert int(x.min()) >= num_train and int(y.max()) < 400


def test_get_batch_rejects_bad_arguments():
    dataset = arange_dataset()
    with pytest.raises(ValueError, match="split='test'"):
        dataset.get_batch("test", 0, 8, 4, 0, 4, seed=0)
    with pytest.raises(ValueError, match="start=3, count=2 with global_batch=4"):
        dataset.get_batch("train", 0, 8, 4, 3, 2, seed=0)
    with pytest.raises(MomctlError, match="val split has 50 tokens"):
        dataset.get_batch("val", 0, 64, 4, 0, 4, seed=0)


def test_tokenize_documents_skips_empty_documents():
    assert list(tokenize_documents(["a", "", "b"], BYTE)) == expected_tokens("a", "b")
    assert tokenize_documents([], BYTE).dtype == np.uint16
