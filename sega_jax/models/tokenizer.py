"""Tokenizing prompts as diffusers' SemanticStableDiffusionPipeline does (transformers' CLIPTokenizer).

`offline_clip_tokenizer` writes the real Stable Diffusion (OpenAI CLIP) tokenizer folder with no network:
its vocabulary is derived from the BPE merges file `bpe_simple_vocab_16e6.txt.gz` that ships inside this
package (`sega_jax/assets`, MIT licensed, copied from open_clip_torch / openai/CLIP).
"""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # open_clip/OpenAI CLIP use merges[1 : 49152 - 256 - 2 + 1]: 48,894 merges


def load_tokenizer(folder: str | os.PathLike):
    """transformers' `CLIPTokenizer` from a diffusers `tokenizer/` folder (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: tokenizer folder not found")
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
        raise FileNotFoundError(f"{folder}: not a CLIP tokenizer folder (missing {', '.join(missing)})")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    if not 0 < tokenizer.model_max_length <= 100_000:
        raise ValueError(f"{folder}: tokenizer model_max_length={tokenizer.model_max_length} is not set; "
                         "add it to tokenizer_config.json (77 for Stable Diffusion)")
    return tokenizer


def tokenize(tokenizer, texts: list[str] | str, *, truncation: bool = False) -> np.ndarray:
    """Token ids (len(texts), model_max_length) int32, padded with the tokenizer's pad token.

    truncation=False is the reference pipeline's prompt/editing-prompt path: tokenize untruncated, cut
    each row to model_max_length (the end-of-text token of an over-long prompt is cut off with the
    rest) and log a warning with the removed text. truncation=True is its negative-prompt path
    (transformers' truncation, which keeps the end-of-text token).
    """
    texts = [expand_prompt(tokenizer, t) for t in ([texts] if isinstance(texts, str) else texts)]
    max_length = tokenizer.model_max_length
    if not texts:
        return np.zeros((0, max_length), np.int32)
    ids = tokenizer(texts, padding="max_length", max_length=max_length, truncation=truncation).input_ids
    removed = [tokenizer.decode(row[max_length:]) for row in ids if len(row) > max_length]
    if removed:
        logger.warning("The following part of your input was truncated because CLIP can only handle "
                       f"sequences up to {max_length} tokens: {removed}")
    return np.asarray([row[:max_length] for row in ids], dtype=np.int32)


def expand_prompt(tokenizer, text: str) -> str:
    """diffusers' `maybe_convert_prompt`: each added token `tok` with siblings `tok_1`, ... becomes
    `tok tok_1 ...`, so a multi-vector concept is written as its one token."""
    added = getattr(tokenizer, "added_tokens_encoder", {})
    if not any(name.endswith("_1") for name in added):  # no multi-vector token: nothing to expand
        return text
    for token in set(tokenizer.tokenize(text)):
        if token in added and f"{token}_1" in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            text = text.replace(token, replacement)
    return text


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file: the copy vendored in this package, else open_clip's if it is installed."""
    vendored = importlib.resources.files("sega_jax") / "assets" / BPE_FILE
    if vendored.is_file():
        return Path(str(vendored))
    spec = importlib.util.find_spec("open_clip")  # found without importing open_clip (needs torch)
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / BPE_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{BPE_FILE} not found: neither in sega_jax/assets (package data missing from "
                            "this install?) nor in an installed open_clip_torch "
                            "(`pip install open_clip_torch --no-deps`)")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table, in vocabulary order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_vocab_and_merges(bpe_path: str | os.PathLike | None = None) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (49,408 tokens) and merge list (48,894 "a b" lines) from the BPE merges file."""
    path = Path(bpe_path) if bpe_path is not None else clip_bpe_path()
    try:
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable gzip'd CLIP BPE merges file ({err})") from err
    merges = lines[1:NUM_MERGES + 1]  # line 0 is the "#version" header
    if len(merges) != NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{path}: expected {NUM_MERGES} two-symbol merges after the header line")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{path}: derived {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def offline_clip_tokenizer(folder: str | os.PathLike, *, pad_token: str = EOS_TOKEN,
                           model_max_length: int = 77, bpe_path: str | os.PathLike | None = None) -> Path:
    """Write Stable Diffusion's CLIP tokenizer folder (vocab.json, merges.txt, configs) with no network.

    pad_token: "<|endoftext|>" as in SD 1.x's tokenizer (the default), "!" as in SD 2.x's.
    """
    vocab, merges = clip_vocab_and_merges(bpe_path)
    if pad_token not in vocab:
        raise ValueError(f"pad_token: {pad_token!r} is not in the CLIP vocabulary")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace", **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def clip_tokenizer(*, pad_token: str = EOS_TOKEN, model_max_length: int = 77):
    """Stable Diffusion's CLIP tokenizer, built offline from the vendored BPE merges (see above)."""
    with tempfile.TemporaryDirectory(prefix="sega_jax_tokenizer_") as tmp:
        folder = offline_clip_tokenizer(tmp, pad_token=pad_token, model_max_length=model_max_length)
        return load_tokenizer(folder)
