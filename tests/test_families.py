"""Model families come from the entry-point group `sparsed_engine.models`: built-ins and third parties."""
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from model_executor.denoisers import DreamDenoiser, LLaDADenoiser
from model_executor.families import get_family, installed_families
from model_executor.models import DreamModel, LLaDAModelLM
from sparsed_engine import LLM, SamplingParams
from tests.tiny_checkpoints import write_tiny_llada

ENGINE = Path(__file__).resolve().parents[1] / "sparsed_engine"


def test_builtins_registered_through_entry_points():
    fams = installed_families()
    assert {"llada", "dream"} <= set(fams)
    assert fams["llada"].model_class is LLaDAModelLM and isinstance(fams["llada"].denoiser, LLaDADenoiser)
    assert fams["dream"].model_class is DreamModel and isinstance(fams["dream"].denoiser, DreamDenoiser)
    assert DreamModel.logits_shift == DreamDenoiser.logits_shift == 1   # the denoiser owns the shift
    with pytest.raises(ValueError, match="unknown model family 'nope'; installed: .*dream.*llada"):
        get_family("nope")


def test_engine_never_names_a_family():
    for path in ENGINE.rglob("*.py"):
        src = path.read_text()
        assert not re.search(r"""["'](llada|dream)["']""", src), path
        if path.name != "sampling_params.py":   # policy names come from the denoisers alone
            assert "LLADA_POLICIES" not in src and "DREAM_POLICIES" not in src, path


def test_policy_validation_names_the_value(tiny_llada_dir, tiny_dream_dir):
    dream = LLM(model=str(tiny_dream_dir))
    with pytest.raises(ValueError, match=r"SamplingParams.alg_temp=inf: "):
        dream.generate("hi", SamplingParams(max_tokens=8, unmasking="maskgit_plus", alg_temp=float("inf")),
                       use_tqdm=False)
    llada = LLM(model=str(tiny_llada_dir))
    with pytest.raises(ValueError, match=r"SamplingParams.alg_temp=0.5 applies to Dream models only"):
        llada.generate("hi", SamplingParams(max_tokens=8, alg_temp=0.5), use_tqdm=False)
    assert not llada.llm_engine.has_unfinished_requests()


def test_default_policy_from_generation_config(tmp_path, tiny_llada_dir):
    folder = write_tiny_llada(tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"remasking": "random"}))
    p = SamplingParams(max_tokens=8, steps=4)
    assert LLM(model=str(folder)).llm_engine.make_sequence("hi", p).policy == "random"
    (folder / "generation_config.json").write_text(json.dumps({"remasking": "greedy"}))
    with pytest.raises(ValueError, match="generation_config.json remasking='greedy' is not a llada policy"):
        LLM(model=str(folder)).generate("hi", p, use_tqdm=False)


_TOY = """
import torch

from model_executor.denoisers.base import Denoiser
from model_executor.models.base import ModelFamily
from model_executor.models.llada import LLaDAModelLM


class LeftToRight(Denoiser):
    '''Commits the leftmost masked position of the block, greedily, one per step.'''
    name = "toy"
    policies = ("left_to_right",)
    policy_key = "toy_policy"
    default_policy = "left_to_right"
    calls = 0

    def transfer(self, num_masked, step_in_block, params):
        return (1 if num_masked else 0), 0.0

    def unmask(self, logits, s, gen):
        type(self).calls += 1
        idx = torch.arange(s.num_transfer, device=logits.device)
        return idx, logits[idx].argmax(-1)


class ToyLM(LLaDAModelLM):
    pass


FAMILY = ModelFamily("toy", ToyLM, LeftToRight(), architectures=("ToyLM",), model_types=("toy",))
"""


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    """A throwaway installed distribution: its own dist-info with an entry point, on sys.path."""
    (tmp_path / "toy_family.py").write_text(textwrap.dedent(_TOY))
    info = tmp_path / "toy_family-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-family\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[sparsed_engine.models]\ntoy = toy_family:FAMILY\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("toy_family", None)


def test_third_party_family_generates(toy_family, tmp_path):
    folder = write_tiny_llada(tmp_path / "toy_model")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["ToyLM"], "model_type": "toy"}))
    llm = LLM(model=str(folder))
    eng = llm.llm_engine
    assert eng.info.family == "toy" and type(eng.executor.worker.model).__name__ == "ToyLM"
    seq = eng.make_sequence("Hello", SamplingParams(max_tokens=8, steps=8))
    eng.add_sequence(seq)
    mask, masks = eng.info.mask_token_id, []
    while eng.has_unfinished_requests():
        eng.step()
        masks.append((seq.canvas[seq.prompt_len:] == mask).tolist())
    # left to right, one per step
    assert masks == [[False] * (i + 1) + [True] * (7 - i) for i in range(8)]
    assert type(eng.denoiser).calls == 8
    with pytest.raises(ValueError, match=r"SamplingParams.unmasking='random' is not a toy policy; "
                                         r"choose from \('left_to_right',\)"):
        llm.generate("Hello", SamplingParams(max_tokens=8, unmasking="random"), use_tqdm=False)


def test_bad_entry_point_is_named(tmp_path, monkeypatch):
    (tmp_path / "bad_family.py").write_text("FAMILY = object()\n")
    info = tmp_path / "bad_family-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-family\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[sparsed_engine.models]\nbad = bad_family:FAMILY\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TypeError, match="entry point 'bad' .*bad_family:FAMILY.* is not a ModelFamily"):
        installed_families()
    sys.modules.pop("bad_family", None)


def test_no_registered_family_says_how_to_install(monkeypatch):
    import model_executor.families as fam
    monkeypatch.setattr(fam, "entry_points", lambda group: [])
    with pytest.raises(ValueError, match="no model families are registered.*pip install -e"):
        fam.resolve_family({"architectures": ["LLaDAModelLM"]})
