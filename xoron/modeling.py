"""MoELlamaForCausalLM: the drop-in replacement for the original PyTorch module.

Everything here is argument handling; the compute happens in xoron._C.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import _C, generation
from ._safetensors_io import save_file
from . import checkpoint as _ckpt
from ._tensors import ids_array, int_array, is_torch, mask_array, output, scalar, to_numpy
from .config import LlamaConfig, engine_dict, read_config_json, resolve_config
from .generation import CACHE_FORMATS, GenerateOutput  # noqa: F401  (re-exported)

DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")


@dataclass
class CausalLMOutput:
    loss: Any = None
    logits: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None  # always None: attention weights are never materialised
    aux_loss: Any = None

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def to_tuple(self):
        return tuple(v for v in (self.loss, self.logits, self.past_key_values, self.hidden_states, self.attentions,
                                 self.aux_loss) if v is not None)


class KVCache:
    """The attention cache returned as `past_key_values`. By default it holds the compressed
    latent (kv_lora_rank values per token per layer); `cache_format="kv"` holds K and V."""

    def __init__(self, c_cache, model):
        self._c = c_cache
        self._model = model

    @property
    def length(self) -> int:
        return self._c.length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._c.length

    def __len__(self):
        return self._c.length

    @property
    def batch_size(self) -> int:
        return self._c.batch_size

    @property
    def nbytes(self) -> int:
        """Bytes of cached state held for the stored tokens (all rows, all layers)."""
        return self._c.nbytes

    @property
    def bytes_per_token(self) -> int:
        return self._c.bytes_per_token

    @property
    def format(self) -> str:
        return self._c.format

    def attention_mask(self) -> np.ndarray:
        return self._c.attention_mask()

    def __repr__(self):
        return f"KVCache(format={self.format!r}, batch={self.batch_size}, length={self.length}, nbytes={self.nbytes})"


def _parse_device(device) -> str:
    d = str(device) if device is not None else "cpu"
    if d == "cuda:0":
        return "cuda:0"
    return d


class MoELlamaForCausalLM:
    """Xoron MoE-LLaMA causal language model, computed by the xoron C engine.

    MoELlamaForCausalLM(config, moe_config=None, *, dtype="float32", device="cpu", seed=None,
                        options=None)

    `config` may be a transformers.LlamaConfig, a xoron.LlamaConfig, any object with those
    attributes, or a dict (config.json style). Weights are initialised like the original
    (normal, std 0.02; norms 1), reproducibly when `seed` is given. `options` is a dict of
    kernel and runtime choices (name -> str, int or bool; `xoron.option_names()` lists them),
    over the defaults their environment variables set.
    """

    def __init__(self, config=None, moe_config=None, *, dtype="float32", device="cpu", seed=None,
                 cache_format="latent", options=None, _init=True):
        self.config: LlamaConfig = resolve_config(config, moe_config)
        _keep_given_attributes(self.config, config)
        self._options = dict(options) if isinstance(options, dict) else options
        self._set_engine(dtype, device)
        if cache_format not in CACHE_FORMATS:
            raise ValueError(f"cache_format must be one of {sorted(CACHE_FORMATS)}, got {cache_format!r}")
        self.cache_format = cache_format
        self.training = False
        if _init:
            if seed is None:
                seed = secrets.randbits(63)
            self._engine.init_random(int(seed) & ((1 << 64) - 1))
            self._weights_changed()

    def _weights_changed(self):
        """Called once the engine holds weights (after a load or a rebuild); the torch module
        re-points its Parameters here."""

    def _set_engine(self, dtype, device):
        dtype = _dtype_name(dtype)
        device = _parse_device(device)
        self._engine = _C.Model(engine_dict(self.config), dtype, device, self._options)
        self._dtype = dtype

    # ---- construction from files ----

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device="cpu", cache_format="latent", options=None,
                        check_finite=True, torch_dtype=None, device_map=None, low_cpu_mem_usage=True,
                        local_files_only=False, trust_remote_code=False, **config_overrides):
        """Loads a checkpoint directory: config.json with model.safetensors (or its shards), or
        Xoron-Dev's layouts (`llm.`-prefixed tensors in model.safetensors, or llm.safetensors
        beside the multimodal config.json), or a pytorch_model.bin. With check_finite (the
        default) a NaN or infinity in any tensor is a ValueError naming it. `torch_dtype` is
        `dtype`'s transformers name ("auto": the checkpoint's); `device_map` names one device;
        tensors are always read one at a time with checked reads (low_cpu_mem_usage); files are only
        ever local and no code is run (local_files_only, trust_remote_code). Other keywords
        override config fields."""
        path = os.fspath(path)
        for flag in ("low_cpu_mem_usage", "local_files_only", "trust_remote_code"):
            _ckpt.check_flag(locals()[flag], flag)
        if not os.path.isdir(path):
            raise ValueError(f"{path!r} is not a checkpoint directory (xoron reads local directories only; "
                             "fetch a Hub model first, e.g. with huggingface_hub.snapshot_download)")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise ValueError(f"{path!r} is not a checkpoint: it has no config.json")
        files, kind = _ckpt.weight_files(path)
        raw = read_config_json(cfg_path)
        names = _ckpt.safetensors_names(files) if kind == "safetensors" else []
        if kind == "torch":
            tensors = _ckpt.read_torch_bin(files[0])
            names = [(n, "", tuple(getattr(v, "shape", ()))) for n, v in tensors.items()]
        _ckpt.check_not_gqa_branch((n for n, _, _ in names), path)
        if dtype is not None and torch_dtype is not None and _dtype_name(dtype) != _dtype_name(torch_dtype):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one")
        want = dtype if dtype is not None else torch_dtype
        if isinstance(want, str) and want == "auto":
            want = _ckpt.dtype_from_checkpoint(raw, names) if kind == "safetensors" else \
                _ckpt.dtype_from_checkpoint(raw, [])
        device = _ckpt.single_device(device, device_map)
        try:   # a field of the wrong kind in the file is a bad checkpoint, not a bad call
            resolve_config(raw, None, {})
        except TypeError as e:
            raise ValueError(f"{cfg_path}: {e}") from None
        config = resolve_config(raw, None, config_overrides)
        _keep_given_attributes(config, {k: v for k, v in raw.items() if k not in _ckpt.FILE_METADATA})
        prefix = _ckpt.tensor_prefix(n for n, _, _ in names)
        model = cls(config, dtype=want or "float32", device=device, cache_format=cache_format, options=options,
                    _init=False)
        if kind == "torch":
            model._engine.load_arrays(_spec_arrays(tensors, prefix, model._engine), check_finite=bool(check_finite))
        else:
            model._engine.load_safetensors(files, prefix, check_finite=bool(check_finite))
        model._weights_changed()
        return model

    def save_pretrained(self, path, *, dtype: Optional[str] = None, safe_serialization: bool = True,
                        max_shard_size="5GB") -> None:
        """Writes config.json (every field, readable by transformers.AutoConfig as a LlamaConfig)
        and the weights in float32, or `dtype`: model.safetensors, shards of at most
        max_shard_size with model.safetensors.index.json, or pytorch_model.bin when
        safe_serialization=False."""
        path = os.fspath(path)
        _ckpt.check_flag(safe_serialization, "safe_serialization")
        if dtype is not None:
            dtype = _dtype_name(dtype)
        if dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"save_pretrained dtype must be float32, bfloat16 or float16, got {dtype!r}")
        _ckpt.parse_size(max_shard_size)
        os.makedirs(path, exist_ok=True)
        sd = self._engine.state_dict()
        if dtype == "float16":
            sd = {k: v.astype(np.float16) for k, v in sd.items()}
        _ckpt.save_weights(path, sd, bfloat16=dtype == "bfloat16", safe_serialization=safe_serialization,
                           max_shard_size=max_shard_size)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(_ckpt.auto_config_dict(self.config.to_dict(), dtype or "float32"), f, indent=2)

    def state_dict(self) -> dict:
        """{SPEC name: float32 numpy array} (a copy)."""
        return self._engine.state_dict()

    def load_state_dict(self, state_dict, strict: bool = True, *, check_finite: bool = True):
        """Loads numpy arrays or torch tensors named as in SPEC section 2. Returns
        (missing_keys, unexpected_keys) like torch. With check_finite (the default) a NaN or
        infinity in any tensor is a ValueError naming it."""
        expected = {name for name, _ in self._engine.tensor_shapes()}
        given = set(state_dict)
        missing = sorted(expected - given)
        unexpected = sorted(given - expected)
        if strict and (missing or unexpected):
            raise ValueError(f"load_state_dict: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        arrays = {}
        current = self._engine.state_dict() if missing else {}
        for name in expected:
            if name in state_dict:
                a, _ = to_numpy(state_dict[name], name)
                if not np.issubdtype(a.dtype, np.floating):
                    raise ValueError(f"state_dict entry '{name}' has dtype {a.dtype}; expected floating point")
                arrays[name] = a if a.dtype == np.float16 else np.ascontiguousarray(a, dtype=np.float32)
            else:
                arrays[name] = current[name]
        self._engine.load_arrays(arrays, check_finite=bool(check_finite))
        return _IncompatibleKeys(missing, unexpected)

    # ---- introspection and compatibility ----

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def device(self) -> str:
        return self._engine.device

    @property
    def moe_config(self) -> dict:
        return self.config.moe_config

    @property
    def generation_config(self) -> "GenerationDefaults":
        """The token ids generate() falls back on (from the config unless set here)."""
        gc = self.__dict__.get("_generation_defaults")
        if gc is None:
            gc = GenerationDefaults(self.config)
            self.__dict__["_generation_defaults"] = gc
        return gc

    def num_parameters(self, only_trainable: bool = False) -> int:
        return int(sum(int(np.prod(shape)) for _, shape in self._engine.tensor_shapes()))

    def eval(self):
        self.training = False
        return self

    def train(self, mode: bool = True):
        self.training = bool(mode)  # inference engine: no dropout, nothing changes
        return self

    def requires_grad_(self, requires_grad: bool = True):
        return self

    def parameters(self):
        return iter(self.state_dict().values())

    def to(self, device=None, dtype=None):
        """Moves/casts the weights (re-creating the engine). Returns self, like torch."""
        if isinstance(device, str) and device in DTYPES or (device is not None and _is_dtype_like(device)):
            device, dtype = None, device
        self._rebuild(_parse_device(device) if device is not None else None, dtype)
        return self

    def _rebuild(self, device=None, dtype=None) -> None:
        """Re-creates the engine on `device` with weights stored as `dtype` (None: unchanged)."""
        new_device = device if device is not None else self._engine.device
        new_dtype = _dtype_name(dtype) if dtype is not None else self._dtype
        if new_device == self._engine.device and new_dtype == self._dtype:
            return
        sd = self._engine.state_dict()
        engine = _C.Model(engine_dict(self.config), new_dtype, new_device, self._options)
        engine.load_arrays(sd, check_finite=False)  # accepted when they were loaded
        self._engine, self._dtype = engine, new_dtype
        self._weights_changed()

    def float(self):
        return self.to(dtype="float32")

    def bfloat16(self):
        return self.to(dtype="bfloat16")

    def half(self):
        return self.to(dtype="float16")

    def quantize(self, dtype="int8"):
        """Re-stores the weights as `dtype` ("int8" or "int4": weight-only, one scale per group of
        32 weights of a row; or "bfloat16"/"float16"), computed with float32 accumulation. The
        router stays float32. Returns self."""
        return self.to(dtype=dtype)

    def cpu(self):
        return self.to(device="cpu")

    def cuda(self, index: int = 0):
        return self.to(device=f"cuda:{index}")

    def __repr__(self):
        c = self.config
        return (f"MoELlamaForCausalLM(layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
                f"experts={c.moe_config.get('num_experts') if c.moe_config.get('use_moe') else 0}, "
                f"params={self.num_parameters():,}, dtype={self.dtype}, device={self.device})")

    def __reduce_ex__(self, protocol):
        raise TypeError(f"{type(self).__name__} cannot be pickled (its weights live in the C engine): "
                        "use save_pretrained()/from_pretrained(), or pickle its state_dict()")

    def __deepcopy__(self, memo):
        twin = type(self)(self.config, dtype=self._dtype, device=self._engine.device, cache_format=self.cache_format,
                          options=self._options, _init=False)
        twin._engine.load_arrays(self._engine.state_dict(), check_finite=False)  # accepted when they were loaded
        twin._weights_changed()
        twin.train(self.training)
        return twin

    # ---- forward ----

    def memory_stats(self, reset_peak: bool = False) -> Optional[dict]:
        """{"in_use": bytes, "peak": bytes} of the GPU memory pool the model draws from (shared by every
        model on that device; peak: the high-water mark since the last reset_peak=True), or None on
        the CPU, whose allocations are not tracked."""
        return self._engine.memory_stats(reset_peak=bool(reset_peak))

    def new_cache(self, batch_size: int, cache_format: Optional[str] = None) -> KVCache:
        fmt = cache_format or self.cache_format
        if fmt not in CACHE_FORMATS:
            raise ValueError(f"cache_format must be one of {sorted(CACHE_FORMATS)}, got {fmt!r}")
        return KVCache(self._engine.new_cache(int(batch_size), CACHE_FORMATS[fmt]), self)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, past_key_values=None,
                use_cache=False, output_hidden_states=False, return_dict=True, inputs_embeds=None,
                output_attentions=False, logits_to_keep=0, num_logits_to_keep=None):
        """logits_to_keep=N (transformers' name; num_logits_to_keep is the older alias): the logits of the
        last N positions only, [b, N, V], the others never computed; 0 keeps every position. With
        labels the loss needs every position, so N must then be 0 or at least the sequence length."""
        if output_attentions:
            raise ValueError("output_attentions is not supported: the engine never materialises attention weights")
        torch_dev = None
        keep = _logits_to_keep(logits_to_keep, num_logits_to_keep)
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("give input_ids or inputs_embeds, not both")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("input_ids is required")
        if inputs_embeds is not None:
            emb, torch_dev = to_numpy(inputs_embeds, "inputs_embeds")
            if emb.ndim != 3:
                raise ValueError(f"inputs_embeds must be 3-D [batch, tokens, hidden], got shape {list(emb.shape)}")
            if emb.shape[0] == 0 or emb.shape[1] == 0:
                raise ValueError("inputs_embeds is empty")
            tokens = np.ascontiguousarray(emb, dtype=np.float32)
            b, t = emb.shape[:2]
        else:
            torch_dev = input_ids.device if is_torch(input_ids) else None
            tokens = self._gpu_ids(input_ids, torch_dev)
            if tokens is None:
                tokens = ids_array(input_ids)
                b, t = tokens.shape
            else:
                b, t = int(input_ids.shape[0]), int(input_ids.shape[1])
        cache = None
        if past_key_values is not None:
            if not isinstance(past_key_values, KVCache) or past_key_values._model is not self:
                raise ValueError("past_key_values must be a cache returned by this model with use_cache=True")
            cache = past_key_values
        elif use_cache:
            cache = self.new_cache(b)
        past = cache.length if cache is not None else 0

        pos = None
        if position_ids is not None:
            pos = int_array(position_ids, "position_ids")
            if pos.shape[0] == 1 and b > 1:
                pos = np.broadcast_to(pos, (b, pos.shape[1]))
            if pos.shape != (b, t):
                raise ValueError(f"position_ids has shape {list(pos.shape)}; expected {[b, t]} like input_ids")
            if pos.size and (pos.min() < -2**31 or pos.max() >= 2**31):  # the C engine names in-range misfits
                raise ValueError(f"position_ids must lie in [0, max_position_embeddings="
                                 f"{self.config.max_position_embeddings}); got values in [{pos.min()}, {pos.max()}]")
            pos = np.ascontiguousarray(pos, dtype=np.int32)
        mask = None
        if attention_mask is not None:
            mask = mask_array(attention_mask)
            if mask.shape[0] != b or mask.shape[1] not in (t, past + t):
                want = [b, t] if past == 0 else f"[{b}, {t}] or [{b}, {past + t}]"
                raise ValueError(f"attention_mask has shape {list(mask.shape)}; expected {want}")
        lab = None
        if labels is not None:
            lab = int_array(labels, "labels")
            if lab.shape != (b, t):
                raise ValueError(f"labels has shape {list(lab.shape)}; expected {[b, t]} like input_ids")
            lab = np.ascontiguousarray(lab, dtype=np.int64)
            if 0 < keep < t:
                raise ValueError(f"labels need the logits of every position, but logits_to_keep={keep} keeps "
                                 f"{keep} of {t}; pass logits_to_keep=0 to compute the loss")

        # torch tensors on this model's GPU: the logits stay there and reach torch through DLPack
        on_gpu = torch_dev is not None and lab is None and str(torch_dev).startswith("cuda") \
            and self._engine.device.startswith("cuda") and _same_cuda_device(torch_dev, self._engine.device)
        logits, hidden = self._engine.forward(tokens, positions=pos, mask=mask,
                                              cache=cache._c if cache is not None else None, logits_to_keep=keep,
                                              want_hidden=bool(output_hidden_states), device_logits=on_gpu)
        if on_gpu:
            import torch.utils.dlpack
            logits = torch.utils.dlpack.from_dlpack(logits)
        loss = None
        if lab is not None:
            loss = scalar(_C.cross_entropy(logits, lab), torch_dev)
        hs = None
        if hidden is not None:
            hs = tuple(output(h, torch_dev) for h in hidden)
        out = CausalLMOutput(loss=loss, logits=logits if on_gpu else output(logits, torch_dev),
                             past_key_values=cache if use_cache or past_key_values is not None else None,
                             hidden_states=hs, aux_loss=scalar(0.0, torch_dev))
        return out if return_dict else out.to_tuple()

    def _gpu_ids(self, ids, torch_dev):
        """torch ids already on this model's GPU as a DLPack capsule, read and checked there (no
        host copy; our stream first waits for torch's work on them), or None."""
        if torch_dev is None or not str(torch_dev).startswith("cuda") or not self._engine.device.startswith("cuda") \
                or not _same_cuda_device(torch_dev, self._engine.device):
            return None
        torch = sys.modules["torch"]
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
            return None  # the host path names the problem
        return ids.detach().contiguous().__dlpack__(stream=self._engine.cuda_stream)

    # ---- generation ----

    def generate(self, input_ids=None, **kwargs):
        """Generates after input_ids [b, t]; the decode loop runs in C. The keywords are those of
        transformers' generate() that xoron implements (README "Generation"); any other is a
        TypeError naming it."""
        return generation.generate(self, input_ids, **kwargs)

    def generate_stream(self, input_ids=None, **kwargs):
        """Yields the new token ids as they are produced (an int per step for one row, an array
        of one id per row otherwise). Takes generate()'s keyword arguments."""
        return generation.generate_stream(self, input_ids, **kwargs)


class GenerationDefaults:
    """model.generation_config: the bos/eos/pad token ids generate() uses when its call gives
    none: the model config's unless set here. Sampling settings are generate()'s keywords;
    setting one here would change nothing, so it is refused."""

    _FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")

    def __init__(self, config):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_set", {})

    def __getattr__(self, name):
        if name not in self._FIELDS:
            raise AttributeError(f"generation_config has no {name!r} (it holds {', '.join(self._FIELDS)})")
        return self._set[name] if name in self._set else getattr(self._config, name, None)

    def __setattr__(self, name, value):
        if name not in self._FIELDS:
            raise TypeError(f"generation_config holds only {', '.join(self._FIELDS)}; pass {name}= to generate()")
        self._set[name] = value

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._FIELDS}

    def to_diff_dict(self) -> dict:  # generate(generation_config=model.generation_config) reads it so
        return self.to_dict()

    def __repr__(self):
        return f"GenerationDefaults({self.to_dict()})"


