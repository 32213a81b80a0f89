"""Talking to Ollama: the client wrapper, the circuit breaker, health checks."""
