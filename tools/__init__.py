"""Offline scripts that build the bundled model: corpus, training, evaluation."""
