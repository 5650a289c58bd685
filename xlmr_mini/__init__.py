"""xlmr_mini: distil multilingual XLM-R classifiers into smaller students."""
