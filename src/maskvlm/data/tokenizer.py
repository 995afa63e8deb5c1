"""Text tokenizer on Hugging Face ``tokenizers``: a WordPiece trained on the training
captions (saved with every checkpoint) or one loaded from ``vocab.txt`` / ``tokenizer.json``."""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import WordPiece

from ..config import TEXT_ENCODING

log = logging.getLogger("maskvlm")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Names a loaded tokenizer may use for each role (BERT-style first, RoBERTa-style second).
_ROLES = {"pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<s>"),
          "sep": ("[SEP]", "</s>"), "mask": ("[MASK]", "<mask>")}


class TextTokenizer:
    """Turns captions into padded id tensors and knows the special-token ids."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        ids = {}
        for role, names in _ROLES.items():
            found = [tokenizer.token_to_id(n) for n in names if tokenizer.token_to_id(n) is not None]
            if not found:
                raise ValueError(f"tokenizer has no {role} token (looked for {', '.join(names)})")
            ids[role] = found[0]
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            ids["pad"], ids["unk"], ids["cls"], ids["sep"], ids["mask"])
        self.special_ids = sorted(set(ids.values()))
        # The largest id + 1, not the number of tokens: a vocab.txt with a repeated line (or a
        # tokenizer.json with a gap) has ids above the count, and an embedding table sized by the
        # count fails on them at the first step.
        self._ids = sorted(set(tokenizer.get_vocab(with_added_tokens=True).values()))
        self.vocab_size = self._ids[-1] + 1
        self._padding = None

    def __len__(self) -> int:
        return self.vocab_size

    def token_mask(self, size: Optional[int] = None) -> torch.Tensor:
        """(size,) bool, True at the ids a token has: False at gaps and at the rows past the last id
        of an embedding table with ``size`` (default ``vocab_size``) rows."""
        keep = torch.zeros(max(size or 0, self.vocab_size), dtype=torch.bool)
        keep[self._ids] = True
        return keep[:size or self.vocab_size]

    def ordinary_ids(self) -> torch.Tensor:
        """Ids a random replacement may use (everything but special tokens)."""
        keep = self.token_mask()  # ids no token has (gaps) are never drawn
        keep[self.special_ids] = False
        return keep.nonzero().squeeze(1)

    def __call__(self, texts: Sequence[str], max_len: int, fixed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode with [CLS] ... [SEP], truncate to ``max_len`` and pad to the longest (``fixed``: to
        ``max_len``) -> (ids, mask)."""
        if self._padding != (max_len, fixed):
            self.tokenizer.enable_truncation(max_length=max_len)
            self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token=self.tokenizer.id_to_token(self.pad_id),
                                          length=max_len if fixed else None)
            self._padding = (max_len, fixed)
        encodings = self.tokenizer.encode_batch(encodable(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def id_to_token(self, i: int) -> str:
        return self.tokenizer.id_to_token(int(i))

    def save(self, path: str | Path) -> None:
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self._padding = None
        self.tokenizer.save(str(path))


def _bert_pipeline(tok: Tokenizer) -> Tokenizer:
    # registered as special: skipped when decoding, and "[MASK]" typed in a text stays one token
    tok.add_special_tokens([t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None])
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def _bert_pre_tokenized_words(texts: Iterable[str]) -> Counter:
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    return counts


_surrogates_seen = False
_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(texts: Sequence[str]) -> list[str]:
    """``texts`` with each lone UTF-16 surrogate (a cut emoji in a scraped caption: JSON's ``"\\ud83d"``
    escape alone loads as one; a file name that is not UTF-8) replaced by U+FFFD. The tokenizer cannot
    take such a text: one caption of 20,000 ended a run in ``surrogates not allowed``. The first is
    logged in each process."""
    global _surrogates_seen
    out = list(texts)
    for i, text in enumerate(out):
        if isinstance(text, str) and not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                out[i] = _SURROGATE.sub("\ufffd", text)
                if not _surrogates_seen:
                    _surrogates_seen = True
                    log.warning("a text holds a lone UTF-16 surrogate (a character cut in half, or a file name "
                                "that is not UTF-8), replaced by U+FFFD: %r (further ones are not logged)", text)
    return out


def train_wordpiece(texts: Iterable[str], vocab_size: int = 1000) -> TextTokenizer:
    """A lower-cased BERT-style WordPiece for ``texts``; the same texts give the same vocabulary and ids.

    When every distinct word fits (with one initial and one ``##`` piece per character, so unseen
    words still split), the vocabulary is exactly that, sorted: deterministic, and every training
    word is one token. Otherwise the ``tokenizers`` WordPiece trainer learns subwords; it breaks ties
    in hash order, so its subword set can differ slightly between fresh runs (pass a fixed
    ``vocab.txt`` via ``data.tokenizer`` for exact reproducibility; checkpoints always carry theirs)."""
    texts = encodable(list(texts))
    words = _bert_pre_tokenized_words(texts)
    chars = sorted({c for w in words for c in w})
    pieces = sorted(set(chars) | {"##" + c for c in chars})
    if len(SPECIAL_TOKENS) + len(pieces) + len(words) <= vocab_size:
        learned = set(pieces) | set(words)
    else:
        tok = Tokenizer(WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1,
                                            show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        learned = set(tok.get_vocab())
    ordered = SPECIAL_TOKENS + sorted(learned - set(SPECIAL_TOKENS))
    vocab = {token: i for i, token in enumerate(ordered)}
    return TextTokenizer(_bert_pipeline(Tokenizer(WordPiece(vocab, unk_token="[UNK]"))))


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Load ``tokenizer.json`` or a BERT ``vocab.txt`` (a folder holding either also works)."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt in this folder")
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        text = path.read_text(encoding=TEXT_ENCODING)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); expected a vocab.txt (one token "
                         "per line) or a tokenizer.json") from None
    if path.suffix == ".json":
        try:
            return TextTokenizer(Tokenizer.from_str(text))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
    vocab, repeated = {}, []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    for i, token in enumerate(lines):
        if token:
            if token in vocab:
                repeated.append(f"{token!r} (lines {vocab[token] + 1} and {i + 1})")
            vocab[token] = i  # a token's id is its line number; a repeated one keeps its last line
    if repeated:
        log.warning("%s: %d token(s) appear on more than one line, the last line's id is used: %s%s", path,
                    len(repeated), ", ".join(repeated[:5]), ", ..." if len(repeated) > 5 else "")
    if "[UNK]" not in vocab:
        raise ValueError(f"{path}: vocab.txt has no [UNK] token")
    return TextTokenizer(_bert_pipeline(Tokenizer(WordPiece(vocab, unk_token="[UNK]"))))
