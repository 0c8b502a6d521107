"""The CLIP tokenizer against OpenAI CLIP's simple_tokenizer algorithm (re-implemented here), transformers'
and open_clip's: the vendored vocabulary, known ids, pipeline-style tokenizing, offline folders and errors."""

from __future__ import annotations

import gzip
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from sega_jax.models.tokenizer import (
    clip_bpe_path,
    clip_tokenizer,
    clip_vocab_and_merges,
    load_tokenizer,
    offline_clip_tokenizer,
    tokenize,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


# ---------------------------------------------------------------------------------------- tokenizer

PROMPTS = [
    "a photo of a cat",
    "a photo of the face of a woman",
    "smiling, smile",
    "glasses",
    "A Photo of the FACE of a Woman, smiling; glasses!!",
    "it's   a dog's  life  ",
    "",
    "naïve café 123 4567 #hashtag @user",
    "don't you're we've I'm they'll he'd",
    "über-realistic, 8k, trending on artstation, by greg rutkowski",
    "emoji 🙂 test ✨ 日本語のテキスト",
    "tab\tnew\nline",
]


def _bytes_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class ReferenceCLIPBPE:
    """OpenAI CLIP's simple_tokenizer.py (the algorithm of SD's tokenizer), minus ftfy/html cleanup."""

    def __init__(self, bpe_path):
        import regex

        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                                 r"""[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token: str) -> list[str]:
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        text = " ".join(text.split()).strip().lower()
        ids = [self.encoder["<|startoftext|>"]]
        for token in self.pat.findall(text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return ids + [self.encoder["<|endoftext|>"]]


@pytest.fixture(scope="module")
def sd_tokenizer():
    return clip_tokenizer()


def test_bpe_file_is_vendored():
    path = clip_bpe_path()
    assert path.parent.name == "assets" and path.parent.parent.name == "sega_jax"
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["photo</w>"] == 1125


def test_offline_tokenizer_folder(tmp_path):
    folder = offline_clip_tokenizer(tmp_path / "tokenizer", pad_token="!")
    assert {p.name for p in folder.iterdir()} == {
        "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"}
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894 and merges[1] == "i n"
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 77
    tok = load_tokenizer(folder)  # SD 2.x style: pad with "!" (id 0)
    ids = tokenize(tok, ["a photo of a cat"])
    assert ids.tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70]
    with pytest.raises(ValueError, match="pad_token"):
        offline_clip_tokenizer(tmp_path / "other", pad_token="<pad>")


def test_tokenizer_known_ids(sd_tokenizer):
    # transformers' CLIP documentation example (openai/clip-vit-*: the SD 1.x tokenizer)
    ids = tokenize(sd_tokenizer, ["a photo of a cat", "a photo of a dog"])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    assert ids[:, :7].tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407],
                                   [49406, 320, 1125, 539, 320, 1929, 49407]]
    assert (ids[:, 7:] == 49407).all()  # SD 1.x pads with <|endoftext|>


def test_tokenizer_matches_reference_bpe(sd_tokenizer):
    reference = ReferenceCLIPBPE(clip_bpe_path())
    ids = tokenize(sd_tokenizer, PROMPTS)
    for prompt, row in zip(PROMPTS, ids, strict=True):
        want = reference.encode(prompt)
        assert row.tolist() == want + [49407] * (77 - len(want)), prompt


def test_tokenizer_matches_open_clip(sd_tokenizer):
    """open_clip's own SimpleTokenizer, when it can be loaded (needs ftfy, regex, torch; not torchvision)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    assert spec is not None and importlib.util.find_spec("ftfy") is not None, (
        "the reference tokenizer needs `pip install --no-deps open_clip_torch` and the test extra (ftfy)")
    module_spec = importlib.util.spec_from_file_location(
        "_open_clip_tokenizer", Path(spec.origin).parent / "tokenizer.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    ref = module.SimpleTokenizer()(PROMPTS).numpy()  # pads with 0
    ids = tokenize(sd_tokenizer, PROMPTS)
    for prompt, row, want in zip(PROMPTS, ids, ref, strict=True):
        n = want.tolist().index(49407) + 1
        assert row[:n].tolist() == want[:n].tolist() and (row[n:] == 49407).all(), prompt


def test_tokenize_like_the_pipeline(sd_tokenizer, caplog):
    long_prompt = " ".join(["word"] * 80 + ["tail"])
    texts = ["a photo of a cat", long_prompt]
    with caplog.at_level(logging.WARNING, logger="sega_jax.models.tokenizer"):
        ids = tokenize(sd_tokenizer, texts)
    assert ids.shape == (2, 77)
    # the reference cuts the untruncated ids: BOS + 76 words, no EOS
    full = sd_tokenizer(long_prompt).input_ids
    assert ids[1].tolist() == full[:77] and ids[1, -1] != 49407
    assert "truncated" in caplog.text and "tail" in caplog.text
    # rows within the limit are exactly the reference's tokenizer call
    ref = sd_tokenizer(texts[:1], padding="max_length", max_length=77, return_tensors="np").input_ids
    assert ids[:1].tolist() == ref.tolist()
    # negative-prompt path: transformers' truncation keeps EOS
    neg = tokenize(sd_tokenizer, [long_prompt], truncation=True)
    assert neg.shape == (1, 77) and neg[0, -1] == 49407 and neg[0, :76].tolist() == full[:76]
    assert tokenize(sd_tokenizer, []).shape == (0, 77)
    assert tokenize(sd_tokenizer, "glasses").shape == (1, 77)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found") as err:
        load_tokenizer(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    folder = offline_clip_tokenizer(tmp_path / "tokenizer")
    (folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing merges\.txt") as err:
        load_tokenizer(folder)
    assert str(folder) in str(err.value)
