"""GQSA checkpoints in Hugging Face transformers: ``AutoModelForCausalLM.from_pretrained(folder)``.

``import gqsa`` registers, through transformers' public registration API
(``transformers.quantizers.register_quantization_config`` / ``register_quantizer``), the
quantization method ``"gqsa"``: the ``quantization_config`` of a checkpoint folder written by
:func:`gqsa.checkpoint.save` becomes a :class:`GQSAQuantizationConfig`, and
:class:`GQSAHfQuantizer` replaces, on the meta device before any weight is read, every linear named in
its ``layers`` map by a :class:`~gqsa.nn.GQSALinear` whose packed buffers have the checkpoint's
sizes (read from the safetensors headers, no data). transformers then loads the tensors as usual;
afterwards every packed layer is validated with :func:`gqsa.format.validate` — the same checks as
:func:`gqsa.load` — so a tampered or mismatched folder raises :class:`~gqsa.format.FormatError`
instead of loading silently wrong.

For a local folder, before any weight is read, the folder goes through the checks of :func:`gqsa.load`
on the files as stored (so before transformers casts any dtype): checksums, JSON and config validation,
every packed layer and dense tensor, packed tensors of a layer the layer map does not list; tensors the model
lacks or parameters the folder lacks (tied ones excepted) raise; after loading, every packed buffer must
be exactly the validated tensor and every tensor finite.

Two further guards, because transformers on its own only *warns* in these cases:

* a checkpoint tensor that is missing for a compressed layer raises (transformers would initialize
  it with garbage);
* a ``quantization_config`` that carries GQSA's signature (a ``layers`` map with ``shape`` / ``bits`` /
  ``group_size`` entries, or a ``format_version``) but names another, unknown ``quant_method`` raises
  (transformers would skip quantization and load a dense model with missing weights). This wraps
  ``AutoHfQuantizer.supports_quant_method``; configs of other libraries pass through unchanged.

:func:`gqsa.load` (:mod:`gqsa.checkpoint`) stays the direct API (``verify=False`` skips the checksums there;
``from_pretrained`` of a local folder always verifies them).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import (FORMAT_VERSION, check_companion_files, check_model_config, check_quantization_config,
                          read_quantization_config, read_tensors, validated_layers)
from ..format import TENSOR_NAMES, FormatError
from ..nn import GQSALinear
from ..modules import replace_submodule

try:  # transformers is a dependency, but keep `import gqsa` working if it is broken
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              AutoHfQuantizer)
    from transformers.utils.quantization_config import QuantizationConfigMixin

    HAS_TRANSFORMERS = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRANSFORMERS = False
    HfQuantizer = QuantizationConfigMixin = object

QUANT_METHOD = "gqsa"


def looks_like_gqsa(qc) -> bool:
    """A quantization_config dict with GQSA's signature (whatever its quant_method says)."""
    if not isinstance(qc, dict):
        return False
    layers = qc.get("layers")
    if isinstance(layers, dict) and layers:
        first = next(iter(layers.values()))
        if isinstance(first, dict) and {"shape", "bits", "group_size"} <= set(first):
            return True
    return "format_version" in qc and "group_size" in qc


class GQSAQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a GQSA checkpoint (see :mod:`gqsa.checkpoint`): every key of the
    folder's ``config.json`` entry is kept as an attribute, so ``to_dict()`` writes it back unchanged."""

    def __init__(self, quant_method: str = QUANT_METHOD, format_version: int = FORMAT_VERSION, layers=None,
                 **kwargs):
        self.quant_method = quant_method
        self.format_version = format_version
        self.layers = layers
        for k, v in kwargs.items():
            setattr(self, k, v)
        check_quantization_config(self.to_dict())

    @property
    def float_zeros(self) -> bool:
        return getattr(self, "zero_point", "int") == "float"


def _folder_of(model) -> Path | None:
    name = getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if name and Path(name).is_dir():
        return Path(name)
    return None


def _checkpoint_files(model, checkpoint_files) -> list[Path]:
    if checkpoint_files:
        return [Path(f) for f in checkpoint_files if str(f).endswith(".safetensors")]
    folder = _folder_of(model)
    if folder is None:
        return []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []


def _header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors headers only (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    shapes[name] = tuple(h.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise FormatError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return shapes


class GQSAHfQuantizer(HfQuantizer):
    """Loads pre-compressed GQSA checkpoints (no on-the-fly quantization: compress with ``gqsa compress``)."""

    requires_calibration = True
    _validated = None
    _tensor_names: set = set()

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise FormatError("GQSA cannot quantize a model while loading it: compress it with `gqsa compress` "
                              "(or gqsa.compress) and load the folder that writes")

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise FormatError("GQSA checkpoints cannot be offloaded to disk: load them on CPU or GPU")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        """True for the packed tensors of a compressed layer: their sizes depend on the kept groups,
        so transformers must not reject them as 'mismatched' (they are validated after loading)."""
        module, _, leaf = param_name.rpartition(".")
        return leaf in TENSOR_NAMES and module in (self.quantization_config.layers or {})

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        qc = self.quantization_config
        folder = _folder_of(model)
        where = str(folder) if folder is not None else "quantization_config"
        self._validated = None
        if folder is not None:  # a local folder: the checks of gqsa.load, on the files as stored (before
            # transformers casts anything): checksums, JSON, config, every tensor, the layer map
            config, folder_qc = read_quantization_config(folder)
            origin = {}
            with torch.device("cpu"):  # (transformers may have made meta the default device)
                tensors = read_tensors(folder, verify=True, origin=origin)
                packed = validated_layers(folder, folder_qc, tensors, origin)
            check_model_config(config, folder / "config.json", tensors)
            check_companion_files(folder, config)
            self._validated = {f"{n}.{t}": v for n, p in packed.items() for t, v in p.tensors().items()}
            self._tensor_names = set(tensors)
        shapes = _header_shapes(_checkpoint_files(model, checkpoint_files))
        for name, meta in qc.layers.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise FormatError(f"{where}: compressed layer {name} does not exist in a "
                                  f"{model.config.model_type} model") from None
            n, k = (int(v) for v in meta["shape"])
            if not isinstance(old, torch.nn.Linear) or (old.out_features, old.in_features) != (n, k):
                got = ([old.out_features, old.in_features] if isinstance(old, torch.nn.Linear)
                       else type(old).__name__)
                raise FormatError(f"{where}: layer {name} is [{n}, {k}] in quantization_config but {got} "
                                  f"in the model config")
            new = GQSALinear(k, n, int(meta["bits"]), int(meta["group_size"]), bias=old.bias is not None,
                             float_zeros=qc.float_zeros, dtype=old.weight.dtype)
            if shapes:
                missing = [t for t in TENSOR_NAMES if f"{name}.{t}" not in shapes]
                if missing:
                    raise FormatError(f"{where}: layer {name} lacks tensor(s) {', '.join(missing)}")
                for t in TENSOR_NAMES:  # buffers of the checkpoint's sizes (meta: nothing is allocated)
                    buf = getattr(new, t)
                    setattr(new, t, torch.empty(shapes[f"{name}.{t}"], dtype=buf.dtype, device="meta"))
            replace_submodule(model, name, new)
        if self._validated is not None:  # transformers only warns about these, and initializes at random
            expected = set(model.state_dict())
            try:
                tied = set(model.get_expanded_tied_weights_keys())
            except Exception:  # noqa: BLE001  (older transformers)
                tied = set(getattr(model, "_tied_weights_keys", None) or ())
            missing = sorted(expected - self._tensor_names - tied)
            extra = sorted(self._tensor_names - expected)
            if missing or extra:
                raise FormatError(f"{where}: the tensors do not match a {model.config.model_type} model with this "
                                  f"config.json: missing {missing[:3]}, not in the model {extra[:3]}")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        where = str(_folder_of(model) or "checkpoint")
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
                raise FormatError(f"{where}: {name} holds NaN or infinite values after loading")
        for name, m in model.named_modules():
            if isinstance(m, GQSALinear):
                meta = [t for t in TENSOR_NAMES if getattr(m, t).is_meta]
                if meta:
                    raise FormatError(f"{where}: layer {name} lacks tensor(s) {', '.join(meta)}")
                m.packed.validate(f"{where}: {name}")
                if self._validated is not None:  # exactly the validated tensors, not a cast of them
                    for t in TENSOR_NAMES:
                        ref, got = self._validated[f"{name}.{t}"], getattr(m, t)
                        if got.dtype != ref.dtype or not torch.equal(got.cpu(), ref):
                            raise FormatError(f"{where}: {name}.{t} changed while transformers loaded it "
                                              f"({ref.dtype} -> {got.dtype})")
                m._plan = None
        return model

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self, *args, **kwargs) -> bool:
        return True


_registered = False


def register() -> None:
    """Register ``quant_method="gqsa"`` with transformers (idempotent; done by ``import gqsa``)."""
    global _registered
    if _registered or not HAS_TRANSFORMERS:
        return
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(GQSAQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(GQSAHfQuantizer)
    original = AutoHfQuantizer.__dict__["supports_quant_method"]
    original_fn = original.__func__ if isinstance(original, staticmethod) else original
    if not getattr(original_fn, "_gqsa_guard", False):
        def supports_quant_method(quantization_config_dict):
            qc = quantization_config_dict
            if (isinstance(qc, dict) and qc.get("quant_method") not in AUTO_QUANTIZATION_CONFIG_MAPPING
                    and looks_like_gqsa(qc)):
                raise FormatError(f"quantization_config has a GQSA layer map but quant_method "
                                  f"'{qc.get('quant_method')}', which nothing registered can load; "
                                  f"set it to 'gqsa' if gqsa wrote this folder, or load it with the library "
                                  f"that wrote it")
            return original_fn(quantization_config_dict)

        supports_quant_method._gqsa_guard = True
        AutoHfQuantizer.supports_quant_method = staticmethod(supports_quant_method)
    _registered = True


register()
