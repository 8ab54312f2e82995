"""Publishing toolkit (never copied into a checkpoint): the model card and the one-commit save / push of a retriever.

    model_card.py  build_model_card: a card filled from training and evaluation results (model-index included)
    checkpoint.py  save_retriever (model + tokenizer + code + card, checked, swapped in atomically),
                   check_checkpoint_files and push_retriever_to_hub
"""
