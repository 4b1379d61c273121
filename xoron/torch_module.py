"""MoELlamaForCausalLM as a torch.nn.Module (what `from xoron import MoELlamaForCausalLM` gives
when torch is installed).

The module tree and state_dict keys are the original's. Every Parameter is a view of the C
engine's own weight storage (numpy views of host memory, DLPack of GPU memory), so torch's
machinery - load_state_dict on this module or on any parent, state_dict(), parameters(),
in-place edits such as a merged LoRA - reads and writes the weights the engine runs with.
Moves and casts (.to(), .half(), .cuda(), a parent's .to()) rebuild the engine and re-point
the same Parameter objects. Quantised (int8, int4) weights have no float view: their Parameters hold the
dequantised values, loading a state_dict re-quantises, and any other edit is an error at the
next forward.

The model runs as a whole in C: only the embedding and the linear layers have a forward of
their own (one gather / one product on the engine's weights).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import _C
from . import modeling as _m
from .checkpoint import check_not_gqa_branch
from .config import engine_dict
from ._tensors import to_numpy

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _runs_as_a_whole(module) -> None:
    raise NotImplementedError(
        f"{type(module).__name__} '{module._xo_name}' has no forward of its own: xoron runs the model as a whole "
        "in C. Call the MoELlamaForCausalLM (inputs_embeds= for embeddings made elsewhere); model.embed_tokens "
        "and the linear layers do have a forward.")


class _Fixed:
    """The engine computes this tree, so swapping a submodule or a weight for another object
    would silently change nothing: assigning a same-shaped tensor to a weight copies it into
    the engine, anything else is refused."""

    _xo_frozen = False

    def __setattr__(self, name, value):
        if self._xo_frozen:
            current = self._modules.get(name) if "_modules" in self.__dict__ else None
            if current is not None and value is not current:
                raise TypeError(f"cannot replace '{self._xo_name}.{name}': xoron computes this module tree in C, so "
                                "a module put in its place would never run. Merge adapters into the weights "
                                "instead (e.g. with torch.no_grad(): layer.weight += delta)")
            param = self._parameters.get(name) if "_parameters" in self.__dict__ else None
            if param is not None and value is not param:
                if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(param.shape):
                    with torch.no_grad():
                        param.copy_(value)
                    return
                raise TypeError(f"cannot assign to '{self._xo_name}.{name}': give a tensor of shape "
                                f"{list(param.shape)} (it is copied into the engine's weight), or use "
                                "resize_token_embeddings / load_state_dict")
        super().__setattr__(name, value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
        # load_state_dict(assign=True) would swap our Parameters for the caller's tensors, which
        # the engine never reads: copy into them instead
        local_metadata = dict(local_metadata, assign_to_params_buffers=False)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)


class _Container(_Fixed, nn.Module):
    def __init__(self, name: str):
        nn.Module.__init__(self)
        self._xo_name = name

    def forward(self, *args, **kwargs):
        _runs_as_a_whole(self)


class Linear(_Fixed, nn.Linear):
    """nn.Linear(bias=False) whose weight is the engine's."""

    def __init__(self, name: str, in_features: int, out_features: int):
        nn.Module.__init__(self)
        self._xo_name = name
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("bias", None)


class Embedding(_Fixed, nn.Embedding):
    """nn.Embedding whose table is the engine's; its forward is one gather on that table."""

    def __init__(self, name: str, num_embeddings: int, embedding_dim: int):
        nn.Module.__init__(self)
        self._xo_name = name
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False


class RMSNorm(_Container):
    def __init__(self, name: str, eps: float):
        super().__init__(name)
        self.eps = eps


class SwiGLU(_Container):
    def __init__(self, name, hidden, inter):
        super().__init__(name)
        self.gate_proj = Linear(f"{name}.gate_proj", hidden, inter)
        self.up_proj = Linear(f"{name}.up_proj", hidden, inter)
        self.down_proj = Linear(f"{name}.down_proj", inter, hidden)


class Router(_Container):
    def __init__(self, name, hidden, experts):
        super().__init__(name)
        self.input_norm = RMSNorm(f"{name}.input_norm", 1e-6)
        self.gate = Linear(f"{name}.gate", hidden, experts)