class _IncompatibleKeys:
    def __init__(self, missing, unexpected):
        self.missing_keys = missing
        self.unexpected_keys = unexpected

    def __iter__(self):
        return iter((self.missing_keys, self.unexpected_keys))

    def __repr__(self):
        return f"<All keys matched successfully>" if not (self.missing_keys or self.unexpected_keys) else \
            f"_IncompatibleKeys(missing_keys={self.missing_keys}, unexpected_keys={self.unexpected_keys})"


def _same_cuda_device(torch_device, ours: str) -> bool:
    index = getattr(torch_device, "index", None)
    return (index or 0) == (int(ours.split(":")[1]) if ":" in ours else 0)


def _logits_to_keep(logits_to_keep, num_logits_to_keep) -> int:
    if num_logits_to_keep is not None:
        if logits_to_keep != 0:
            raise TypeError("give logits_to_keep or its alias num_logits_to_keep, not both")
        logits_to_keep, name = num_logits_to_keep, "num_logits_to_keep"
    else:
        name = "logits_to_keep"
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, np.integer)):
        raise TypeError(f"{name} must be an int (the number of last positions to keep); "
                        f"got {type(logits_to_keep).__name__}: a tensor of positions is not supported")
    return max(min(int(logits_to_keep), 2**31 - 1), -1)  # the C core rejects negatives; past t means all


