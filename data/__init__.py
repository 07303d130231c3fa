"""Data for saeguard: the shared character vocabulary, the generated tiny-world corpus, the task suite, batching."""
