"""Dataset readers, language partitions, subsets, batching and the built-in demo task."""
