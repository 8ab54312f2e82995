"""Training toolkit (never copied into a checkpoint): corpora, training examples, the collator, callbacks, LoRA.

    data.py       load_corpus / split_captions / CorpusArguments: corpora loaded and validated row by row
    corpus_files.py, corpus_values.py   reading corpus files with line numbers, and checking single cells
    backbones.py  pretrained text backbones (encoder, seq2seq, CLIP) for a new retriever
    model_setup.py  build_retriever: backbone, image inputs and identifier head for a corpus
    synthetic.py  the built-in synthetic corpus (coloured shapes and paraphrased captions) and write_imagefolder
    examples.py   memorize and retrieve rows (build_training_examples) for a plain transformers.Trainer
    collator.py   GcmrDataCollator: pads text and labels, batches image features or pixels
    callbacks.py  RetrievalEvalCallback (Recall@K inside Trainer evaluations), the training clock, per-process seeds
    lora.py       apply_lora / merge_lora with peft
"""
