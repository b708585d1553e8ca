"""Random models of named LLaMA architectures, built directly on the device, for speed measurements.

No download and no calibration: the dense tensors are drawn on the device (``normal(0, 0.02)``), and
each GQSA linear is made directly in the packed format — a row-balanced random group mask (every row
keeps ``round((1−S)·K/G)`` groups, random columns), random codes, scales and integer zero points —
so a 7B-shape GQSA model never exists in dense form. Speed does not depend on the values.

Settings (``parse_setting``): ``fp16`` / ``bf16`` (dense), ``w{b}s{S}g{G}`` (GQSA, e.g. ``w4s50g16``;
``w4s50g16b64``: block-uniform mask, every 64-row block keeping the same columns, as ``--allocation block64``),
``tinygemm`` (torch's int4 ``_weight_int4pack_mm``, group 128, bf16 activations; CUDA only).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..allocation import packed_bits
from ..config import LM_HEAD_BITS
from ..format import PackedLinear
from ..head import HEAD_GROUP
from ..kernels.block_layout import resident_bytes
from ..nn import GQSALinear, cpu_weight_cache_default
from ..prune import kept_groups

ARCHS = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=512),
}
_LAYERS = re.compile(r"^(?P<arch>[a-z0-9.-]+?)-layers=(?P<n>\d+)$")
_GQSA = re.compile(r"^w(?P<bits>\d)s(?P<s>\d{1,2})g(?P<g>\d+)(?:(?P<kind>[bc])(?P<r>\d+))?(?:h(?P<head>\d+))?$")


def arch_config(name: str):
    """``LlamaConfig`` of a named architecture; ``NAME-layers=N`` keeps only N decoder layers."""
    from transformers import LlamaConfig

    m = _LAYERS.match(name)
    base, layers = (m["arch"], int(m["n"])) if m else (name, None)
    if base not in ARCHS:
        raise ValueError(f"unknown synthetic architecture '{name}': use one of {', '.join(ARCHS)} "
                         f"(optionally NAME-layers=N, e.g. llama-2-70b-layers=8)")
    kw = dict(ARCHS[base])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"{name}: the number of layers must be >= 1")
        kw["num_hidden_layers"] = layers
    theta = kw.pop("rope_theta", 10000.0)
    cfg = LlamaConfig(**kw, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return cfg


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # "dense", "gqsa" or "tinygemm"
    dtype: torch.dtype
    bits: int = 16
    sparsity: float = 0.0
    group_size: int = 0
    block_rows: int = 0  # > 0: block-uniform mask (every R-row block keeps the same columns)
    clustered: bool = False  # with block_rows: the blocks' rows shuffled (clusters of R rows, --allocation clusterR)
    head_bits: int = 0  # > 0: the output layer quantized too (h<bits>: --quantize-lm-head, gqsa.head)


def parse_setting(text: str) -> Setting:
    t = text.strip().lower()
    if t in ("fp16", "float16"):
        return Setting("fp16", "dense", torch.float16)
    if t in ("bf16", "bfloat16"):
        return Setting("bf16", "dense", torch.bfloat16)
    if t in ("tinygemm", "int4g128", "tinygemm-g128"):
        return Setting("tinygemm", "tinygemm", torch.bfloat16, bits=4, group_size=128)
    m = _GQSA.match(t)
    if m:
        bits, s, g = int(m["bits"]), int(m["s"]) / 100, int(m["g"])
        if bits not in (2, 3, 4, 8) or g not in (16, 32, 64, 128):
            raise ValueError(f"setting '{text}': GQSA bits must be 2, 3, 4 or 8 and G one of 16, 32, 64, 128")
        r = int(m["r"] or 0)
        if r and (r < 16 or r & (r - 1)):
            raise ValueError(f"setting '{text}': the block height b<R> (cluster size c<R>) must be a power of two ≥ 16")
        head = int(m["head"] or 0)
        if m["head"] and head not in LM_HEAD_BITS:
            raise ValueError(f"setting '{text}': the output layer h<bits> takes {' or '.join(map(str, LM_HEAD_BITS))} bits")
        return Setting(t, "gqsa", torch.float16, bits=bits, sparsity=s, group_size=g, block_rows=r,
                       clustered=m["kind"] == "c", head_bits=head)
    raise ValueError(f"unknown setting '{text}': use fp16, bf16, tinygemm or w{{bits}}s{{sparsity%}}g{{G}} "
                     f"such as w4s50g16 (b<R>: blocks of R rows, c<R>: clusters of R rows, h<bits>: the output "
                     f"layer quantized too, e.g. w4s50g16h8)")


def random_packed(n: int, k: int, sparsity: float, bits: int, group_size: int, device,
                  generator: torch.Generator, block_rows: int = 0, clustered: bool = False) -> PackedLinear:
    """A valid random packed layer with every row keeping ``round((1−S)·C)`` of its ``C`` group columns
    (``block_rows`` > 0: the same columns in every block of that many rows; ``clustered``: those blocks'
    rows shuffled, so that the R rows sharing their columns are not consecutive)."""
    c = math.ceil(k / group_size)
    keep = kept_groups(c, sparsity)
    dev = torch.device(device)
    r = block_rows or 1
    cols = torch.rand(-(-n // r), c, device=dev, generator=generator).argsort(dim=1)[:, :keep].sort(dim=1).values
    cols = cols.repeat_interleave(r, dim=0)[:n]
    if clustered:
        cols = cols[torch.randperm(n, device=dev, generator=generator)]
    nnz = n * keep
    row_ptr = (torch.arange(n + 1, device=dev, dtype=torch.int64) * keep).to(torch.int32)
    qweight = torch.randint(0, 256, (nnz, group_size * bits // 8), device=dev, dtype=torch.uint8, generator=generator)
    qmax = (1 << bits) - 1
    # zero points qmax//2 or qmax//2 + 1, around the codes' mean qmax/2: zero-mean weights. (Until 2026-12-01 they were
    # qmax//2 − 1 … + 1, a bias of half a step that made the residual stream of deep synthetic models grow to inf in
    # fp16 — the W3 G128 7B model's last layers read NaN — and sent every row of the half-dot GEMV to its fp32 redo.)
    zeros = torch.randint(qmax // 2, qmax // 2 + 2, (nnz,), device=dev, dtype=torch.uint8, generator=generator)
    step = 0.02 / (qmax / math.sqrt(12))  # weight std ~0.02, like the dense layers
    scales = (step * (0.75 + 0.5 * torch.rand(nnz, device=dev, generator=generator))).to(torch.float16)
    if k % group_size:  # padding codes of the last column must dequantize to 0: use z for them
        raise ValueError(f"synthetic GQSA layers need K divisible by G (K={k}, G={group_size})")
    return PackedLinear(row_ptr=row_ptr, col_idx=cols.reshape(-1).to(torch.int16), qweight=qweight, scales=scales,
                        zeros=zeros, shape=(n, k), bits=bits, group_size=group_size)


class TinyGemmLinear(nn.Module):
    """torch's int4 tinygemm (``aten._weight_int4pack_mm``), random weights, bf16 activations, g128."""

    def __init__(self, in_features: int, out_features: int, device, generator, group_size: int = 128):
        super().__init__()
        n, k = out_features, in_features
        self.in_features, self.out_features, self.group_size = k, n, group_size
        q = torch.randint(0, 16, (n, k), device=device, dtype=torch.int32, generator=generator)
        w_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack(w_u8, 8))
        scales = torch.rand(k // group_size, n, device=device, generator=generator) * 0.004 + 0.002
        zeros = torch.randn(k // group_size, n, device=device, generator=generator) * 0.001
        self.register_buffer("scales_and_zeros", torch.stack([scales, zeros], 2).to(torch.bfloat16).contiguous())

    def forward(self, x):
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                               self.weight_int4, self.group_size, self.scales_and_zeros)
        return y.to(x.dtype).reshape(*lead, self.out_features)


def _block_linears(model):
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        for parent, name in ((a, "q_proj"), (a, "k_proj"), (a, "v_proj"), (a, "o_proj"), (m, "gate_proj"),
                             (m, "up_proj"), (m, "down_proj")):
            yield parent, name, getattr(parent, name)


MEMORY_OVERHEAD = 1 << 30  # the runtime, activations, caches and a layer's temporaries, on top of the weights


@functools.lru_cache(maxsize=None)
def _parameter_shapes(arch: str) -> tuple[int, tuple]:
    """(parameters of ``arch``, ``(N, K)`` of its block linears), from a model on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(arch_config(arch))
    return (sum(p.numel() for p in model.parameters()),
            tuple((lin.out_features, lin.in_features) for _, _, lin in _block_linears(model)))


def memory_needed(arch: str, setting: Setting | str, device) -> int:
    """Bytes a benchmark of ``setting`` on ``arch`` takes on ``device`` at its peak, roughly: on a GPU the
    weights as built (fp16; a GQSA layer's packed bytes with its kernels' layouts,
    :func:`gqsa.kernels.block_layout.resident_bytes`); on a CPU the float32 model the benchmark computes in (4 bytes per
    weight; GQSA layers cache their dequantized float32 weight there, unless ``GQSA_CPU_WEIGHT_CACHE=0``), plus
    ``MEMORY_OVERHEAD``. What :func:`gqsa.commands.bench` checks before building anything."""
    setting = parse_setting(setting) if isinstance(setting, str) else setting
    cuda = torch.device(device).type == "cuda"
    total, shapes = _parameter_shapes(arch)
    linear = sum(n * k for n, k in shapes)
    if setting.kind == "dense":
        return (2 if cuda else 4) * total + MEMORY_OVERHEAD
    if setting.kind == "tinygemm":  # CUDA only: 4 bits and a bf16 scale and zero per 128 weights
        return 2 * (total - linear) + linear // 2 + linear // 32 + MEMORY_OVERHEAD
    g = setting.group_size
    packed = sum(packed_bits(n, k, kept_groups(math.ceil(k / g), setting.sparsity), setting.bits, g)
                 for n, k in shapes) // 8
    if cuda:
        return 2 * (total - linear) + resident_bytes(packed, "block" if setting.block_rows else "irregular") \
            + MEMORY_OVERHEAD
    return 4 * (total - linear) + packed + (4 * linear if cpu_weight_cache_default() else 0) + MEMORY_OVERHEAD


def available_memory(device) -> int | None:
    """Bytes free for a new model on ``device``: the GPU's free memory, or the host's ``MemAvailable``
    (Linux); None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@torch.no_grad()
def build_synthetic(arch: str, setting: Setting | str, device="cuda", seed: int = 0):
    """A ``LlamaForCausalLM`` of architecture ``arch`` with random weights in ``setting``, built on
    ``device`` (dense tensors of compressed layers are never allocated)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    setting = parse_setting(setting) if isinstance(setting, str) else setting
    device = torch.device(device)
    if setting.kind == "tinygemm" and device.type != "cuda":
        raise ValueError("the tinygemm setting needs a CUDA device")
    cfg = arch_config(arch)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(setting.dtype)
    shapes = []
    if setting.kind != "dense":  # compressed layers: a placeholder now, the real module after to_empty
        for parent, name, lin in list(_block_linears(model)):
            shapes.append((parent, name, lin.out_features, lin.in_features))
            setattr(parent, name, nn.Identity())
    if setting.head_bits:
        model.lm_head = nn.Identity()
    model.to_empty(device=device)
    for p in model.parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        else:
            p.fill_(1.0)  # RMSNorm weights
    for parent, name, n, k in shapes:
        if setting.kind == "gqsa":
            mod = GQSALinear.from_packed(random_packed(n, k, setting.sparsity, setting.bits, setting.group_size,
                                                       device, gen, setting.block_rows, setting.clustered))
        else:
            mod = TinyGemmLinear(k, n, device, gen)
        setattr(parent, name, mod)
    if setting.head_bits:  # groups of HEAD_GROUP inputs (of 64 where the width is not a multiple of it)
        k = cfg.hidden_size
        model.lm_head = GQSALinear.from_packed(random_packed(cfg.vocab_size, k, 0.0, setting.head_bits,
                                                             HEAD_GROUP if k % HEAD_GROUP == 0 else 64, device, gen))
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg).to(device)  # float32 inv_freq, recomputed
    model.config.dtype = setting.dtype
    return model.eval()


def weight_bytes(model) -> int:
    """Bytes of every parameter and persistent buffer (the model's size in memory)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "inv_freq" not in n]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
