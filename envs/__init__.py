"""Gymnasium environments and cluster backends for LLM inference clusters."""
