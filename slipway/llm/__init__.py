"""The LLM runtime shared by fine-tuning, evaluation and serving: loading, generation, the tiny offline model."""
