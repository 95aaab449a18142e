"""Fixtures every test directory shares (helper functions live in tests/helpers/)."""

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny model's tokenizer, trained offline on the demo corpus (< 1 s)."""
    from glm_experiments.config.schema import TinyModelConfig
    from glm_experiments.models.tiny.build import tokenizer_corpus, train_tokenizer

    return train_tokenizer(tokenizer_corpus(), TinyModelConfig().vocab_size)
