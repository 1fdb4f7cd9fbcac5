"""CLIP's byte-level BPE tokenizer, read from a diffusers `tokenizer/` folder; no torch, no
transformers and no `tokenizers` at run time.

Reproduces transformers 5.x `CLIPTokenizer` (built on `tokenizers`) as diffusers calls it,
`tokenizer(prompts, padding="max_length", max_length=model_max_length, truncation=True)`:

1. special tokens (bos / eos / unk / pad and the folder's `added_tokens_decoder`) are cut out
   of the raw text first, as whole, case-sensitive tokens: SDXL's `tokenizer_2` pads with "!", which is
   therefore special, so a "!" in a prompt becomes the pad id rather than BPE's "!</w>";
2. the rest is NFC-normalised, runs of whitespace become one space, every character is
   lower-cased on its own;
3. it is split into words: the contractions 's 't 're 've 'm 'll 'd, runs of letters, single
   digits, runs of other non-space characters (CLIP's regex, written out as a scanner so that
   `re` without \\p{L} suffices);
4. each word's UTF-8 bytes become GPT-2's printable byte characters, "</w>" marks its end,
   and merges.txt's pairs are applied, lowest rank first;
5. ids are wrapped in bos ... eos, truncated to `max_length` (specials included) and padded.
"""

from __future__ import annotations

import functools
import json
import os
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

END_OF_WORD = "</w>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Unicode's White_Space property: what `\s` means to the `tokenizers` regex engine (Python's
# str.isspace() would also take U+001C..U+001F).
WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                       "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table (printable Latin-1 bytes map to themselves).

  Ordered as CLIP builds it (those printable bytes first), so `list(values())` is the head
  of CLIP's vocabulary: "!" is id 0.
  """
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  rest = [b for b in range(256) if b not in keep]
  return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def _kind(c: str) -> str:
  """'space', 'letter' (\\p{L}), 'number' (\\p{N}) or 'other'."""
  if c in WHITESPACE:
    return "space"
  category = unicodedata.category(c)[0]
  return {"L": "letter", "N": "number"}.get(category, "other")


def split_words(text: str) -> list[str]:
  """CLIP's pre-tokenizer on normalised text: r"'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+"."""
  words, i = [], 0
  while i < len(text):
    kind = _kind(text[i])
    if kind == "space":
      i += 1
      continue
    contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
    if contraction:
      end = i + len(contraction)
    elif kind == "number":
      end = i + 1
    else:  # a maximal run of letters, or of other non-space characters
      end = i + 1
      while end < len(text) and _kind(text[end]) == kind:
        end += 1
    words.append(text[i:end])
    i = end
  return words


def merge_pair(symbols: Sequence[str], pair: tuple[str, str]) -> list[str]:
  """Joins every non-overlapping occurrence of `pair` in `symbols`, left to right."""
  merged, i = [], 0
  while i < len(symbols):
    if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
      merged.append(symbols[i] + symbols[i + 1])
      i += 2
    else:
      merged.append(symbols[i])
      i += 1
  return merged


def normalize(text: str) -> str:
  """NFC, whitespace runs -> " ", per-character lower case (as `tokenizers`' Lowercase)."""
  text = unicodedata.normalize("NFC", text)
  out, in_space = [], False
  for c in text:
    if c in WHITESPACE:
      if not in_space:
        out.append(" ")
      in_space = True
    else:
      out.append(c.lower())
      in_space = False
  return "".join(out)


def _token_content(value: Any) -> str | None:
  """A special token as tokenizer files write it: a string or {"content": ..., ...}."""
  return value.get("content") if isinstance(value, Mapping) else value


