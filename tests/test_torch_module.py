"""MoELlamaForCausalLM as a torch.nn.Module: the original's module tree, Parameters that are
the engine's weights, the calls pipelines make, and checkpoints as found in the wild
(issue 11 items 1, 2 and 5). Skips without torch."""
import copy
import json
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import xoron  # noqa: E402
from conftest import R, TOL_F32, make_model, rel_err, small_config, write_checkpoint, write_safetensors  # noqa: E402
from xoron.torch_reference import TorchMoELlama  # noqa: E402
from xoron.torch_module import MoELlamaForCausalLM  # noqa: E402

MOE = dict(use_moe=True, num_experts=4, num_experts_per_tok=2, moe_layer_freq=2)
GQA_MESSAGE = "Xoron-Dev `main` branch"


def _gpu_ok() -> bool:
    if not xoron.cuda_available():
        return False
    try:
        MoELlamaForCausalLM(small_config(), device="cuda", seed=0)
    except Exception:
        return False
    return True


def reference(config: dict, seed: int = 0) -> TorchMoELlama:
    """The PyTorch implementation of the SPEC, random weights of O(1) effect (conftest's BOOST)."""
    built = make_model(config, seed=seed)
    ref = TorchMoELlama(built.config)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in built.weights.items()}, strict=True)
    return ref.eval()


def ids_of(vocab, b, t, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, vocab, size=(b, t)))


# ---------------------------------------------------------------- item 1: the module and its weights


def test_the_exported_class_is_the_torch_module():
    assert xoron.MoELlamaForCausalLM is MoELlamaForCausalLM
    assert issubclass(MoELlamaForCausalLM, nn.Module)
    assert issubclass(MoELlamaForCausalLM, xoron.modeling.MoELlamaForCausalLM)


@pytest.mark.parametrize("cfg", [dict(MOE), dict(MOE, q_lora_rank=12, tie_word_embeddings=False)],
                         ids=["moe-tied", "moe-qlora-untied"])
def test_module_tree_and_state_dict_are_the_originals(cfg):
    """Every key of the PyTorch implementation's state_dict, plus lm_head.weight (which an nn.Module
    lists for a tied head too), with the same shapes; the tied head is the embedding's Parameter."""
    config = small_config(cfg, num_hidden_layers=4)
    m = MoELlamaForCausalLM(config, seed=0)
    ref = TorchMoELlama(config)
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    want.setdefault("lm_head.weight", want["model.embed_tokens.weight"])
    assert ours == want
    assert m.model.num_moe_layers == 2
    assert [layer.is_moe_layer for layer in m.model.layers] == [False, True, False, True]
    assert isinstance(m.model.embed_tokens, nn.Embedding)
    assert isinstance(m.model.layers[1].mlp.experts[3].up_proj, nn.Linear)
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == config["tie_word_embeddings"]
    names = [n for n, _ in m.named_parameters()]
    assert len(names) == len(set(names)) == len(want) - (1 if config["tie_word_embeddings"] else 0)
    assert all(not p.requires_grad for p in m.parameters())


