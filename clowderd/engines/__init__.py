"""Engines: the interface (base), the embedded transformers engine, the engine host process and its client."""
