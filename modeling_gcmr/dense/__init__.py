"""The dense side (never copied into a checkpoint): what embeds and searches by vector.

    dual_encoder.py      the CLIP-style dual-encoder baseline (config, model, collator, training, DenseIndex search)
    image_embeddings.py  image features for identifiers from a CLIP folder, a trained dual encoder or a column

Both the baseline every result is compared with and the image features identifiers are built from live here,
because they are the same machinery: a tower that maps to vectors and an exact inner-product index.
"""
