"""The decode engine: prefill, then one token per step from a static KV cache, on CUDA through
captured CUDA graphs.

``Engine(model).generate(prompts, max_new_tokens, SamplingParams(...))`` takes 1…N prompts (lists of
token ids), pads them on the left to one length and runs:

1. **prefill**: one forward over all prompt tokens (eager; a GQSA model's linears take their dense
   path there: more than 4 rows). Row ``b``'s positions count its real tokens only (as transformers
   does for left padding), its pad slots are never attended.
2. **decode**: one step per new token for all rows at once, at cache slot ``prompt_len + i``. A step
   is embedding → blocks (:class:`~gqsa.engine.llama.LlamaDecoder`) → logits → next token. On CUDA it
   is captured once per session in CUDA graphs (one per 64-slot bucket of attended cache, so attention
   reads only the filled part of the cache) and replayed with no host work but the launch; greedy
   choice, end-of-sequence bookkeeping and the position/slot counters are inside the graph. Sampling
   (temperature / top-k / top-p) runs eagerly after the replay with a seeded generator.

Rows that emit an end-of-sequence token are finished: their later tokens are ``pad`` and are
dropped from the output. Without a ``stream`` callback the host synchronizes only every
``sync_every`` steps (to stop when every row has finished); with one, after every step.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..kernels import decode_ops as dk
from .cache import StaticKVCache
from .llama import LlamaDecoder
from .sampling import SamplingParams, sample

KV_BLOCK = 64  # cache slots per CUDA-graph bucket (and granularity of the cache length)
MAX_EOS = 8  # end-of-sequence ids a generation may stop on
# Prefills of at most this many tokens (batch × prompt length) are replayed from a CUDA graph once their shape has been
# seen in the session: eagerly, a 7B model's 512-token prefill waited on the host's kernel launches (H200: fp16 32.1 ms
# eager against 12.0 ms of device work; at 2048 tokens 55.8 against 54.9, benchmarks/RESULTS.md "Session 17").
PREFILL_GRAPH_TOKENS = 1024
MAX_PREFILL_GRAPHS = 16  # prefill shapes a session captures (they share one memory pool); later ones run eagerly


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens of each prompt (through its end-of-sequence token, if any)
    prompt_lengths: list[int]
    prefill_s: float  # wall time of the prefill (synchronized)
    decode_s: float  # wall time of the decode steps (synchronized)
    decode_steps: int  # steps after the prefill (each gives one token per row)
    batch_size: int
    cuda_graphs: bool
    timings: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")


class _Session:
    """Static state of one (batch size, cache length): cache, step buffers, captured graphs."""

    def __init__(self, dec: LlamaDecoder, bsz: int, max_len: int, max_new: int, dtype, device):
        self.cache = StaticKVCache(dec.n_layers, bsz, dec.n_kv, max_len, dec.head_dim, dtype, device)
        z = dict(dtype=torch.long, device=device)
        self.tok = torch.zeros(bsz, 1, **z)  # token fed to the next step
        self.pos = torch.zeros(bsz, 1, **z)  # its position (per row)
        self.counters = torch.zeros(2, **z)  # [slot, step], advanced together
        self.slot = self.counters[0:1]  # cache slot of the next token (shared by the rows)
        self.step = self.counters[1:2]  # index into out
        self.out = torch.zeros(bsz, max_new, **z)
        self.done = torch.zeros(bsz, dtype=torch.bool, device=device)
        self.eos = torch.full((MAX_EOS,), -1, **z)  # end-of-sequence ids, -1 = unused slot
        self.pad = torch.zeros((), **z)
        self.logits = None
        self.graphs: dict = {}
        self.prefill_seen: set = set()  # prefill shapes run eagerly in this session (the next one is captured)
        self.pool = None  # the decode graphs' memory pool
        self.prefill_pool = None  # the prefill graphs' (one at a time replays: they share it)
        self.warm = False
        self.bsz, self.max_len, self.max_new = bsz, max_len, max_new


class Engine:
    """Runs a LLaMA-family causal LM (dense or GQSA) with a static KV cache.

    ``cuda_graphs``, ``fuse_projections``, ``compile_ops``, ``decode_kernels``: ``"auto"`` = on for a CUDA
    model, off on CPU (where the engine must reproduce transformers' greedy tokens exactly).
    ``prefill_graphs`` (``"auto"``: with ``cuda_graphs``): a prefill of at most :data:`PREFILL_GRAPH_TOKENS`
    tokens whose shape (batch, prompt length) the session has run before is replayed from a CUDA graph (the
    second such prefill captures it; the same kernels, so the same tokens).
    ``decode_kernels`` (:mod:`gqsa.kernels.decode_ops`: RoPE + KV write, decode attention, add+RMSNorm,
    SiLU·up) also needs Triton; ``GQSA_NO_DECODE_KERNELS=1`` turns ``"auto"`` off.
    """

    def __init__(self, model, cuda_graphs="auto", fuse_projections="auto", compile_ops=False,
                 sync_every: int = 32, decode_kernels="auto", prefill_graphs="auto"):
        self.model = model
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs == "auto" else bool(cuda_graphs)
        if self.cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs a model on a CUDA device")
        self.prefill_graphs = self.cuda_graphs if prefill_graphs == "auto" else bool(prefill_graphs)
        if self.prefill_graphs and not self.cuda_graphs:
            raise ValueError("prefill_graphs=True needs CUDA graphs (a model on a CUDA device)")
        fuse = on_cuda if fuse_projections == "auto" else bool(fuse_projections)
        compile_ops = on_cuda if compile_ops == "auto" else bool(compile_ops)
        if decode_kernels == "auto":
            decode_kernels = on_cuda and dk.HAS_TRITON and os.environ.get("GQSA_NO_DECODE_KERNELS", "0").strip() \
                in ("", "0")
        self.decoder = LlamaDecoder(model, fuse_projections=fuse, compile_ops=compile_ops,
                                    decode_kernels=bool(decode_kernels))
        self.dtype = model.get_input_embeddings().weight.dtype
        self.vocab_size = model.config.vocab_size
        self.sync_every = max(1, int(sync_every))
        self._sessions: dict = {}

    # ------------------------------------------------------------------ sessions and graphs
    def _session(self, bsz: int, max_len: int, max_new: int) -> _Session:
        key = (bsz, max_len, max_new)
        s = self._sessions.get(key)
        if s is None:
            self._sessions.clear()  # one live session: its cache and graph pool are the big allocations
            s = self._sessions[key] = _Session(self.decoder, bsz, max_len, max_new, self.dtype, self.device)
        return s

    def release(self) -> None:
        """Free the cache and graphs of the current session."""
        self._sessions.clear()

    def cache_nbytes(self) -> int:
        """Bytes of the live session's KV cache (0 without a session)."""
        s = next(iter(self._sessions.values()), None)
        return s.cache.nbytes() if s is not None else 0

    def rewound_decode_step(self, kv_len: int, steps: int, graph: bool = True) -> Callable[[], None]:
        """For profilers, after a generation: rewind the live session so that ``steps`` more greedy decode
        steps fit before ``kv_len`` and return a function running one such step (a replay of its captured
        CUDA graph when ``graph``, else the eager step)."""
        s = next(iter(self._sessions.values()))
        g = self._graph(s, kv_len, True) if graph else None
        s.slot.fill_(max(0, kv_len - steps - 1))  # room for `steps` more slots and tokens
        s.step.zero_()
        return g.replay if g is not None else (lambda: self._decode_body(s, kv_len, True))

    def _advance(self, s: _Session, nxt: torch.Tensor) -> None:
        """Record ``nxt`` ``[B]`` as the token of step ``s.step`` and feed it to the next step."""
        nxt = torch.where(s.done, s.pad, nxt)
        s.out.index_copy_(1, s.step, nxt[:, None])
        s.done |= (nxt[:, None] == s.eos[None, :]).any(-1)
        s.tok.copy_(nxt[:, None])
        s.pos.add_(1)
        s.slot.add_(1)
        s.step.add_(1)

    def _decode_body(self, s: _Session, kv_len: int, greedy: bool) -> None:
        s.cache.valid.index_fill_(1, s.slot, True)
        logits = self.decoder.forward(s.cache, s.tok, s.pos, s.slot, kv_len)
        if greedy and self.decoder.decode_kernels:  # argmax and bookkeeping in one kernel (+ one add)
            dk.greedy_advance(logits, s.done, s.pad, s.eos, s.out, s.tok, s.pos, s.counters)
            return
        if s.logits is None or s.logits.shape != logits.shape or s.logits.dtype != logits.dtype:
            s.logits = torch.empty_like(logits)
        s.logits.copy_(logits)
        if greedy:
            self._advance(s, s.logits.argmax(-1))

    def _graph(self, s: _Session, kv_len: int, greedy: bool):
        g = s.graphs.get((kv_len, greedy))
        if g is None:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=s.pool):
                self._decode_body(s, kv_len, greedy)
            s.pool = g.pool() if s.pool is None else s.pool
            s.graphs[(kv_len, greedy)] = g
        return g

    def _warm_up(self, s: _Session, kv_len: int) -> None:
        """Run the decode body eagerly on a side stream (kernel compilation, GEMV plans, cuBLAS
        handles) before the first capture; the state it touched is reset by the caller."""
        st = torch.cuda.Stream(self.device)
        st.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(st):
            for _ in range(2):
                self._decode_body(s, kv_len, greedy=True)
        torch.cuda.current_stream(self.device).wait_stream(st)
        torch.cuda.synchronize(self.device)
        s.warm = True

    @torch.inference_mode()
    def prefill_runner(self, prompts: Sequence[Sequence[int]] | torch.Tensor, graph: bool = False) -> Callable[[], None]:
        """For benchmarks and profilers: a function that runs the prefill of ``prompts`` (the forward over
        every prompt token and the greedy choice of the first new token) on a session's state, as often as
        called. With ``graph`` (CUDA graphs on), it replays a CUDA graph of all of it captured here: the
        prefill's device time without the host's kernel launches. Call it after a
        ``generate`` of the same prompts (kernels compiled, launches prepared); it holds until the next
        ``generate`` or ``prefill_runner`` (they reset the session's state)."""
        prompts = self._check_prompts(prompts)
        if graph and not self.cuda_graphs:
            raise ValueError("a graphed prefill needs an engine with CUDA graphs (a CUDA model)")
        plen = max(len(p) for p in prompts)
        s = self._session(len(prompts), KV_BLOCK * math.ceil((plen + 1) / KV_BLOCK), 1)
        tokens, positions = self._reset(s, prompts, 0, [])

        @torch.inference_mode()
        def run():
            s.step.zero_()
            self._advance(s, self._prefill(s, tokens, positions).argmax(-1))

        if not graph:
            return run
        run()  # eager once more in this session (its rope table; the launches are prepared by the generate)
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        # the graph reads these tensors (allocated outside its pool): they live as long as the session
        s.graphs[("prefill_runner", tuple(tokens.shape))] = (g, tokens, positions)
        return g.replay

    # ------------------------------------------------------------------ generation
    def _check_prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (an empty prompt: start it with BOS)")
        bad = [t for p in prompts for t in p if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return prompts

    def _reset(self, s: _Session, prompts: list[list[int]], pad: int, eos: list[int]):
        """Reset the session state for ``prompts`` (left-padded with ``pad``); returns (tokens, positions)
        ``[B, T]`` on the device."""
        bsz, plen = len(prompts), max(len(p) for p in prompts)
        tokens = torch.full((bsz, plen), pad, dtype=torch.long)
        real = torch.zeros(bsz, plen, dtype=torch.bool)
        for b, p in enumerate(prompts):
            tokens[b, plen - len(p):] = torch.tensor(p)
            real[b, plen - len(p):] = True
        positions = (real.long().cumsum(-1) - 1).clamp_min(0)
        dev = self.device
        tokens, real, positions = tokens.to(dev), real.to(dev), positions.to(dev)
        s.cache.reset()
        s.cache.valid[:, :plen] = real
        s.done.zero_()
        s.step.zero_()
        s.out.fill_(pad)
        s.pad.fill_(pad)
        s.eos.copy_(torch.tensor(eos + [-1] * (MAX_EOS - len(eos)), dtype=torch.long))
        return tokens, positions

    def _prefill_logits(self, s: _Session, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """:meth:`_prefill`, replayed from a CUDA graph when :attr:`prefill_graphs` allows it: a shape of at most
        :data:`PREFILL_GRAPH_TOKENS` tokens run eagerly before in this session (kernels compiled, launches
        prepared) is captured, then replayed with its inputs copied in."""
        shape = tuple(tokens.shape)
        if not self.prefill_graphs or tokens.numel() > PREFILL_GRAPH_TOKENS:
            return self._prefill(s, tokens, positions)
        if shape not in s.prefill_seen:
            s.prefill_seen.add(shape)
            return self._prefill(s, tokens, positions)
        key = ("prefill", shape)
        if key not in s.graphs:
            if sum(k[0] == "prefill" for k in s.graphs) >= MAX_PREFILL_GRAPHS:
                return self._prefill(s, tokens, positions)
            tok, pos = tokens.clone(), positions.clone()  # the graph's inputs: they live as long as the session
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            # one pool for the session's prefill graphs: never replayed at once, and each one's inputs and logits
            # stay allocated (referenced here), so a later capture reuses only the others' intermediates
            with torch.cuda.graph(g, pool=s.prefill_pool):
                logits = self._prefill(s, tok, pos)
            s.prefill_pool = g.pool() if s.prefill_pool is None else s.prefill_pool
            s.graphs[key] = (g, tok, pos, logits)
        g, tok, pos, logits = s.graphs[key]
        tok.copy_(tokens)
        pos.copy_(positions)
        g.replay()
        return logits

    def _prefill(self, s: _Session, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The forward over the prompt tokens into cache slots ``0 … T−1``; sets the next step's position
        and slot; returns the logits ``[B, V]`` of the last prompt position."""
        plen = tokens.shape[1]
        slots = torch.arange(plen, device=self.device)
        logits = self.decoder.forward(s.cache, tokens, positions, slots, plen)
        s.pos.copy_(positions[:, -1:])
        s.slot.fill_(plen - 1)
        return logits

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int = 32,
                 sampling: SamplingParams | None = None, eos_token_id=None, pad_token_id: int | None = None,
                 stream: Callable[[int, list[int]], None] | None = None) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` for every prompt. ``stream(step, tokens)`` (if given) is
        called after each step with one new token per row (``pad`` for finished rows)."""
        sampling = sampling or SamplingParams()
        prompts = self._check_prompts(prompts)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        if len(eos) > MAX_EOS:
            raise ValueError(f"at most {MAX_EOS} end-of-sequence ids, got {len(eos)}")
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)

        bsz, plen = len(prompts), max(len(p) for p in prompts)
        max_len = KV_BLOCK * math.ceil((plen + max_new_tokens) / KV_BLOCK)
        s = self._session(bsz, max_len, max_new_tokens)
        dev = self.device
        gen = None
        if not sampling.greedy:
            gen = torch.Generator(device=dev)
            gen.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())

        if self.cuda_graphs and not s.warm and max_new_tokens > 1:
            self._warm_up(s, min(KV_BLOCK, max_len))

        # ---- reset the session state and prefill
        tokens, positions = self._reset(s, prompts, pad, eos)
        if self.cuda_graphs:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        self._advance(s, sample(self._prefill_logits(s, tokens, positions), sampling, gen))
        if self.cuda_graphs:
            torch.cuda.synchronize(dev)
        t1 = time.perf_counter()
        if stream is not None:
            stream(0, s.out[:, 0].tolist())

        # ---- decode
        steps = 0
        finished_early = False
        for i in range(1, max_new_tokens):
            if stream is None and i % self.sync_every == 0 and eos and bool(s.done.all()):
                finished_early = True
                break
            if stream is not None and eos and bool(s.done.all()):
                finished_early = True
                break
            kv_len = min(max_len, KV_BLOCK * math.ceil((plen + i) / KV_BLOCK))
            if self.cuda_graphs:
                self._graph(s, kv_len, sampling.greedy).replay()
            else:
                self._decode_body(s, kv_len, sampling.greedy)
            if not sampling.greedy:
                self._advance(s, sample(s.logits, sampling, gen))
            steps += 1
            if stream is not None:
                stream(i, s.out[:, i].tolist())
        if self.device.type == "cuda":
            torch.cuda.synchronize(dev)
        t2 = time.perf_counter()

        out = s.out[:, :1 + steps].tolist()
        result = []
        for row in out:
            keep = []
            for t in row:
                keep.append(t)
                if t in eos:
                    break
            result.append(keep)
        return GenerationOutput(tokens=result, prompt_lengths=[len(p) for p in prompts], prefill_s=t1 - t0,
                                decode_s=t2 - t1, decode_steps=steps, batch_size=bsz, cuda_graphs=self.cuda_graphs,
                                timings={"finished_early": finished_early, "cache_len": max_len})