def test_parameters_view_the_engines_memory():
    """gate and up are halves of one stored [2I, H] matrix; state_dict tensors share that storage."""
    m = MoELlamaForCausalLM(small_config(), seed=0)
    mlp = m.model.layers[0].mlp
    g, u = mlp.gate_proj.weight, mlp.up_proj.weight
    assert u.data_ptr() == g.data_ptr() + g.numel() * g.element_size()
    assert m.state_dict()["model.layers.0.mlp.up_proj.weight"].data_ptr() == u.data_ptr()
    sd = m._engine.state_dict()
    for name, t in m.state_dict().items():
        np.testing.assert_array_equal(t.numpy(), sd.get(name, sd["model.embed_tokens.weight"]), err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_in_place_edits_are_seen_by_the_next_forward(dtype):
    """A merged LoRA on q_proj, an edit of gate (not up), of kv_a_proj's used rows and of the tied
    head give the logits of the numpy oracle on the edited weights."""
    built = make_model(dict(MOE), seed=1, dtype=dtype)
    m = built.model
    rng = np.random.default_rng(0)
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    a = torch.from_numpy(rng.normal(0, 0.05, (4, attn.q_proj.in_features)).astype(np.float32))
    b = torch.from_numpy(rng.normal(0, 0.05, (attn.q_proj.out_features, 4)).astype(np.float32))
    with torch.no_grad():
        attn.q_proj.weight += (b @ a).to(attn.q_proj.weight.dtype)
        mlp.gate_proj.weight.mul_(1.5)
        attn.kv_a_proj.weight[:3].add_(0.1)
    m.model.embed_tokens.weight.data[5].mul_(-1.0)
    ids = built.ids(2, 7)
    edited = {k: v.detach().float().numpy() for k, v in m.state_dict().items() if k in built.weights}
    want = R.forward(built.cfg, edited, ids)[0]
    got = m(input_ids=ids).logits
    assert rel_err(got, want) <= (TOL_F32 if dtype == "float32" else 3e-2)
    assert rel_err(got, built.ref(ids)[0]) > 1e-3  # the edits did change the output


def test_parent_module_reaches_the_engine():
    """A parent's state_dict holds the LLM's tensors, its load_state_dict (strict=False too) writes
    them, and its .half()/.float()/.to() move the engine (the same Parameter objects)."""
    class Parent(nn.Module):
        def __init__(self, llm):
            super().__init__()
            self.llm = llm
            self.proj = nn.Linear(4, 4)

    llm = MoELlamaForCausalLM(small_config(MOE), seed=0)
    parent = Parent(llm)
    sd = parent.state_dict()
    assert "llm.model.layers.1.mlp.router.gate.weight" in sd and "proj.weight" in sd
    norm = llm.model.norm.weight
    ids = ids_of(97, 1, 5)
    before = llm(input_ids=ids).logits
    new = {"llm.model.norm.weight": torch.full_like(norm, 2.0)}
    missing, unexpected = parent.load_state_dict(new, strict=False)
    assert not unexpected and "proj.weight" in missing
    assert torch.equal(torch.from_numpy(llm._engine.state_dict()["model.norm.weight"]), torch.full_like(norm, 2.0))
    assert not torch.equal(llm(input_ids=ids).logits, before)
    parent.half()
    assert llm.dtype == torch.float16 and llm.model.layers[0].self_attn.o_proj.weight.dtype == torch.float16
    assert llm.model.norm.weight is norm  # re-pointed, not replaced
    parent.to(torch.float32)
    assert llm.dtype == torch.float32
    parent.to("cpu")
    assert llm.device == torch.device("cpu")
    with pytest.raises(ValueError, match="float64"):
        parent.double()


def test_assigning_a_weight_copies_and_replacing_a_module_is_refused():
    m = MoELlamaForCausalLM(small_config(), seed=0)
    attn = m.model.layers[0].self_attn
    w = torch.randn_like(attn.o_proj.weight)
    attn.o_proj.weight = nn.Parameter(w)
    assert torch.equal(attn.o_proj.weight, w)
    np.testing.assert_array_equal(m._engine.state_dict()["model.layers.0.self_attn.o_proj.weight"], w.numpy())
    with pytest.raises(TypeError, match="shape"):
        attn.o_proj.weight = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="never run"):
        attn.q_proj = nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
    with pytest.raises(TypeError, match="module tree"):
        m.model.layers[0] = nn.Identity()
    sd = {k: torch.randn_like(v) for k, v in m.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    m.load_state_dict(sd, strict=True, assign=True)  # assign=True still lands in the engine
    np.testing.assert_array_equal(m._engine.state_dict()["model.norm.weight"], sd["model.norm.weight"].numpy())


@pytest.mark.parametrize("qdtype", ["int8", "int4"])
def test_quantised_weights_are_read_only_dequantised_copies(qdtype):
    built = make_model(dict(MOE), seed=2)
    m = built.model.quantize(qdtype)
    assert m.quantization == qdtype and m.dtype == torch.float32
    sd = m.state_dict()
    eng = m._engine.state_dict()
    np.testing.assert_array_equal(sd["model.layers.0.self_attn.q_proj.weight"].numpy(),
                                  eng["model.layers.0.self_attn.q_proj.weight"])
    ids = built.ids(1, 6)
    m(input_ids=ids)
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    with pytest.raises(RuntimeError, match=f"{qdtype} model was edited"):
        m(input_ids=ids)
    # load_state_dict re-quantises, and the model runs again on what was loaded
    m.load_state_dict({k: torch.from_numpy(v) for k, v in built.weights.items()}, strict=False)
    q = xoron.modeling.MoELlamaForCausalLM(built.config, dtype=qdtype, seed=0)
    q.load_state_dict(built.weights)
    np.testing.assert_array_equal(m(input_ids=ids).logits, q(input_ids=ids).logits)


def test_state_dict_errors_are_value_and_runtime_errors():
    m = MoELlamaForCausalLM(small_config(), seed=0)
    sd = m.state_dict()
    bad = dict(sd, **{"model.norm.weight": torch.zeros(5)})
    with pytest.raises(ValueError, match="size mismatch"):
        m.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        m.load_state_dict(dict(sd, extra=torch.zeros(1)))
    with pytest.raises(ValueError, match="floating point"):
        m.load_state_dict(dict(sd, **{"model.norm.weight": torch.zeros(32, dtype=torch.int64)}))


# ---------------------------------------------------------------- item 2: what pipelines call


def test_embeddings_and_heads():
    m = MoELlamaForCausalLM(small_config(MOE), seed=0)
    ids = ids_of(97, 2, 5)
    emb = m.model.embed_tokens(ids)
    assert torch.equal(emb, m.model.embed_tokens.weight[ids])
    assert m.get_input_embeddings() is m.model.embed_tokens and m.get_output_embeddings() is m.lm_head
    np.testing.assert_allclose(m(inputs_embeds=emb).logits, m(input_ids=ids).logits, rtol=0, atol=1e-6)
    table = nn.Embedding(97, 32)
    m.set_input_embeddings(table)
    assert torch.equal(m.model.embed_tokens.weight, table.weight) and m.lm_head.weight is m.model.embed_tokens.weight
    np.testing.assert_array_equal(m._engine.state_dict()["model.embed_tokens.weight"], table.weight.detach().numpy())
    m.tie_weights()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    with pytest.raises(ValueError, match="nn.Embedding"):
        m.set_input_embeddings(torch.zeros(97, 3))


@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings(tied):
    m = MoELlamaForCausalLM(small_config(tie_word_embeddings=tied), seed=0)
    old = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(0)
    out = m.resize_token_embeddings(300)
    assert out is m.get_input_embeddings() and out.weight.shape == (300, 32) and m.config.vocab_size == 300
    assert torch.equal(m.model.embed_tokens.weight[:97], old["model.embed_tokens.weight"])
    assert torch.equal(m.lm_head.weight[:97], old["lm_head.weight"])
    assert torch.equal(m.model.norm.weight, old["model.norm.weight"])
    new_rows = m.model.embed_tokens.weight[97:]
    assert 0.015 < float(new_rows.std()) < 0.025 and abs(float(new_rows.mean())) < 0.005
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tied
    assert m(input_ids=torch.tensor([[299, 1]])).logits.shape == (1, 2, 300)
    m.resize_token_embeddings(50, pad_to_multiple_of=64)
    assert m.config.vocab_size == 64 and torch.equal(m.model.embed_tokens.weight[:50], old["model.embed_tokens.weight"][:50])
    with pytest.raises(TypeError, match="mean_resizing"):
        m.resize_token_embeddings(100, mean_resizing=True)
    with pytest.raises(ValueError, match="positive"):
        m.resize_token_embeddings(0)


def test_inner_layers_say_the_model_runs_as_a_whole():
    m = MoELlamaForCausalLM(small_config(MOE), seed=0)
    x = torch.zeros(1, 2, 32)
    for mod in (m.model.layers[0], m.model.layers[1].mlp, m.model.layers[0].self_attn, m.model.norm, m.model):
        with pytest.raises(NotImplementedError, match="as a whole"):
            mod(x)
    q = m.model.layers[0].self_attn.q_proj
    assert torch.equal(q(x), x @ q.weight.T)  # a linear layer does have its forward


def test_device_dtype_config_and_copies():
    class Cfg:  # a config object with more than the engine reads
        vocab_size, hidden_size, intermediate_size, num_hidden_layers = 97, 32, 48, 2
        num_attention_heads, num_key_value_heads, kv_lora_rank = 4, 4, 16

        def __init__(self):
            self.use_flash_attention = True
            self.architectures = ["XoronMultimodal"]

    m = MoELlamaForCausalLM(Cfg(), dict(MOE, intermediate_size=40), seed=0)
    assert m.device == torch.device("cpu") and m.dtype == torch.float32
    assert m.config.use_flash_attention is True and m.config.architectures == ["XoronMultimodal"]
    assert m.moe_config == m.config.moe_config and m.moe_config["num_experts"] == 4
    gc = m.generation_config
    assert gc.eos_token_id == m.config.eos_token_id
    numpy_model = xoron.modeling.MoELlamaForCausalLM(small_config(), seed=0)
    assert numpy_model.device == "cpu" and numpy_model.dtype == "float32"
    with pytest.raises(TypeError, match="save_pretrained"):
        pickle.dumps(m)
    with pytest.raises(TypeError, match="save_pretrained"):
        pickle.dumps(numpy_model)
    twin = copy.deepcopy(m)
    assert isinstance(twin, MoELlamaForCausalLM) and twin.config.use_flash_attention is True
    ids = ids_of(97, 1, 4)
    assert torch.equal(twin(input_ids=ids).logits, m(input_ids=ids).logits)
    with torch.no_grad():
        twin.model.norm.weight.mul_(3.0)
    assert not torch.equal(twin.model.norm.weight, m.model.norm.weight)  # its own weights


# ---------------------------------------------------------------- item 5: checkpoints in the wild


class _Pipeline(nn.Module):
    """The multimodal pattern: the LLM inside a parent with parameters of its own, which embeds
    text itself through llm.model.embed_tokens and runs the LLM on embeddings."""

    def __init__(self, llm, hidden):
        super().__init__()
        self.llm = llm
        self.image_start = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.projector = nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask, labels):
        embeds = self.llm.model.embed_tokens(input_ids)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)


