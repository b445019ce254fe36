"""examples/train_long_dlm.py --init-from: the long-context fidelity model starts from a trained
checkpoint, keeps its architecture and weights, and only the context length and RoPE base change."""
import json

import pytest
import torch
from safetensors.torch import load_file

from examples import train_long_dlm
from examples.train_tiny_dlm import RowsSDPA
from model_executor.models.llada import LLaDAModelLM
from sparsed_engine.llm import DEFAULT_MODEL


def _weights(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(shard))
    return out


def test_warm_start_keeps_the_source_and_changes_only_length_and_rope(tmp_path):
    args = train_long_dlm.parser().parse_args(
        ["--out", str(tmp_path / "m"), "--device", "cpu", "--init-from", str(DEFAULT_MODEL),
         "--rope-theta-short", "80000", "--rope-theta-long", "80000", "--lr", "0"])
    train_long_dlm.apply_toy(args)   # rows of 256 / 512, a few steps
    args.steps = 1
    log = []
    out = train_long_dlm.train(args, log.append)
    source = json.loads((DEFAULT_MODEL / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config == source | {"max_sequence_length": 512, "rope_theta": 80000.0}
    assert any("warm start from" in line for line in log)
    before, after = _weights(DEFAULT_MODEL), _weights(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)   # lr 0: the steps changed nothing


def test_warm_start_refuses_another_architecture(tmp_path):
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text()) | {"n_layers": 2}
    model = LLaDAModelLM(cfg, RowsSDPA(LLaDAModelLM.attention_layout(cfg), torch.device("cpu"), torch.float32))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        train_long_dlm.warm_start(model, DEFAULT_MODEL)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        train_long_dlm.warm_start(model, tmp_path)
    args = train_long_dlm.parser().parse_args(["--out", str(tmp_path / "m"), "--init-from", str(tmp_path / "none")])
    with pytest.raises(FileNotFoundError, match=r"--init-from .*none: no config.json or tokenizer.json"):
        train_long_dlm.train(args)
