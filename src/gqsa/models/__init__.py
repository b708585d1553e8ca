"""Model loading plumbing: llama2.c checkpoints and tokenizers, Hugging Face models, architecture adapters.

* :func:`load_model` - a model and its tokenizer from a llama2.c file, a model folder or a hub id;
* :func:`load_llama2c` - a llama2.c float32 checkpoint as ``LlamaForCausalLM``;
* :func:`load_llama2c_tokenizer` - a llama2.c ``tok*.bin`` or SentencePiece ``.model`` as a fast tokenizer;
* :func:`get_adapter` - which decoder blocks and linears of a model to compress.
"""

from .adapters import Adapter, get_adapter, register_adapter
from .llama2c import load_llama2c
from .loader import load_model, load_tokenizer
from .tokenizer import load_llama2c_tokenizer

__all__ = [
    "Adapter",
    "get_adapter",
    "load_llama2c",
    "load_llama2c_tokenizer",
    "load_model",
    "load_tokenizer",
    "register_adapter",
]
