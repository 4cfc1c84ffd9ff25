"""Framework adapters: one small module per framework, each with the same verbs."""