@pytest.mark.parametrize("with_head", [True, False], ids=["lm_head-in-checkpoint", "spec-layout"])
def test_pipeline_parent_checkpoint_from_the_reference(tmp_path, with_head):
    """A parent checkpoint saved from the PyTorch implementation loads with strict=True; logits
    and loss (float mask with padding, labels with a -100 prefix) match it within 1e-4."""
    config = small_config(MOE, num_hidden_layers=3)
    ref_parent = _Pipeline(reference(config, seed=4), 32)
    ours = _Pipeline(MoELlamaForCausalLM(config, seed=9), 32)
    sd = ref_parent.state_dict()
    if with_head:  # what the original's nn.Module state_dict carries for its tied head
        sd["llm.lm_head.weight"] = sd["llm.model.embed_tokens.weight"].clone()
    torch.save(sd, tmp_path / "parent.pt")
    ours.load_state_dict(torch.load(tmp_path / "parent.pt", weights_only=True), strict=True)
    assert torch.equal(ours.projector.weight, ref_parent.projector.weight)

    ids = ids_of(97, 2, 9, seed=3)
    mask = torch.ones(2, 9)
    mask[1, :3] = 0.0
    labels = ids.clone()
    labels[:, :4] = -100
    out = ours(ids, mask, labels)
    with torch.no_grad():
        ref_loss, ref_logits, _ = ref_parent.llm(ids, attention_mask=mask, labels=labels)
    assert rel_err(out.logits, ref_logits) <= TOL_F32
    assert abs(float(out.loss) - float(ref_loss)) <= TOL_F32


