"""Sampling from π_ref: the engines (vLLM through Ray Data, transformers as the fallback) and the generate stage."""
