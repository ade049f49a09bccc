"""Inference: what serving and evaluation both generate with.

- generate.py: sampling settings, stop rules and detokenizing (`StopText`), the completions they give, and crlft's
  own engine (continuous batching over Hugging Face forward passes);
- engine.py: the engine seam the endpoint uses (`Engine`, `Generation`, `EngineSettings`), the choice of engine and
  dtype; engines.py: `open_engine`, crlft's own engine or vLLM's for a model folder;
- vllm_engine.py: vLLM's async engine behind that seam; vllm_decoder.py: vLLM's offline engine for evaluation;
- decoding.py: the decoder evaluation, retention and replay run (the serving engine's, offline).
"""
