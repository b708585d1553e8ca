"""Decode engine for LLaMA-family models, dense or GQSA: static KV cache, CUDA-graph captured decode
steps, greedy and top-k / top-p / temperature sampling, batches of prompts.

Modules: :mod:`~gqsa.engine.cache` (static KV cache), :mod:`~gqsa.engine.llama` (one forward step),
:mod:`~gqsa.engine.ops` (fusable pointwise pieces), :mod:`~gqsa.engine.sampling`,
:mod:`~gqsa.engine.engine` (prefill + decode loop). Benchmarks and synthetic models live in
:mod:`gqsa.bench`.

::

    from gqsa.engine import Engine, SamplingParams
    eng = Engine(model)                    # model: transformers LlamaForCausalLM, dense or GQSA
    out = eng.generate([ids1, ids2], max_new_tokens=64, sampling=SamplingParams(temperature=0.8, top_p=0.95))
    out.tokens, out.decode_tokens_per_s
"""
from .cache import StaticKVCache
from .engine import Engine, GenerationOutput
from .llama import LlamaDecoder
from .sampling import SamplingParams, filter_logits, sample

__all__ = ["Engine", "GenerationOutput", "LlamaDecoder", "SamplingParams", "StaticKVCache", "filter_logits",
           "sample"]
