"""Identifier builders (never copied into a checkpoint): what turns a corpus into an identifier table.

    identifiers.py      build_identifiers and one builder per id_type, with typed options
    features.py         the features it reads: arrays, memory-mapped files, iterators of batches, in row blocks
    quantizers.py       faiss k-means and residual quantizers, the torch RQ-VAE
    text_vocabulary.py  train_text_tokenizer: a WordPiece vocabulary trained on captions
"""
