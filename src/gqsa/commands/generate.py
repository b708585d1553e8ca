"""``gqsa generate``: text from a checkpoint (or any LLaMA model) through the decode engine, streamed."""
from __future__ import annotations

import argparse
import sys
import warnings

from . import common
from .common import CLIError, add_threads


def add_parser(sub):
    p = sub.add_parser("generate", help="generate text from a GQSA checkpoint (or any LLaMA model), streaming",
                       description="Generate with the decode engine (static KV cache; CUDA graphs on a GPU): "
                                   "greedy by default, sampling with --temperature > 0. One prompt streams its "
                                   "tokens to the terminal; several are decoded as one batch.",
                       epilog="example:\n  gqsa generate runs/stories260K-w4s50g16 --prompt 'Once upon a time' "
                              "--max-new-tokens 64",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="GQSA checkpoint folder (or an uncompressed model `compress` accepts)")
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="prompt text; repeat for a batch of prompts")
    p.add_argument("--tokenizer", help="tokenizer, for uncompressed llama2.c models")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check of the safetensors files")
    add_threads(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..sources import check_model_source

    # what needs no torch first: a mistyped path or option fails at once, not after the imports
    if args.max_new_tokens < 1:
        raise CLIError("--max-new-tokens must be >= 1")
    if any(not p for p in args.prompt):
        raise CLIError("--prompt is empty: give some text to continue")
    check_model_source(args.model)

    import torch

    from ..engine import Engine, SamplingParams
    from ..models.loader import load_any

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    common.apply_threads(args)
    device = common.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    model, tok = load_any(args.model, args.tokenizer, dtype=dtype, device=device, verify=not args.no_verify)
    engine = Engine(model)
    ids = [tok(p).input_ids for p in args.prompt]
    max_new = args.max_new_tokens
    context = getattr(model.config, "max_position_embeddings", None)
    if context:  # positions beyond the model's context: refused (the prompt) or cut (the new tokens), said once
        longest = max(len(i) for i in ids)
        if longest >= context:
            raise CLIError(f"the prompt takes {longest} tokens, the model's whole context ({context} positions) or "
                           f"more: shorten it")
        if longest + max_new > context:
            max_new = context - longest
            warnings.warn(f"--max-new-tokens {args.max_new_tokens}: the prompt ({longest} tokens) leaves room for "
                          f"{max_new} in the model's context ({context} positions); generating at most {max_new}")
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = eos if eos is not None else tok.eos_token_id
    single = len(ids) == 1
    shown = {"ids": [], "text": ""}

    def continuation(prompt_ids, new_ids) -> str:
        # decoded with the prompt: a SentencePiece piece's leading space is kept ("was" + "▁a" = "was a")
        return tok.decode(prompt_ids + new_ids, skip_special_tokens=True)[
            len(tok.decode(prompt_ids, skip_special_tokens=True)):]

    def stream(step, tokens):
        if tokens[0] in (eos if isinstance(eos, list) else [eos]):
            return
        shown["ids"].append(tokens[0])
        text = continuation(ids[0], shown["ids"])
        sys.stdout.write(text[len(shown["text"]):])
        sys.stdout.flush()
        shown["text"] = text

    if single:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()
    out = engine.generate(ids, max_new, sampling, eos_token_id=eos, stream=stream if single else None)
    if single:
        sys.stdout.write("\n")
    else:
        for prompt, prompt_ids, toks in zip(args.prompt, ids, out.tokens):
            print(prompt + continuation(prompt_ids, list(toks)))
            print()
    n = sum(len(t) for t in out.tokens)
    print(f"[{n} tokens; prefill {1e3 * out.prefill_s:.1f} ms, decode {out.decode_tokens_per_s:.1f} tokens/s "
          f"on {device}{', CUDA graphs' if out.cuda_graphs else ''}]", file=sys.stderr)
    return 0
