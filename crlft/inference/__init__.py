"""Inference: what serving and evaluation both generate with.

- sampling.py: sampling settings and the completions they give, the next token (greedy or nucleus), detokenizing with
  stop strings (`StopText`), the one stop rule (`next_piece`) and the one context rule (`answer_budget`);
- generate.py: crlft's own engine, continuous batching over Hugging Face forward passes (its KV cache: kv_cache.py);
- engine.py: the engine seam the endpoint uses (`Engine`, `Generation`, `EngineSettings`), the choice of engine and
  dtype; engines.py: `open_engine`, crlft's own engine or vLLM's for a model folder;
- vllm_engine.py: vLLM's async engine behind that seam; vllm_decoder.py: vLLM's offline engine for evaluation;
- decoding.py: the decoder evaluation, retention and replay run (the serving engine's, offline).
"""
