"""GcmrConfig, GcmrForRetrieval and the prefix-trie LogitsProcessor."""