class CLIPTokenizer:
  """Prompts -> CLIP token ids [B, max_length] int32, as transformers' CLIPTokenizer.

  `vocab`: token -> id (vocab.json); `merges`: BPE pairs in rank order (merges.txt);
  `special_tokens`: the bos / eos / unk / pad strings; `added_tokens`: content -> id of
  further tokens cut out of the text whole (the folder's `added_tokens_decoder`). All of
  them are matched on the raw text, case-sensitively, whatever their `normalized` flag
  says: transformers 5.x does so ("<|ENDOFTEXT|>" is BPE-encoded text).
  """

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *,
               special_tokens: Mapping[str, str], model_max_length: int,
               added_tokens: Mapping[str, int] | None = None):
    self.vocab = dict(vocab)
    self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
    self.model_max_length = model_max_length
    added = dict(added_tokens or {})
    for key in SPECIAL_KEYS:
      token = special_tokens.get(key)
      if token is None:
        raise ValueError(f"tokenizer: no {key} given.")
      if token not in added:
        if token not in self.vocab:
          raise ValueError(f"tokenizer: {key} {token!r} is not in the vocabulary.")
        added[token] = self.vocab[token]
    self.added = added
    self._added_longest_first = sorted((t for t in added if t), key=len, reverse=True)
    ids = {key: added[special_tokens[key]] for key in SPECIAL_KEYS}
    self.bos_token_id, self.eos_token_id = ids["bos_token"], ids["eos_token"]
    self.unk_token_id, self.pad_token_id = ids["unk_token"], ids["pad_token"]
    self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

  def _bpe_uncached(self, word: str) -> tuple[int, ...]:
    """One pre-tokenized word -> ids: byte characters, "</w>" on the last, merges by rank."""
    table = bytes_to_unicode()
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    while len(symbols) > 1:
      pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      symbols = merge_pair(symbols, best)
    return tuple(self.vocab.get(s, self.unk_token_id) for s in symbols)

  def _split_added(self, text: str) -> list[str | int]:
    """Cuts the added tokens out of `text`: a list of text pieces and ids.

    At each position the longest added token that starts there wins (as `tokenizers`).
    """
    pieces, start, i = [], 0, 0
    while i < len(text):
      token = next((t for t in self._added_longest_first if text.startswith(t, i)), None)
      if token is None:
        i += 1
        continue
      if i > start:
        pieces.append(text[start:i])
      pieces.append(self.added[token])
      i = start = i + len(token)
    if start < len(text):
      pieces.append(text[start:])
    return pieces

  def encode(self, text: str) -> list[int]:
    """One prompt -> its ids, without bos / eos, truncation or padding."""
    ids = []
    for piece in self._split_added(text):
      if isinstance(piece, int):
        ids.append(piece)
      else:
        for word in split_words(normalize(piece)):
          ids.extend(self._bpe(word))
    return ids

  def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Prompts -> ids [B, max_length] int32: bos, ids (truncated), eos, then pad ids.

    `max_length` defaults to `model_max_length` (77 for the SD / SDXL tokenizers).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    length = max_length or self.model_max_length
    if length < 2:
      raise ValueError(f"tokenizer: max_length {length} leaves no room for bos and eos.")
    out = np.full((len(prompts), length), self.pad_token_id, np.int32)
    for row, prompt in enumerate(prompts):
      ids = [self.bos_token_id, *self.encode(prompt)[:length - 2], self.eos_token_id]
      out[row, :len(ids)] = ids
    return out


def _read_vocab_and_merges(paths: Mapping[str, str]):
  """(vocab, merges, added tokens) from vocab.json + merges.txt (the files SD / SDXL folders
  ship) or, failing those, from tokenizer.json (what transformers 5.x's save_pretrained
  writes alone)."""
  if os.path.isfile(paths["vocab.json"]) and os.path.isfile(paths["merges.txt"]):
    with open(paths["vocab.json"], encoding="utf-8") as f:
      vocab = json.load(f)
    with open(paths["merges.txt"], encoding="utf-8") as f:
      lines = f.read().split("\n")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    source, added = paths["merges.txt"], {}
  elif os.path.isfile(paths["tokenizer.json"]):
    with open(paths["tokenizer.json"], encoding="utf-8") as f:
      whole = json.load(f)
    model = whole.get("model", {})
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
      raise ValueError(f"{paths['tokenizer.json']} is not a CLIP byte-level BPE tokenizer "
                       f"(model type {model.get('type')!r}, suffix {model.get('end_of_word_suffix')!r}).")
    vocab = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    source = paths["tokenizer.json"]
    added = {t["content"]: int(t["id"]) for t in whole.get("added_tokens", [])}
  else:
    raise FileNotFoundError(f"{paths['vocab.json']} and merges.txt (or tokenizer.json) do not "
                            "exist: not a CLIP tokenizer folder.")
  if bad := [m for m in merges if len(m) != 2]:
    raise ValueError(f"{source}: a merge needs two tokens, got {' '.join(bad[0])!r}.")
  return vocab, merges, added


def load_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
  """The CLIP tokenizer of a diffusers `tokenizer/` or `tokenizer_2/` folder.

  Reads vocab.json + merges.txt (or tokenizer.json) and tokenizer_config.json; as
  transformers 5.x, the special_tokens_map.json entries apply only when
  tokenizer_config.json has no `added_tokens_decoder` (then they override the config's).
  """
  folder = os.fspath(folder)
  paths = {name: os.path.join(folder, name) for name in (
      "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
      "special_tokens_map.json")}
  vocab, merges, file_added = _read_vocab_and_merges(paths)
  config = {}
  if os.path.isfile(paths["tokenizer_config.json"]):
    with open(paths["tokenizer_config.json"], encoding="utf-8") as f:
      config = json.load(f)
  if "added_tokens_decoder" not in config and os.path.isfile(paths["special_tokens_map.json"]):
    with open(paths["special_tokens_map.json"], encoding="utf-8") as f:
      config.update(json.load(f))
  defaults = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}  # CLIPTokenizer's
  special = {k: _token_content(config.get(k)) or defaults[k] for k in SPECIAL_KEYS}
  added = {**file_added, **{token["content"]: int(index)
                            for index, token in config.get("added_tokens_decoder", {}).items()}}
  if "model_max_length" not in config:
    raise ValueError(f"{paths['tokenizer_config.json']}: no model_max_length (77 for CLIP); "
                     "the prompt length is read from it.")
  return CLIPTokenizer(vocab, merges, special_tokens=special,
                       model_max_length=int(config["model_max_length"]), added_tokens=added)