def _is_dtype_like(x) -> bool:
    return type(x).__module__.split(".")[0] in ("torch", "numpy") and "dtype" in type(x).__name__.lower() \
        or isinstance(x, type) and issubclass(x, np.generic)


def _dtype_name(dtype) -> str:
    if dtype is None:
        return "float32"
    s = str(dtype)
    s = s.replace("torch.", "")
    aliases = {"float": "float32", "fp32": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16",
               "<class 'numpy.float32'>": "float32", "<class 'numpy.float16'>": "float16"}
    s = aliases.get(s, s)
    if s not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    return s


def _weight_files(path: str) -> list:
    return _ckpt.weight_files(path)[0]


def _tensor_prefix(files: list) -> str:
    """'llm.' for Xoron-Dev multimodal checkpoints, '' otherwise (looks through every shard)."""
    return _ckpt.tensor_prefix(n for n, _, _ in _ckpt.safetensors_names(files))


def _spec_arrays(tensors: dict, prefix: str, engine) -> dict:
    """{SPEC name: float array} out of a loaded torch state_dict (prefix stripped)."""
    out = {}
    for name, _ in engine.tensor_shapes():
        if prefix + name not in tensors:
            raise ValueError(f"checkpoint is missing tensor '{prefix}{name}'")
        a, _ = to_numpy(tensors[prefix + name], name)
        out[name] = a if a.dtype == np.float16 else np.ascontiguousarray(a, dtype=np.float32)
    return out


def _keep_given_attributes(cfg: LlamaConfig, given) -> None:
    """model.config keeps what the caller's config carried beyond the fields the engine reads
    (architectures, token ids of a tokenizer, a multimodal model's own fields, ...)."""
    if isinstance(given, dict):
        items = given.items()
    elif given is not None and hasattr(given, "__dict__"):
        items = vars(given).items()
    else:
        return
    for k, v in items:
        if isinstance(k, str) and not k.startswith("_") and not hasattr(cfg, k):
            setattr(cfg, k, v)
