"""The pretrain stage: corpus input, cleaning, demo data, tokenizer and model training."""
