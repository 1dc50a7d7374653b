"""Tokenizers of the text encoders: T5 sentencepiece and BERT WordPiece (local files), ByT5 bytes.

Both return what the encoder consumes (``docs/interfaces.md``): numpy ``ids int32 [B, L]`` and
``mask bool [B, L]`` (True = real token), padded with id 0 to ``max_length`` (Imagen leaves the
length unstated; the project default is 128, a config setting, see IMAGEN_FACTS.md). As in HF,
each sequence ends with EOS (id 1); a sequence longer than ``max_length`` keeps its first
``max_length - 1`` tokens plus EOS. Truncation is counted per call (``last_num_truncated``) and
over the tokenizer's life (``num_truncated``) and warned about, never silent. The BERT
WordPiece tokenizer wraps each text as ``[CLS] text [SEP]`` and keeps ``[SEP]`` when it truncates.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

PAD_ID = 0
EOS_ID = 1


class TruncationWarning(UserWarning):
  """Some prompts were longer than ``max_length`` tokens and were cut."""


# Either file is a whole T5 sentencepiece tokenizer for transformers' AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def check_tokenizer_files(path: str) -> None:
  """Raises FileNotFoundError unless ``path`` is a directory holding a T5 tokenizer file.

  Cheap (a directory listing): callers run it before loading any weights, so a checkpoint
  directory without its tokenizer is reported at once, not after minutes of loading T5-XXL.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer path {path!r} is not a directory")
  if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
    present = sorted(os.listdir(path))
    raise FileNotFoundError(
        f"no T5 tokenizer files in {path!r}: expected {' or '.join(TOKENIZER_FILES)} (the "
        f"files a Hugging Face T5 checkpoint directory ships); found {present[:20]}"
    )


class _BaseTokenizer:
  """Pads/truncates per-text id lists (each already ending in EOS) into ``(ids, mask)``."""

  # The id that ends every sequence and survives truncation (T5: EOS; BERT: [SEP]).
  eos_id = EOS_ID

  def __init__(self, max_length: int):
    if int(max_length) < 2:
      raise ValueError(f"max_length={max_length!r}; need at least 2 (one token + EOS)")
    self.max_length = int(max_length)
    self.num_truncated = 0
    self.last_num_truncated = 0

  def _ids_with_eos(self, texts: Sequence[str]) -> list[list[int]]:
    raise NotImplementedError

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(texts, str):
      raise TypeError("tokenize expects a list of strings, got one str; wrap it in a list")
    texts = list(texts)
    for t in texts:
      if not isinstance(t, str):
        raise TypeError(f"prompts must be str, got {type(t).__name__}: {t!r}")
    length = self.max_length
    ids = np.full((len(texts), length), PAD_ID, np.int32)
    mask = np.zeros((len(texts), length), bool)
    truncated, longest = 0, 0
    for i, seq in enumerate(self._ids_with_eos(texts)):
      if len(seq) > length:
        truncated += 1
        longest = max(longest, len(seq))
        seq = list(seq[: length - 1]) + [self.eos_id]
      ids[i, : len(seq)] = seq
      mask[i, : len(seq)] = True
    self.last_num_truncated = truncated
    self.num_truncated += truncated
    if truncated:
      warnings.warn(
          f"{truncated} of {len(texts)} prompts exceed max_length={length} tokens (with "
          f"EOS; longest {longest}) and were truncated; raise text max_length to keep them",
          TruncationWarning,
          stacklevel=2,
      )
    return ids, mask


class ByT5Tokenizer(_BaseTokenizer):
  """ByT5 byte tokenizer (Xue et al. 2022): id = UTF-8 byte + 3 (0 pad, 1 EOS, 2 UNK).

  Matches HF ``ByT5Tokenizer`` for plain text (it also parses special-token strings such as
  ``</s>`` inside the text; here every character is data). Vocabulary 384 = 3 + 256 + 125 extra
  ids. Truncation may cut a multi-byte character, as HF's does.
  """

  vocab_size = 384
  offset = 3

  def _ids_with_eos(self, texts):
    return [[b + self.offset for b in t.encode("utf-8")] + [EOS_ID] for t in texts]


