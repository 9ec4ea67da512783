"""Text loading, the standard WikiText join and token windows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_sparse.data import join_wikitext_rows, load_text, tokenize_windows
from mlx_sparse.errors import UserError


class CharTokenizer:
    """One token per character; optionally adds BOS (id 0) like Gemma's tokenizer."""

    def __init__(self, add_bos: bool):
        self.add_bos = add_bos
        self.bos_token_id = 0

    def encode(self, text, add_special_tokens=True):
        ids = [ord(char) for char in text]
        return ([0] + ids) if (self.add_bos and add_special_tokens) else ids


def test_wikitext_join_standard_form():
    assert join_wikitext_rows([" = Title = \n", " \n", " Body text .\n"]) == " = Title = \n\n\n\n\n Body text .\n"


def test_wikitext_file_join(tmp_path):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    (folder / "wiki.test.raw").write_text(" \n = A = \n \n b c \n")
    assert load_text("wikitext2:test", tmp_path) == "\n\n = A = \n\n\n\n\n b c \n"


def test_real_wikitext_size(wikitext_dir):
    text = load_text("wikitext2:test", wikitext_dir)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    assert len(text) > 1_200_000


def test_windows_without_bos():
    windows = tokenize_windows(CharTokenizer(add_bos=False), "abcdefghij", ctx=4)
    assert windows.count == 2
    np.testing.assert_array_equal(np.array(windows.windows), [[97, 98, 99, 100], [101, 102, 103, 104]])


def test_windows_with_bos_prefix():
    windows = tokenize_windows(CharTokenizer(add_bos=True), "abcdefg", ctx=4, max_windows=1)
    np.testing.assert_array_equal(np.array(windows.windows), [[0, 97, 98, 99]])
    assert windows.total_tokens == 7


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(path)) == "one\n\ntwo"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.jsonl", "{bad\n", "d.jsonl:1 is not valid JSON"),
        ("d.jsonl", json.dumps({"body": "x"}) + "\n", "has no string field 'text'"),
        ("d.csv", "a,b\n", "unsupported data file"),
    ],
)
def test_bad_data_files_rejected(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_text(str(path))


def test_missing_data_file_rejected(tmp_path):
    with pytest.raises(UserError, match="data file .*absent.txt not found"):
        load_text(str(tmp_path / "absent.txt"))


def test_non_utf8_file_rejected(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8"):
        load_text(str(path))


def test_unknown_split_rejected(tmp_path):
    with pytest.raises(UserError, match="unknown WikiText-2 split 'train'"):
        load_text("wikitext2:train", tmp_path)


def test_missing_wikitext_dir_rejected(tmp_path):
    with pytest.raises(UserError, match="wiki.valid.raw not found"):
        load_text("wikitext2:valid", tmp_path)


def test_too_little_text_rejected():
    with pytest.raises(UserError, match="has 3 tokens, fewer than one window of 8"):
        tokenize_windows(CharTokenizer(add_bos=False), "abc", ctx=8)
    with pytest.raises(UserError, match="has 0 tokens"):
        tokenize_windows(CharTokenizer(add_bos=False), "", ctx=8)


@pytest.mark.parametrize(("ctx", "max_windows", "message"), [(1, None, "invalid context length 1"), (8, 0, "invalid --max-windows 0")])
def test_bad_window_arguments_rejected(ctx, max_windows, message):
    with pytest.raises(UserError, match=message):
        tokenize_windows(CharTokenizer(add_bos=False), "abcdefghijklmnop", ctx=ctx, max_windows=max_windows)
