"""Train a small text vocabulary on corpus captions, for models trained from scratch.

The result follows T5's conventions so the rest of the system treats it like a T5 tokenizer:
``<pad>`` = 0 (also the decoder start token), ``</s>`` = 1 (appended to every sequence by the
post-processor), ``<unk>`` = 2.
"""
from __future__ import annotations

from typing import Iterable, Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
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

    ``vocab_size`` is an upper bound: a small corpus yields fewer pieces.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 1}, got {vocab_size}")
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    if model == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    elif model == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token=UNK_TOKEN, show_progress=False
        )
    else:
        raise ValueError(f"model must be 'wordpiece' or 'unigram', got {model!r}")
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.train_from_iterator((text for text in texts), trainer=trainer)
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
