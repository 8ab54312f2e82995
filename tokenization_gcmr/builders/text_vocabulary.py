"""Train a small text vocabulary on corpus captions, for models trained from scratch.

The result follows T5's conventions so the rest of the system treats it like a T5 tokenizer:
``<pad>`` = 0 (also the decoder start token), ``</s>`` = 1 (appended to every sequence by the
post-processor), ``<unk>`` = 2.
"""
from __future__ import annotations

from typing import Iterable, Literal

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]


def train_text_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8000,
    model: Literal["wordpiece", "unigram"] = "wordpiece",
    lowercase: bool = True,
) -> PreTrainedTokenizerFast:
    """Train a WordPiece or Unigram tokenizer on ``texts`` and wrap it as a transformers fast tokenizer.

    ``vocab_size`` is an upper bound: a small corpus yields fewer pieces. ``"wordpiece"`` (the default) is
    deterministic: the same texts give the same vocabulary in every process, which distributed training
    needs (each rank builds its own model from it). ``"unigram"`` uses the tokenizers library's trainer.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 1}, got {vocab_size}")
    normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else []))
    texts = list(texts)
    if model == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(_wordpiece_vocabulary(texts, vocab_size, normalizer), unk_token=UNK_TOKEN))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        tokenizer.normalizer = normalizer
    elif model == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        tokenizer.normalizer = normalizer
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token=UNK_TOKEN, show_progress=False
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
    else:
        raise ValueError(f"model must be 'wordpiece' or 'unigram', got {model!r}")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:
            raise RuntimeError(f"trainer placed {token} at id {tokenizer.token_to_id(token)}, expected {expected_id}")
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN
    )


def _wordpiece_vocabulary(texts: list[str], vocab_size: int, normalizer: normalizers.Normalizer) -> dict[str, int]:
    """Specials, every character (word-initial and ``##`` continuation), then the most frequent words.

    The tokenizers library's WordPiece trainer breaks count ties in hash-map order, so its vocabulary
    changes from process to process (huggingface/tokenizers#1794). Its WordLevel trainer sorts ties by
    the word itself; it picks the words here, and the character pieces let every other word still be
    spelled out.
    """
    word_level = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    word_level.normalizer = normalizer
    word_level.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    word_level.train_from_iterator(texts, trainer=trainer)
    words = sorted(word_level.get_vocab().items(), key=lambda item: item[1])
    alphabet = sorted({char for text in texts for char in normalizer.normalize_str(text) if not char.isspace()})
    pieces = SPECIAL_TOKENS + alphabet + [f"##{char}" for char in alphabet]
    if len(pieces) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold the {len(alphabet)} characters of the corpus "
            f"(at least {len(pieces)} entries are needed)"
        )
    vocabulary = {piece: index for index, piece in enumerate(pieces)}
    for word, _ in words:
        if len(vocabulary) == vocab_size:
            break
        vocabulary.setdefault(word, len(vocabulary))
    return vocabulary