class MoELayer(_Container):
    def __init__(self, name, hidden, inter, experts, top_k):
        super().__init__(name)
        self.num_experts, self.num_experts_per_tok = experts, top_k
        self.router = Router(f"{name}.router", hidden, experts)
        self.experts = ModuleList(f"{name}.experts", [SwiGLU(f"{name}.experts.{e}", hidden, inter) for e in range(experts)])
        self.shared_expert = SwiGLU(f"{name}.shared_expert", hidden, inter)


class MLAttention(_Container):
    def __init__(self, name, c):
        super().__init__(name)
        H, nh = c.hidden_size, c.num_attention_heads
        hd, r = H // nh, c.kv_lora_rank
        if c.q_lora_rank:
            self.q_a_proj = Linear(f"{name}.q_a_proj", H, c.q_lora_rank)
            self.q_a_layernorm = RMSNorm(f"{name}.q_a_layernorm", 1e-6)
            self.q_b_proj = Linear(f"{name}.q_b_proj", c.q_lora_rank, nh * hd)
        else:
            self.q_proj = Linear(f"{name}.q_proj", H, nh * hd)
        self.kv_a_proj = Linear(f"{name}.kv_a_proj", H, r + hd)
        self.kv_a_layernorm = RMSNorm(f"{name}.kv_a_layernorm", 1e-6)
        self.kv_b_proj = Linear(f"{name}.kv_b_proj", r, 2 * c.num_key_value_heads * hd)
        self.o_proj = Linear(f"{name}.o_proj", nh * hd, H)


class DecoderLayer(_Container):
    def __init__(self, name, c, moe: bool):
        super().__init__(name)
        H = c.hidden_size
        self.is_moe_layer = moe
        self.input_layernorm = RMSNorm(f"{name}.input_layernorm", c.rms_norm_eps)
        self.self_attn = MLAttention(f"{name}.self_attn", c)
        self.post_attention_layernorm = RMSNorm(f"{name}.post_attention_layernorm", c.rms_norm_eps)
        mc = c.moe_config
        if moe:
            self.mlp = MoELayer(f"{name}.mlp", H, mc["intermediate_size"], mc["num_experts"], mc["num_experts_per_tok"])
        else:
            self.mlp = SwiGLU(f"{name}.mlp", H, c.intermediate_size)


class ModuleList(_Fixed, nn.ModuleList):
    def __init__(self, name, modules):
        nn.ModuleList.__init__(self, modules)
        self._xo_name = name

    def __setitem__(self, idx, module):
        raise TypeError(f"cannot replace '{self._xo_name}[{idx}]': xoron computes this module tree in C")


class MoELlamaModel(_Container):
    """The decoder stack: embed_tokens, layers, norm (the original's `model`)."""

    def __init__(self, c):
        super().__init__("model")
        moe = c.moe_config
        flags = [bool(moe.get("use_moe")) and (i + 1) % moe["moe_layer_freq"] == 0 for i in range(c.num_hidden_layers)]
        self.embed_tokens = Embedding("model.embed_tokens", c.vocab_size, c.hidden_size)
        self.layers = ModuleList("model.layers", [DecoderLayer(f"model.layers.{i}", c, f) for i, f in enumerate(flags)])
        self.norm = RMSNorm("model.norm", c.rms_norm_eps)
        self.num_moe_layers = sum(flags)


def _freeze(module: nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, _Fixed):
            object.__setattr__(sub, "_xo_frozen", True)


