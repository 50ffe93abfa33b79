"""Data: VQA v2 layout reading, vocabularies, region features, the bundled easy-VQA."""
