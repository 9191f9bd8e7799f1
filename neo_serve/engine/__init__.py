"""The in-process engine: scheduler, KV cache, stages, sampler, offline API."""