class MoELlamaForCausalLM(nn.Module, _m.MoELlamaForCausalLM):
    """Xoron MoE-LLaMA causal language model as a torch.nn.Module, computed by the C engine.

    Takes what the numpy class takes (see xoron.modeling.MoELlamaForCausalLM); parameters do
    not require gradients (inference only).
    """

    def __init__(self, config=None, moe_config=None, *, dtype="float32", device="cpu", seed=None,
                 cache_format="latent", options=None, _init=True):
        nn.Module.__init__(self)
        self._xo_ready = False
        self._readonly = []   # int8/int4: (Parameter, version at the last sync) of the dequantised copies
        _m.MoELlamaForCausalLM.__init__(self, config, moe_config, dtype=dtype, device=device, seed=seed,
                                        cache_format=cache_format, options=options, _init=_init)
        self.register_load_state_dict_pre_hook(_check_tied_head)
        self.register_load_state_dict_post_hook(_after_load)

    # ---- the tree and its Parameters ----

    def _weights_changed(self):
        if not self._xo_ready:
            c = self.config
            self.model = MoELlamaModel(c)
            self.lm_head = Linear("lm_head", c.hidden_size, c.vocab_size)
        self._bind_parameters()
        if not self._xo_ready:
            _freeze(self)
            self._xo_ready = True

    def _bind_parameters(self):
        self._readonly = []
        for name, view, dtype_name, is_view in self._engine.weight_views():
            t = _as_tensor(view, dtype_name)
            owner, attr = name.rsplit(".", 1)
            mod = self.get_submodule(owner)
            p = mod._parameters.get(attr)
            if p is None:
                mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
                p = mod._parameters[attr]
            else:
                p.data = t
            if not is_view:
                self._readonly.append((p, p._version))
        if self.config.tie_word_embeddings:
            self.lm_head._parameters["weight"] = self.model.embed_tokens.weight

    def _check_weights(self):
        """Before the engine runs: torch's pending work on the weights is done, and no quantised
        weight was edited behind the engine's back."""
        for p, version in self._readonly:
            if p._version != version:
                raise RuntimeError(f"a weight of this {self._dtype} model was edited in place; quantised weights "
                                   "are read-only (their Parameters hold dequantised copies). Edit a float model (model.float()) "
                                   "and quantize() again, or load_state_dict(), which re-quantises")
        if self._engine.device.startswith("cuda"):
            torch.cuda.current_stream(torch.device(self._engine.device)).synchronize()

    def _apply(self, fn, recurse=True):
        """A parent's .to()/.half()/.cuda()/... reaches the engine: the target device and dtype
        are read off what fn does to an empty tensor like our weights."""
        probe_dtype = self.dtype
        probe = fn(torch.empty(0, dtype=probe_dtype, device=self.device))
        dtype = None
        if probe.dtype != probe_dtype:
            if probe.dtype not in _NAMES:
                raise ValueError(f"xoron stores weights as float32, bfloat16, float16, int8 or int4, not {probe.dtype}")
            dtype = _NAMES[probe.dtype]
        device = str(probe.device) if probe.device != self.device else None
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
        self._rebuild(device, dtype)
        return self

    def to(self, *args, **kwargs):
        """torch's .to(device, dtype, ...) plus xoron's string dtypes (to("int8"), to(dtype="bfloat16"))."""
        named = kwargs.get("dtype")
        if isinstance(named, str) or any(isinstance(a, str) and a in _m.DTYPES for a in args):
            return _m.MoELlamaForCausalLM.to(self, *args, **kwargs)
        try:
            torch._C._nn._parse_to(*args, **kwargs)
        except RuntimeError as e:  # e.g. an unknown device string
            raise DeviceError(f"bad device or dtype in to(): {e}") from None
        return nn.Module.to(self, *args, **kwargs)

    # nn.Module comes first in the bases, so the engine class's forms are named here (they call self.to)
    float = _m.MoELlamaForCausalLM.float
    bfloat16 = _m.MoELlamaForCausalLM.bfloat16
    half = _m.MoELlamaForCausalLM.half
    cpu = _m.MoELlamaForCausalLM.cpu

    def cuda(self, device=None):
        index = device if isinstance(device, int) else torch.device(device).index if device is not None else None
        return self.to(device=f"cuda:{index if index is not None else torch.cuda.current_device()}")

    @property
    def dtype(self) -> torch.dtype:
        """The weights' torch dtype (float32 for int8/int4 storage, whose Parameters are dequantised)."""
        return _TORCH_DTYPES.get(self._dtype, torch.float32)

    @property
    def device(self) -> torch.device:
        return torch.device(self._engine.device)

    @property
    def quantization(self):
        """"int8" or "int4" when the weights are stored quantised, else None."""
        return self._dtype if self._dtype in ("int8", "int4") else None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False, *, check_finite: bool = True):
        """torch's load_state_dict (it copies into the engine's weights; assign=True copies too,
        the Parameters being the engine's), also taking numpy arrays. With check_finite (the
        default) a NaN or infinity is refused, naming the tensor. Errors are ValueErrors that
        are also RuntimeErrors (torch raises the latter)."""
        given = {}
        for k, v in state_dict.items():
            t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            if isinstance(t, torch.Tensor) and not t.is_floating_point():
                raise StateDictError(f"state_dict entry '{k}' has dtype {t.dtype}; expected floating point")
            given[k] = t
        if not self._xo_ready:  # built with _init=False: no storage to view yet, the engine loads it
            errors = []
            _check_tied_head(self, given, "", {}, strict, [], [], errors)
            if errors:
                raise StateDictError(errors[0])
            if self.config.tie_word_embeddings:
                given.pop("lm_head.weight", None)
            result = _m.MoELlamaForCausalLM.load_state_dict(self, given, strict, check_finite=check_finite)
            self._weights_changed()
            return result
        self._check_state_dict(given, strict, check_finite)
        try:
            return nn.Module.load_state_dict(self, given, strict=strict, assign=assign)
        except RuntimeError as e:
            raise StateDictError(str(e)) from None

    def _check_state_dict(self, given: dict, strict: bool, check_finite: bool) -> None:
        """Everything torch would complain about, found before any weight is written (torch
        copies the fitting tensors first and reports the rest after)."""
        check_not_gqa_branch(given, "this state_dict")
        own = {k: tuple(v.shape) for k, v in nn.Module.state_dict(self, keep_vars=True).items()}
        keys = set(given)
        if self.config.tie_word_embeddings and "model.embed_tokens.weight" in keys:
            keys.add("lm_head.weight")
        missing, unexpected = sorted(set(own) - keys), sorted(keys - set(own))
        if strict and (missing or unexpected):
            raise StateDictError(f"load_state_dict: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                                 f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for k, t in given.items():
            if k in own and isinstance(t, torch.Tensor) and tuple(t.shape) != own[k]:
                raise StateDictError(f"size mismatch for {k}: copying a param with shape {list(t.shape)} from "
                                     f"checkpoint, the shape in current model is {list(own[k])}")
        for k, t in given.items():
            if check_finite and isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).flatten().nonzero()[0])
                v = float(t.flatten()[bad])
                what = "NaN" if v != v else "+inf" if v > 0 else "-inf"
                raise StateDictError(f"tensor '{k}' holds {what} at element {bad} "
                                     "(load with check_finite=False to accept it)")
        errors = []
        _check_tied_head(self, dict(given), "", {}, strict, [], [], errors)
        if errors:
            raise StateDictError(errors[0])

    def _engine_state_from_parameters(self) -> dict:
        sd = {}
        for name, _ in self._engine.tensor_shapes():
            owner, attr = name.rsplit(".", 1)
            sd[name] = self.get_submodule(owner)._parameters[attr]
        return sd

    # ---- running ----

    def forward(self, *args, **kwargs):
        self._check_weights()
        return _m.MoELlamaForCausalLM.forward(self, *args, **kwargs)

    def generate(self, *args, **kwargs):
        self._check_weights()
        return _m.MoELlamaForCausalLM.generate(self, *args, **kwargs)

    def generate_stream(self, *args, **kwargs):
        self._check_weights()
        return _m.MoELlamaForCausalLM.generate_stream(self, *args, **kwargs)

    # ---- what pipelines call ----

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        """Takes an nn.Embedding (or a [V, H] tensor): its table becomes the engine's, resizing
        the vocabulary when its row count differs."""
        table = value.weight if isinstance(value, nn.Module) else value
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != self.config.hidden_size:
            raise ValueError(f"set_input_embeddings takes an nn.Embedding or a [vocab, {self.config.hidden_size}] "
                             f"tensor, got {type(value).__name__}")
        if table.shape[0] != self.config.vocab_size:
            self.resize_token_embeddings(int(table.shape[0]))
        with torch.no_grad():
            self.model.embed_tokens.weight.copy_(table)

    def get_output_embeddings(self):
        return self.lm_head

    def tie_weights(self):
        """Tied models share one Parameter already; untied ones stay untied (like transformers
        when tie_word_embeddings is False)."""
        if self.config.tie_word_embeddings and self.lm_head.weight is not self.model.embed_tokens.weight:
            self._bind_parameters()

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=None):
        """Rebuilds the engine for a vocabulary of new_num_tokens (rounded up to
        pad_to_multiple_of): rows kept, new rows drawn like the original's init, normal(0, 0.02)."""
        if mean_resizing:
            raise TypeError("resize_token_embeddings(mean_resizing=True) is not implemented: new rows are drawn "
                            "from normal(0, 0.02) like the original's initialisation")
        n = self.config.vocab_size if new_num_tokens is None else _whole_number(new_num_tokens, "new_num_tokens")
        if pad_to_multiple_of is not None:
            k = _whole_number(pad_to_multiple_of, "pad_to_multiple_of")
            if k <= 0:
                raise ValueError(f"pad_to_multiple_of must be positive, got {k}")
            n = (n + k - 1) // k * k
        if n <= 0:
            raise ValueError(f"new_num_tokens must be positive, got {n}")
        if n != self.config.vocab_size:
            old = self._engine.state_dict()
            self.config.vocab_size = n
            fresh = _C.Model(engine_dict(self.config), self._dtype, self._engine.device, self._options)
            fresh.init_random(int(torch.randint(0, 2**62, ()).item()))
            sd = fresh.state_dict()
            keep = min(n, old["model.embed_tokens.weight"].shape[0])
            for key in ("model.embed_tokens.weight", "lm_head.weight"):
                if key in sd:
                    sd[key][:keep] = old[key][:keep]
            for key, a in old.items():
                if key not in ("model.embed_tokens.weight", "lm_head.weight"):
                    sd[key] = a
            fresh.load_arrays(sd, check_finite=False)  # accepted when they were loaded
            self._engine = fresh
            self.model.embed_tokens.num_embeddings = n
            self.lm_head.out_features = n
            self._weights_changed()
        return self.model.embed_tokens


