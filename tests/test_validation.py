"""The bad-input matrix (issue 10): every case fails before any work with an error naming the field
or value (ValueError, or TypeError for a wrong type, which is also a ValueError), and leaves the
engine with nothing queued; the good neighbours of each case still work."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model_executor.model_loader import load_tokenizer
from sparsed_engine import LLM, SamplingParams
from sparsed_engine.validation import InvalidTypeError

NAN, INF = math.nan, math.inf


def _refused(llm, prompt, params, needle, exc=ValueError):
    with pytest.raises(exc, match=needle):
        llm.generate(prompt, params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.get_stats()["mask_pool"]["used_blocks"] == 0


# ---------------------------------------------------------------- SamplingParams
SAMPLING_BAD = [
    # (field, value, TypeError?)
    ("temperature", NAN, False), ("temperature", INF, False), ("temperature", -INF, False),
    ("temperature", "hot", True), ("temperature", True, True),
    ("temperature", 5e-259, False), ("temperature", 1e-6, False), ("alg_temp", 1e-300, False),
    ("cfg_scale", NAN, False), ("cfg_scale", INF, False), ("cfg_scale", True, True), ("cfg_scale", 1e308, False),
    ("top_p", NAN, False), ("top_p", True, True), ("top_p", "1", True),
    ("alg_temp", NAN, False), ("alg_temp", INF, False), ("alg_temp", -1.0, False),
    ("eps", NAN, False), ("eps", 1.0, False), ("eps", True, True),
    ("max_tokens", True, True), ("max_tokens", 8.0, True), ("max_tokens", "8", True),
    ("max_tokens", None, True), ("max_tokens", -1, False),
    ("steps", True, True), ("steps", 2.0, True),
    ("block_length", True, True), ("block_length", 0, False),
    ("top_k", True, True), ("top_k", 2.5, True),
    ("seed", 2**70, False), ("seed", 2**63, False), ("seed", -1, False), ("seed", True, True),
    ("seed", 1.5, True), ("seed", "0", True),
    ("stop", 123, True), ("stop", [""], False), ("stop", [1], True), ("stop", ["ok", None], True),
    ("stop_token_ids", [True], True), ("stop_token_ids", [-1], False), ("stop_token_ids", [1.0], True),
    ("stop_token_ids", 5, True),
    ("unmasking", "", False), ("unmasking", 3, True),
    ("attention_config", "x", True), ("attention_config", [1], True),
]


@pytest.mark.parametrize("field,value,is_type", SAMPLING_BAD, ids=[f"{f}={v!r}" for f, v, _ in SAMPLING_BAD])
def test_sampling_params_strict(field, value, is_type):
    with pytest.raises(TypeError if is_type else ValueError) as e:
        SamplingParams(**{field: value})
    assert str(e.value).startswith(f"SamplingParams.{field}={value!r}")


def test_sampling_params_unknown_name_and_positional():
    with pytest.raises(TypeError, match="SamplingParams.max_token=8"):
        SamplingParams(max_token=8)
    p = SamplingParams(16, 8)  # positional, in field order
    assert (p.max_tokens, p.steps, p.block_length, p.num_blocks, p.steps_per_block) == (16, 8, 16, 1, 8)
    assert SamplingParams(temperature=1).temperature == 1.0  # an int is a fine float
    assert SamplingParams(stop="x").stop == ["x"] and SamplingParams().stop == []
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1


def test_sampling_params_immutable_and_revalidated(llada):
    p = SamplingParams(max_tokens=8, steps=4)
    with pytest.raises(AttributeError, match="immutable"):
        p.block_length = 3
    assert p.replace(steps=8).steps == 8
    with pytest.raises(ValueError, match="block_length=3"):
        p.replace(block_length=3)
    tampered = SamplingParams(max_tokens=8, steps=4)
    object.__setattr__(tampered, "block_length", 3)    # around the frozen model
    _refused(llada, "hi", tampered, "block_length=3")
    emptied = SamplingParams(max_tokens=8, steps=4, stop=["x"])
    emptied.stop.append("")                            # a list changed in place
    _refused(llada, "hi", emptied, r"stop=\['x', ''\]")
    copied = p.model_copy(update={"top_k": 0})         # pydantic's copy does not validate
    _refused(llada, "hi", copied, "top_k=0")
    _refused(llada, "hi", "not params", "must be a SamplingParams", TypeError)
    assert llada.generate("hi", p, use_tqdm=False)[0].finished


def test_dream_alg_temp_nan_refused_before_work(tiny_dream_dir):
    dream = LLM(model=str(tiny_dream_dir))
    with pytest.raises(ValueError, match="alg_temp=nan"):
        dream.generate(["a"] * 3, [SamplingParams(max_tokens=8, unmasking="entropy", alg_temp=a)
                                   for a in (0.1, 0.2)] + [SamplingParams(alg_temp=NAN, unmasking="entropy")])
    _refused(dream, "a", SamplingParams(max_tokens=8, unmasking="entropy").model_copy(update={"alg_temp": NAN}),
             "alg_temp=nan")


# ---------------------------------------------------------------- LLM / EngineConfig
ENGINE_BAD = [
    ("model", "", False), ("attention_backend", "", False), ("tokenizer", "", False), ("device", "", False),
    ("device", 3, True), ("max_model_len", True, True), ("max_model_len", 2.0, True),
    ("max_model_len", "2048", True), ("mask_pool_bytes", 1.5, True), ("mask_pool_bytes", -1, False),
    ("mask_pool_fraction", NAN, False), ("mask_pool_fraction", 0.0, False), ("mask_pool_fraction", True, True),
    ("mask_pool_block_bytes", 0, False), ("max_num_seqs", True, True), ("max_num_seqs", 0, False),
    ("max_num_batched_tokens", 1.5, True), ("dtype", torch.int8, False), ("dtype", 3, True),
    ("dtype", "", False), ("trust_remote_code", "false", True), ("trust_remote_code", "true", True),
    ("trust_remote_code", 1, True), ("trust_remote_code", None, True), ("skip_tokenizer_init", "yes", True),
    ("sequence_parallel_size", True, True), ("sequence_parallel_size", "2", True),
    ("sequence_parallel_size", 0, False), ("load_format", "", False), ("distributed_executor_backend", "", False),
    ("attention_config", '{"skip": 0.2}', True),
]


@pytest.mark.parametrize("field,value,is_type", ENGINE_BAD, ids=[f"{f}={v!r}" for f, v, _ in ENGINE_BAD])
def test_engine_options_strict(tiny_llada_dir, field, value, is_type):
    kwargs = {"model": str(tiny_llada_dir), field: value}
    with pytest.raises(TypeError if is_type else ValueError) as e:
        LLM(**kwargs)
    assert str(e.value).startswith(f"EngineConfig.{field}={value!r}")


def test_engine_unknown_option_and_good_types(tiny_llada_dir):
    with pytest.raises(TypeError, match="EngineConfig.max_num_seq=4"):
        LLM(model=str(tiny_llada_dir), max_num_seq=4)
    llm = LLM(model=Path(tiny_llada_dir), dtype=torch.float32, max_model_len=1024)
    assert llm.llm_engine.dtype == torch.float32 and llm.llm_engine.max_model_len == 1024
    with pytest.raises(AttributeError, match="immutable"):
        llm.llm_engine.config.max_model_len = 10


def test_triton_kernel_refused_on_cpu(tiny_llada_dir, llada, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="kernel'\\]='triton' needs a CUDA device, not 'cpu'"):
        LLM(model=str(tiny_llada_dir), device="cpu", attention_backend="sparsed",
            attention_config={"kernel": "triton"})
    sparse = LLM(model=str(tiny_llada_dir), device="cpu", attention_backend="sparsed")
    _refused(sparse, ["a", "b"], SamplingParams(max_tokens=8, attention_config={"kernel": "triton"}),
             "needs a CUDA device")


# ---------------------------------------------------------------- prompts
PROMPTS_BAD = [
    (None, TypeError, r"prompts=None must be a prompt or a list of prompts"),
    ([None], TypeError, r"prompts\[0\]=None must be a string"),
    (b"bytes", TypeError, r"prompts=b'bytes' must be a prompt"),
    ([b"bytes"], TypeError, r"prompts\[0\]=b'bytes' must be a string"),
    ([1.0, 2.0], TypeError, r"prompts\[0\]=1.0 must be a string"),   # a list of two bad prompts
    ([[5, True]], TypeError, r"prompts\[0\]\[1\]=True: a token id must be an int"),
    ([True, False], TypeError, r"prompts\[0\]\[0\]=True"),            # one prompt of bools
    ([[5, 6.0]], TypeError, r"prompts\[0\]\[1\]=6.0"),
    ([[5, "6"]], TypeError, r"prompts\[0\]\[1\]='6'"),
    ([[5, b"6"]], TypeError, r"prompts\[0\]\[1\]=b'6'"),
    (["ok", "ok", "ok", None], TypeError, r"prompts\[3\]=None"),
    ({"foo": [1]}, ValueError, r"prompts\[0\]: unknown keys \['foo'\]"),
    ({}, ValueError, r"prompts\[0\]: a prompt dict needs"),
    ({"prompt": 3}, TypeError, r"prompts\[0\]\['prompt'\]=3: must be a string"),
    ({"prompt_token_ids": "abc"}, TypeError, r"prompts\[0\]\['prompt_token_ids'\]: token ids must be a list"),
    ({"prompt_token_ids": [1, None]}, TypeError, r"prompt_token_ids'\]\[1\]=None"),
    (np.array([1.0, 2.0]), TypeError, r"prompts\[0\]\[0\]=.*1\.0.*must be an int"),
    ([np.zeros((2, 2), dtype=np.int64)], TypeError, "must be 1-D"),
    (7, TypeError, "prompts=7 must be a prompt or a list of prompts"),
]


@pytest.mark.parametrize("prompt,exc,needle", PROMPTS_BAD, ids=[repr(p)[:30] for p, _, _ in PROMPTS_BAD])
def test_bad_prompt_types(llada, prompt, exc, needle):
    _refused(llada, prompt, SamplingParams(max_tokens=8, steps=2), needle, exc)


def test_good_prompt_forms(llada):
    sp = SamplingParams(max_tokens=8, steps=2)
    ids = llada.get_tokenizer().encode("hello")
    forms = [ids, np.array(ids), [np.int64(t) for t in ids], tuple(ids), {"prompt_token_ids": ids},
             {"prompt": "hello"}, {"prompt": "hello", "prompt_token_ids": np.array(ids, dtype=np.int32)}]
    outs = [llada.generate(f, sp, use_tqdm=False)[0] for f in forms]
    assert all(o.prompt_token_ids == ids for o in outs)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1


def test_canvas_too_big_for_memory(tiny_llada_dir):
    llm = LLM(model=str(tiny_llada_dir), max_model_len=10**12)
    huge = SamplingParams(max_tokens=10**11, steps=1)
    _refused(llm, ["fine", "too big"], [SamplingParams(max_tokens=8, steps=2), huge],
             r"max_tokens=100000000000: a canvas of 1000000000\d\d tokens .* needs at least [\d.]+ GiB")


# ---------------------------------------------------------------- environment variables
@pytest.mark.parametrize("name,value", [
    ("SPARSED_WORKER_TIMEOUT_S", "inf"), ("SPARSED_WORKER_TIMEOUT_S", "nan"), ("SPARSED_WORKER_TIMEOUT_S", "0"),
    ("SPARSED_WORKER_TIMEOUT_S", "-1"), ("SPARSED_SDPA_BACKEND", "fastest"), ("SPARSED_ATTENTION_BACKEND", "nope"),
    ("SPARSED_FUSED_ELEMENTWISE", "yes"),
])
def test_bad_env_var_refused_at_llm(tiny_llada_dir, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        LLM(model=str(tiny_llada_dir))


def test_good_env_vars(tiny_llada_dir, monkeypatch):
    from sparsed_engine import envs
    monkeypatch.setenv("SPARSED_SDPA_BACKEND", "math")
    monkeypatch.setenv("SPARSED_WORKER_TIMEOUT_S", "2.5")
    monkeypatch.setenv("SPARSED_ATTENTION_BACKEND", "sparsed")
    llm = LLM(model=str(tiny_llada_dir))
    assert llm.llm_engine.envs == envs.Envs("sparsed", "math", True, 2.5, None)
    assert llm.get_stats()["backend"] == "sparsed"


def test_env_vars_are_listed_once():
    """Every SPARSED_* name read anywhere in the package is declared in envs.py."""
    import re
    from sparsed_engine.envs import ENV_VARS
    root = Path(__file__).resolve().parents[1]
    names = set()
    for pkg in ("sparsed_engine", "attention_backends", "model_executor"):
        for f in (root / pkg).rglob("*.py"):
            names |= set(re.findall(r'"(SPARSED_[A-Z_]+)"', f.read_text()))
    assert names <= set(ENV_VARS), names - set(ENV_VARS)


# ---------------------------------------------------------------- checkpoints
def _folder_with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("family,changes,exc,needle", [
    ("llada", dict(n_heads=0), ValueError, "n_heads=0 must be a positive integer"),
    ("llada", dict(n_heads="4"), TypeError, "n_heads='4' must be an integer"),
    ("llada", dict(n_heads=True), TypeError, "n_heads=True must be an integer"),
    ("llada", dict(d_model=64.0), TypeError, "d_model=64.0 must be an integer"),
    ("llada", dict(vocab_size=-5), ValueError, "vocab_size=-5 must be a positive integer"),
    ("llada", dict(max_sequence_length=0), ValueError, "max_sequence_length=0"),
    ("llada", dict(n_layers=0), ValueError, "n_layers=0"),
    ("llada", dict(rope_theta=NAN), ValueError, "rope_theta=nan must be a finite number"),
    ("llada", dict(rope_theta="big"), TypeError, "rope_theta='big' must be a number"),
    ("llada", dict(d_model=66), ValueError, "d_model=66 is not divisible by n_heads=4"),
    ("dream", dict(num_attention_heads=0), ValueError, "num_attention_heads=0"),
    ("dream", dict(num_key_value_heads=3), ValueError, "not a multiple of num_key_value_heads=3"),
    ("dream", dict(max_position_embeddings=-1), ValueError, "max_position_embeddings=-1"),
    ("dream", dict(intermediate_size=1.5), TypeError, "intermediate_size=1.5"),
])
def test_checkpoint_config_values(tmp_path, tiny_llada_dir, tiny_dream_dir, family, changes, exc, needle):
    src = tiny_llada_dir if family == "llada" else tiny_dream_dir
    folder = _folder_with_config(src, tmp_path / "m", **changes)
    with pytest.raises(exc, match=needle) as e:
        LLM(model=str(folder))
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", 7])
def test_shard_index_outside_folder(tmp_path, target):
    from tests.tiny_checkpoints import write_tiny_llada
    folder = write_tiny_llada(tmp_path / "m", sharded=True)
    (tmp_path / "outside.safetensors").write_bytes((folder / "model-00001-of-00002.safetensors").read_bytes())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = target
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"weight_map\[.*(lies outside the model folder|must be a file name)"):
        LLM(model=str(folder))


def test_integer_weights_refused(tmp_path, tiny_llada_dir):
    from safetensors.torch import load_file
    folder = tmp_path / "m"
    shutil.copytree(tiny_llada_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = torch.ones_like(tensors[name], dtype=torch.int32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=f"tensor {name!r} is torch.int32; model weights must be floating point"):
        LLM(model=str(folder))


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe garbage", b"[1, 2]", b'{"version": "1.0"}'])
def test_corrupt_tokenizer_json(tmp_path, tiny_llada_dir, content):
    folder = tmp_path / "m"
    shutil.copytree(tiny_llada_dir, folder)
    (folder / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match="tokenizer.json is corrupt"):
        LLM(model=str(folder))


# ---------------------------------------------------------------- remote code
def _remote_code_folder(src: Path, dst: Path, marker: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "evil_tokenizer.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "EvilTokenizer"
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def test_remote_code_runs_only_when_trusted(tmp_path, tiny_llada_dir, monkeypatch):
    import transformers.dynamic_module_utils as dmu
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    marker = tmp_path / "marker"
    folder = _remote_code_folder(tiny_llada_dir, tmp_path / "m", marker)
    llm = LLM(model=str(folder))                        # default False: the tokenizer.json fallback
    assert llm.generate("hi", SamplingParams(max_tokens=8, steps=2), use_tqdm=False)[0].finished
    LLM(model=str(folder), trust_remote_code=False)
    for value in ("false", "False", 0, "", None):
        with pytest.raises(TypeError, match="trust_remote_code"):
            LLM(model=str(folder), trust_remote_code=value)
        with pytest.raises(TypeError, match="trust_remote_code"):
            load_tokenizer(folder, value)
    assert not marker.exists()
    # the folder really would run code when trusted: the test above can fail
    load_tokenizer(folder, True)
    assert marker.read_text() == "ran"


def test_invalid_type_error_is_both():
    assert issubclass(InvalidTypeError, TypeError) and issubclass(InvalidTypeError, ValueError)
