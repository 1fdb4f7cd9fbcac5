"""ambient_jax.latent.tokenizer against transformers' CLIPTokenizer on the same files.

No download: a small but real byte-level BPE vocabulary is learned here (the 256 byte
characters, their "</w>" forms, a few hundred merges from some sentences, the two special
tokens), written as vocab.json / merges.txt with the tokenizer configs of SD 1.5's
`tokenizer/` and SDXL's `tokenizer_2/`, and read by both implementations.
"""

import collections
import json
import os

import numpy as np
import pytest

from ambient_jax.latent.tokenizer import (bytes_to_unicode, load_tokenizer, merge_pair, normalize,
                                        split_words)

CORPUS = """A photograph of an astronaut riding a horse on the moon, highly detailed, 8k.
The quick brown fox jumps over the lazy dog; the dog doesn't mind, it's sleeping.
Portrait of a woman with red hair, oil painting by a famous painter, trending on artstation!
A cat sitting on a wooden table next to a cup of coffee in the morning light.
Medical scan of a human brain, MRI, black and white, high resolution, 1024x1024 pixels.
Café crème brûlée, naïve façade: ünïcödé letters and Ελληνικά words, 東京 tower at night.
"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def learn_bpe(text: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """A real BPE vocabulary (CLIP's layout: bytes, bytes</w>, merges, bos, eos) from `text`."""
  table = bytes_to_unicode()
  words = collections.Counter(
      tuple(table[b] for b in w.encode()) for w in split_words(normalize(text)))
  words = collections.Counter({w[:-1] + (w[-1] + "</w>",): n for w, n in words.items()})
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for word, n in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    merged = collections.Counter()
    for word, n in words.items():
      merged[tuple(merge_pair(word, best))] += n
    words = merged
  tokens = list(table.values()) + [c + "</w>" for c in table.values()] + ["".join(m) for m in merges]
  vocab = {}
  for token in tokens + [BOS, EOS]:
    vocab.setdefault(token, len(vocab))
  return vocab, merges


def write_clip_tokenizer(folder, *, pad_token: str = EOS, sdxl_style: bool = False,
                         num_merges: int = 300) -> str:
  """A tokenizer folder as SD 1.5 (`tokenizer/`) or SDXL (`tokenizer_2/`, pad "!") ships it."""
  os.makedirs(folder, exist_ok=True)
  vocab, merges = learn_bpe(CORPUS, num_merges)
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  token = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True,
                     "rstrip": False, "single_word": False}
  if sdxl_style:  # transformers 4.3x wrote this: the added tokens listed with their ids
    added = {str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True}
             for t in (pad_token, BOS, EOS)}
    config = {"add_prefix_space": False, "added_tokens_decoder": added, "bos_token": BOS,
              "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": EOS,
              "errors": "replace", "model_max_length": 77, "pad_token": pad_token,
              "tokenizer_class": "CLIPTokenizer", "unk_token": EOS}
  else:  # SD 1.5's files (openai/clip-vit-large-patch14's)
    config = {"add_prefix_space": False, "bos_token": token(BOS), "do_lower_case": True,
              "eos_token": token(EOS), "errors": "replace", "model_max_length": 77,
              "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer", "unk_token": token(EOS)}
  special = {"bos_token": token(BOS), "eos_token": token(EOS), "pad_token": pad_token,
             "unk_token": token(EOS)}
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  return str(folder)


PROMPTS = [
    "A photograph of an astronaut riding a horse on the moon",
    "",
    "   extra    whitespace\tand\nnewlines   ",
    "UPPER case, MiXeD CaSe and punctuation!!! (really?) [yes]; {no} -- done...",
    "numbers 1024x1024, 3.14159, 2024-01-01 and 8k",
    "it's, don't, they're, we've, I'm, you'll, he'd; 'quoted' words",
    "Café crème brûlée, naïve façade, Ελληνικά, 東京, emoji 🐱🚀 and Ⅻ ½ ²",
    "hello!world! a horse! <|endoftext|> inside and <|startoftext|>, not <|ENDOFTEXT|>",
    "zzzq unseen wordsxyz qwxv",
    " ".join(["a very long prompt that goes on"] * 20),
    "combining e\u0301 accents and the Kelvin sign \u212a, \u0130stanbul, ΣΑΣ",
    "tabs\x1cfile-separator and\u00a0no-break\u3000ideographic spaces",
]


@pytest.fixture(scope="module", params=["sd15", "sdxl_2"])
def folders(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp(request.param)
  if request.param == "sd15":
    return write_clip_tokenizer(folder)
  return write_clip_tokenizer(folder, pad_token="!", sdxl_style=True)


def test_matches_transformers(folders):
  """ids [B, 77] equal transformers' padding="max_length", truncation=True, prompt by prompt."""
  transformers = pytest.importorskip("transformers")
  reference = transformers.CLIPTokenizer.from_pretrained(folders)
  ours = load_tokenizer(folders)
  assert ours.model_max_length == reference.model_max_length == 77
  assert ours.pad_token_id == reference.pad_token_id
  assert (ours.bos_token_id, ours.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
  expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True,
                       return_tensors="np").input_ids
  got = ours(PROMPTS)
  assert got.shape == (len(PROMPTS), 77) and got.dtype == np.int32
  for prompt, g, e in zip(PROMPTS, got, expected):
    assert g.tolist() == e.tolist(), prompt
  np.testing.assert_array_equal(ours(PROMPTS[:2], max_length=16),
                                reference(PROMPTS[:2], padding="max_length", max_length=16,
                                          truncation=True, return_tensors="np").input_ids)


def test_pad_token_from_files(tmp_path):
  """SD 1.5 pads with <|endoftext|>, SDXL's second tokenizer with "!" (id 0): from the files."""
  sd15 = load_tokenizer(write_clip_tokenizer(tmp_path / "a"))
  sdxl = load_tokenizer(write_clip_tokenizer(tmp_path / "b", pad_token="!", sdxl_style=True))
  assert sd15.pad_token_id == sd15.eos_token_id == sd15.vocab[EOS]
  assert sdxl.pad_token_id == sdxl.vocab["!"] == 0
  assert sd15("")[0, :3].tolist() == [sd15.bos_token_id, sd15.eos_token_id, sd15.eos_token_id]
  assert sdxl("")[0, :3].tolist() == [sdxl.bos_token_id, sdxl.eos_token_id, 0]


def test_missing_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    load_tokenizer(tmp_path)
  folder = write_clip_tokenizer(tmp_path / "t")
  config = json.load(open(os.path.join(folder, "tokenizer_config.json")))
  del config["model_max_length"]
  json.dump(config, open(os.path.join(folder, "tokenizer_config.json"), "w"))
  with pytest.raises(ValueError, match="model_max_length"):
    load_tokenizer(folder)