def test_tied_head_must_equal_the_embedding():
    m = MoELlamaForCausalLM(small_config(), seed=0)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="differs from model.embed_tokens.weight"):
        m.load_state_dict(sd, strict=True)


def _xoron_dev_config(config: dict) -> dict:
    """The multimodal config.json of Xoron-Dev (num_layers, num_heads, flat MoE fields)."""
    moe = config["moe_config"]
    return {"vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
            "intermediate_size": config["intermediate_size"], "num_layers": config["num_hidden_layers"],
            "num_heads": config["num_attention_heads"], "kv_lora_rank": config["kv_lora_rank"],
            "use_moe": moe["use_moe"], "num_experts": moe["num_experts"],
            "num_experts_per_tok": moe["num_experts_per_tok"], "moe_layer_freq": moe["moe_layer_freq"],
            "vision_model_name": "google/siglip-so400m-patch14-384", "use_sliding_window": True}


@pytest.mark.parametrize("prefix", ["", "llm."])
def test_from_pretrained_reads_xoron_devs_separate_llm_file(tmp_path, prefix):
    built = make_model(dict(MOE, intermediate_size=40), seed=3)
    config = _xoron_dev_config(built.config)
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    write_safetensors(d / "llm.safetensors", {prefix + k: v for k, v in built.weights.items()})
    write_safetensors(d / "vision_encoder.safetensors", {"vision.proj.weight": np.zeros((2, 2), np.float32)})
    m = MoELlamaForCausalLM.from_pretrained(d)
    assert m.config.vision_model_name == config["vision_model_name"]  # the multimodal fields are kept
    ids = built.ids(1, 6)
    assert rel_err(m(input_ids=ids).logits, built.ref(ids)[0]) <= TOL_F32


