"""Shared pipeline of the question answering, summarization and translation scripts."""