def _whole_number(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    return int(v)


class DeviceError(ValueError, RuntimeError):
    """A device torch cannot parse (torch raises RuntimeError, xoron ValueError)."""


class StateDictError(ValueError, RuntimeError):
    """A state_dict that does not fit (torch code catches RuntimeError, xoron's ValueError)."""


def _as_tensor(view, dtype_name: str) -> torch.Tensor:
    if type(view).__name__ == "PyCapsule":
        return torch.utils.dlpack.from_dlpack(view)
    t = torch.from_numpy(view)
    return t.view(torch.bfloat16) if dtype_name == "bfloat16" else t


def _check_tied_head(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """A tied model's state_dict carries lm_head.weight (torch lists a shared Parameter under
    each name): taken when equal to the embedding; a SPEC-layout one without it is completed."""
    if not module.config.tie_word_embeddings:
        return
    head, emb = prefix + "lm_head.weight", prefix + "model.embed_tokens.weight"
    if head in state_dict and emb in state_dict:
        a, b = state_dict[head], state_dict[emb]
        a_np, _ = to_numpy(a, head)
        b_np, _ = to_numpy(b, emb)
        if a_np.shape != b_np.shape or not (a_np == b_np).all():
            errors.append(f"{head} differs from {emb}, but this model ties them (tie_word_embeddings=True); "
                          "load it into a model built with tie_word_embeddings=False")
    elif emb in state_dict:
        state_dict[head] = state_dict[emb]


def _after_load(module, incompatible):
    """int8/int4: the loaded values sit in the dequantised copies; store them quantised and refresh."""
    if module._readonly:
        # the quantisers refuse a non-finite row themselves, naming it
        module._engine.load_arrays({k: v.detach().cpu().float().numpy()
                                    for k, v in module._engine_state_from_parameters().items()}, check_finite=False)
        module._bind_parameters()

