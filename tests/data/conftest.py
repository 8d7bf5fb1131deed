"""The data tests' fixtures live in data_testkit (also imported by the tests for its helpers)."""

from data_testkit import _isolated_cache, corpus, photos, tokenizer  # noqa: F401 - registers the fixtures
