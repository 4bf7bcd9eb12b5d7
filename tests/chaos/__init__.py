"""Chaos run: the whole system under injected faults, then an audit of every generation and credit."""