def test_from_pretrained_keywords(tmp_path):
    built = make_model(dict(MOE), seed=3)
    d = write_checkpoint(tmp_path / "bf16", built.config, built.weights, dtypes={k: "BF16" for k in built.weights})
    assert MoELlamaForCausalLM.from_pretrained(d, torch_dtype="auto").dtype == torch.bfloat16
    assert MoELlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float16, low_cpu_mem_usage=True,
                                               local_files_only=True, trust_remote_code=False).dtype == torch.float16
    assert MoELlamaForCausalLM.from_pretrained(d, device_map="cpu").device == torch.device("cpu")
    assert MoELlamaForCausalLM.from_pretrained(d, device_map={"": "cpu"}).device == torch.device("cpu")
    if not _gpu_ok():
        assert MoELlamaForCausalLM.from_pretrained(d, device_map="auto").device == torch.device("cpu")
    with pytest.raises(ValueError, match="one device"):
        MoELlamaForCausalLM.from_pretrained(d, device_map={"model": "cuda:0", "lm_head": "cuda:1"})
    with pytest.raises(ValueError, match="one device"):
        MoELlamaForCausalLM.from_pretrained(d, device_map="balanced")
    with pytest.raises(ValueError, match="disagree"):
        MoELlamaForCausalLM.from_pretrained(d, dtype="float32", torch_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="low_cpu_mem_usage"):
        MoELlamaForCausalLM.from_pretrained(d, low_cpu_mem_usage="yes")
    with pytest.raises(ValueError, match="local directories"):
        MoELlamaForCausalLM.from_pretrained("Xoron/some-model-on-the-hub")
    with pytest.raises(ValueError, match="unknown config field 'revison'"):
        MoELlamaForCausalLM.from_pretrained(d, revison="main")