class SentencePieceT5Tokenizer(_BaseTokenizer):
  """The T5 sentencepiece tokenizer of a local HF checkpoint directory (never downloads).

  Uses transformers' ``AutoTokenizer`` with ``local_files_only=True`` on ``path``
  (``tokenizer.json`` or ``spiece.model``; T5 1.1, Flan-T5 and DeepFloyd's XXL ship both).
  """

  def __init__(self, path: str, max_length: int):
    super().__init__(max_length)
    check_tokenizer_files(path)
    from transformers import AutoTokenizer  # deferred: a 1.3 s import, HF tokenizers only

    self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if self._tok.pad_token_id != PAD_ID or self._tok.eos_token_id != EOS_ID:
      raise ValueError(
          f"tokenizer in {path!r} has pad/eos ids {self._tok.pad_token_id}/"
          f"{self._tok.eos_token_id}; T5 expects {PAD_ID}/{EOS_ID}"
      )
    self.vocab_size = len(self._tok)

  def _ids_with_eos(self, texts):
    out = self._tok(texts, add_special_tokens=True, padding=False, truncation=False, verbose=False)[
        "input_ids"
    ]
    return [seq if seq and seq[-1] == EOS_ID else list(seq) + [EOS_ID] for seq in out]


class WordPieceTokenizer(_BaseTokenizer):
  """The BERT WordPiece tokenizer of ``path/tokenizer.json`` (the ``tokenizers`` library).

  Each text becomes ``[CLS] pieces [SEP]`` (the file's own post-processor), padded with id 0;
  the file's own truncation and padding settings are turned off (this class truncates, keeping
  ``[SEP]``, and warns). Matches transformers' ``BertTokenizerFast`` on the same file.
  """

  def __init__(self, path: str, max_length: int):
    super().__init__(max_length)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
      present = sorted(os.listdir(path)) if os.path.isdir(path) else "not a directory"
      raise FileNotFoundError(
          f"no tokenizer.json in {path!r} (a BERT checkpoint directory ships one); "
          f"found {present if isinstance(present, str) else present[:20]}"
      )
    self._tok = Tokenizer.from_file(file)
    self._tok.no_truncation()
    self._tok.no_padding()
    ids = {t: self._tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")}
    if None in ids.values() or ids["[PAD]"] != PAD_ID:
      raise ValueError(
          f"{file} is not a BERT WordPiece tokenizer: special token ids {ids}; "
          f"expected [PAD]={PAD_ID}, [CLS] and [SEP] present"
      )
    self.eos_id = ids["[SEP]"]
    self.cls_id = ids["[CLS]"]
    self.vocab_size = self._tok.get_vocab_size()

  def _ids_with_eos(self, texts):
    out = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=True)]
    for seq in out:
      if not seq or seq[0] != self.cls_id or seq[-1] != self.eos_id:
        raise ValueError(
            "tokenizer.json's post-processor does not wrap texts as [CLS] ... [SEP] "
            f"(got ids {seq[:4]}...{seq[-2:]}); a BERT tokenizer.json does"
        )
    return out


def make_tokenizer(kind: str, max_length: int, path: str | None = None) -> _BaseTokenizer:
  """``kind`` is "byt5" (byte tokenizer, no files), "sentencepiece" (T5) or "wordpiece" (BERT);
  the last two need ``path`` (a local checkpoint directory)."""
  if kind == "byt5":
    return ByT5Tokenizer(max_length)
  if kind == "wordpiece":
    if not path:
      raise ValueError("the BERT WordPiece tokenizer needs text_config.path (with tokenizer.json)")
    return WordPieceTokenizer(path, max_length)
  if kind == "sentencepiece":
    if not path:
      raise ValueError(
          "the T5 sentencepiece tokenizer needs text_config.path "
          "(a local Hugging Face checkpoint directory)"
      )
    return SentencePieceT5Tokenizer(path, max_length)
  raise ValueError(f"tokenizer kind {kind!r}; allowed: 'byt5', 'sentencepiece', 'wordpiece'")
