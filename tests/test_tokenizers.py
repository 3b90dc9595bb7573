"""Tokenizers: exact round trips, special ids, save/load with sha256 checks, fingerprints, helpful errors."""

import hashlib
import json
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from momctl.errors import MomctlError
from momctl.tokenizers import (
    ByteTokenizer,
    JsonTokenizer,
    load_saved_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
)

SAMPLE = "héllo wörld 🎉 \n\t the quick brown fox — 漢字"


def make_tokenizer_json(path, special_tokens=("<|endoftext|>", "<pad>")):
    """Train a tiny byte-level BPE offline and save it as `path` (a tokenizer.json)."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=list(special_tokens),
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([SAMPLE, "hello world, the quick brown fox"] * 10, trainer)
    tokenizer.save(str(path))
    return path


@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tokenizer.decode(ids) == text


@given(st.lists(st.integers(min_value=-5, max_value=400)))
def test_byte_tokenizer_decode_never_raises(ids):
    assert isinstance(ByteTokenizer().decode(ids), str)


def test_byte_tokenizer_specials_and_invalid_utf8():
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (259, 256, 257, 258)
    assert tokenizer.encode(SAMPLE) == list(SAMPLE.encode("utf-8"))
    assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode("hi"), tokenizer.eos_id, tokenizer.pad_id]) == "hi"
    assert tokenizer.decode([0x68, 0xFF, 0x69]) == "h\ufffdi"
    assert tokenizer.decode(tokenizer.encode("a\ud800b")) == "a\ufffdb"  # a lone surrogate has no UTF-8 form


def test_load_tokenizer_byte_and_bad_spec(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(MomctlError, match="not found.*--tokenizer byte") as info:
        load_tokenizer(str(tmp_path / "nope.json"))
    assert "nope.json" in str(info.value)
    with pytest.raises(MomctlError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))  # a folder without a tokenizer.json


def test_json_tokenizer_round_trips_and_finds_special_ids(tmp_path):
    path = make_tokenizer_json(tmp_path / "tokenizer.json")
    for spec in (path, tmp_path):  # the file, or the folder holding it
        tokenizer = load_tokenizer(str(spec))
        assert isinstance(tokenizer, JsonTokenizer) and tokenizer.kind == "json"
        assert tokenizer.decode(tokenizer.encode(SAMPLE)) == SAMPLE
        assert tokenizer.encode_batch([SAMPLE, "fox"]) == [tokenizer.encode(SAMPLE), tokenizer.encode("fox")]
    assert 256 < tokenizer.vocab_size <= 300  # byte alphabet + merges + specials
    assert tokenizer.eos_id == 0 and tokenizer.pad_id == 1
    assert tokenizer.bos_id == tokenizer.eos_id  # no BOS token: falls back to EOS
    assert tokenizer.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert tokenizer_fingerprint(tokenizer) == f"json:{tokenizer.sha256}"
    assert tokenizer.decode([tokenizer.eos_id, *tokenizer.encode("fox"), 10**6, -1]) == "fox"


def test_json_tokenizer_errors(tmp_path, monkeypatch):
    no_eos = make_tokenizer_json(tmp_path / "no_eos.json", special_tokens=("<pad>",))
    with pytest.raises(MomctlError, match="no end-of-text token"):
        load_tokenizer(str(no_eos))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(MomctlError, match="broken.json"):
        load_tokenizer(str(broken))
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the optional extra were not installed
    with pytest.raises(MomctlError, match=r"pip install 'momctl\[tokenizers\]'"):
        load_tokenizer(str(no_eos))


def test_save_and_load_byte_tokenizer(tmp_path):
    info = save_tokenizer(ByteTokenizer(), tmp_path / "tok")
    assert info == {"kind": "byte", "vocab_size": 259, "sha256": None, "bos_id": 256, "eos_id": 257, "pad_id": 258}
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["kind"] == "byte"
    assert isinstance(load_saved_tokenizer(tmp_path / "tok"), ByteTokenizer)
    assert tokenizer_fingerprint(ByteTokenizer()) == "byte"


def test_save_and_load_json_tokenizer_checks_sha256(tmp_path):
    original = load_tokenizer(str(make_tokenizer_json(tmp_path / "tokenizer.json")))
    folder = tmp_path / "checkpoint"
    info = save_tokenizer(original, folder)
    assert info["kind"] == "json" and info["sha256"] == original.sha256 and info["eos_id"] == original.eos_id
    restored = load_saved_tokenizer(folder)
    assert tokenizer_fingerprint(restored) == tokenizer_fingerprint(original)
    assert restored.encode(SAMPLE) == original.encode(SAMPLE)
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]

    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text().replace("fox", "cat"))
    with pytest.raises(MomctlError, match="sha256"):
        load_saved_tokenizer(folder)
    with pytest.raises(MomctlError, match="tokenizer_config.json is missing"):
        load_saved_tokenizer(tmp_path / "empty")
