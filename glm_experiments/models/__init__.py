"""Model families (families/), their checkpoints, tokenizers and the ChatGLM-6B class. Loading a converted
ChatGLM-6B directory registers its class with transformers' Auto classes first (checkpoint_files.from_pretrained_strict)."""