def test_the_gqa_branch_is_named_in_the_error(tmp_path):
    """Xoron-Dev main's LLM: q/k/v/o projections (GQA), sliding window."""
    config = small_config(num_key_value_heads=1)
    tensors = {"model.embed_tokens.weight": np.zeros((97, 32), np.float32)}
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        tensors[f"model.layers.0.self_attn.{p}.weight"] = np.zeros((32, 32), np.float32)
    d = write_checkpoint(tmp_path / "gqa", dict(config, sliding_window=4096), tensors)
    with pytest.raises(ValueError, match=GQA_MESSAGE):
        MoELlamaForCausalLM.from_pretrained(d)
    with pytest.raises(ValueError, match=GQA_MESSAGE):
        MoELlamaForCausalLM(config, seed=0).load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})


def test_save_pretrained_shards_and_torch_bin_round_trip(tmp_path):
    m = MoELlamaForCausalLM(small_config(MOE), seed=5)
    ids = ids_of(97, 1, 5)
    want = m(input_ids=ids).logits
    m.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    files = sorted(os.listdir(tmp_path / "sharded"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {n for n, _ in m._engine.tensor_shapes()}
    assert torch.equal(MoELlamaForCausalLM.from_pretrained(tmp_path / "sharded")(input_ids=ids).logits, want)
    m.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert os.path.exists(tmp_path / "bin" / "pytorch_model.bin")
    assert torch.equal(MoELlamaForCausalLM.from_pretrained(tmp_path / "bin")(input_ids=ids).logits, want)
    cfg = json.loads((tmp_path / "bin" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["torch_dtype"] == "float32" and cfg["moe_config"]["use_moe"]
    for bad in ("lots", 0, "-5GB", True):
        with pytest.raises(ValueError, match="max_shard_size"):
            m.save_pretrained(tmp_path / "bad", max_shard_size=bad)
    with pytest.raises(TypeError, match="safe_serialization"):
        m.save_pretrained(tmp_path / "bad", safe_serialization="no")


def test_saved_config_is_read_by_transformers_auto_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    m = MoELlamaForCausalLM(small_config(MOE), seed=5)
    m.save_pretrained(tmp_path / "ckpt", dtype="bfloat16")
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "ckpt")
    assert isinstance(cfg, transformers.LlamaConfig)
    assert cfg.num_hidden_layers == 2 and cfg.kv_lora_rank == 16 and cfg.moe_config["num_experts"] == 4
    again = MoELlamaForCausalLM(cfg, seed=0)  # and the engine reads that config object back
    assert again.config.moe_config == m.config.moe_config and again.config.kv_lora_rank == 16
    assert again.config.num_key_value_heads == m.config.num_key_value_heads


# ---------------------------------------------------------------- on the GPU


@pytest.mark.cuda
@pytest.mark.skipif(not _gpu_ok(), reason="no usable CUDA device")
def test_cuda_parameters_are_device_memory_and_edits_are_seen():
    built = make_model(dict(MOE), seed=1)
    m = built.model
    parent = nn.ModuleDict({"llm": m})
    parent.cuda()
    assert m.device.type == "cuda" and m.model.norm.weight.device.type == "cuda"
    ids = built.ids(1, 6)
    assert rel_err(m(input_ids=ids).logits, built.ref(ids)[0]) <= TOL_F32
    with torch.no_grad():
        m.model.layers[0].mlp.gate_proj.weight.mul_(1.5)
    edited = {k: v.detach().float().cpu().numpy() for k, v in m.state_dict().items() if k in built.weights}
    assert rel_err(m(input_ids=ids).logits, R.forward(built.cfg, edited, ids)[0]) <= TOL_F32
    parent.bfloat16()
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert m.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    parent.cpu()
    assert m.device == torch.device("cpu")
