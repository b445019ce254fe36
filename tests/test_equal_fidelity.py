"""Speed at equal fidelity: which frontier setting is chosen, and drawn patterns at the measured density."""
import json
import random

import pytest
import torch

from attention_backends.base import SELECT, AttentionLayout, PoolSpec, RowSpec
from attention_backends.sparsed import SparseDBackend, SparseDConfig
from benchmarks.equal_fidelity import choose, head_table, judge, main, paper_candidate, phase_counts
from sparsed_engine.evaluation import ablations
from sparsed_engine.evaluation.drawn import DrawnDensityBackend, draw_head_densities, kept_counts

PROMPTS, LENGTHS = 200, (256, 512)
DENSE = [i % 10 != 0 for i in range(PROMPTS)]    # 90% full match


def losing(k: int) -> list[bool]:
    """Dense's outcomes with the first k of its hits turned into misses (k points of 200 = k/2 pts)."""
    hits = [i for i, x in enumerate(DENSE) if x][:k]
    return [x and i not in hits for i, x in enumerate(DENSE)]


def table(mean: float, layers=2, heads=4, seed=0):
    rng = random.Random(seed)
    return [[round(mean * rng.uniform(0.5, 1.5), 4) for _ in range(heads)] for _ in range(layers)]


def synthetic_frontier(rows) -> dict:
    """frontier.json as benchmarks/frontier.py writes it (JSON turns the lengths into strings)."""
    results = {"dense": {n: {"score": 0.9, "full_match": DENSE, "density": 1.0, "head_density": None}
                         for n in LENGTHS}}
    settings = {"dense": ["dense", None]}
    for label, backend, density, losses in rows:
        results[label] = {n: {"score": 0.9, "full_match": losing(k), "density": density,
                              "head_density": table(density, seed=n)}
                          for n, k in zip(LENGTHS, losses) if k is not None}
        settings[label] = [backend, {"skip": 0.2, "select": 0.3, "block_size": 64}]
    return json.loads(json.dumps({"results": results, "settings": settings}))


FRONTIER = [("SparseD paper: skip=0.2 select=0.3 bs=64", "sparsed", 0.30, (0, 0)),
            ("adaptive mass=0.9 bs=64", "sparsed", 0.15, (2, 1)),        # loses 1 and 0.5 pts: within
            ("select=0.1 bs=64", "sparsed", 0.10, (0, 30)),              # 15 pts at 512: a real loss
            ("select=0.2 bs=64", "sparsed", 0.12, (0, 4)),               # 2 pts on 4 discordant: undecided
            ("skip=0.0 select=0.3 bs=64", "sparsed", 0.11, (0, None)),   # never measured at 512
            ("ablation: sliding window at SparseD density, bs=64", "sparsed_window", 0.05, (0, 0))]


def test_chooses_the_sparsest_setting_within_a_point_at_every_length(tmp_path):
    path = tmp_path / "frontier.json"
    path.write_text(json.dumps(synthetic_frontier(FRONTIER)))
    cands = {c.label: c for c in judge(json.loads(path.read_text()))}
    assert {k for k, c in cands.items() if c.passed and c.eligible} == {FRONTIER[0][0], FRONTIER[1][0]}
    assert choose(list(cands.values())).label == "adaptive mass=0.9 bs=64"
    assert cands["adaptive mass=0.9 bs=64"].mean_density == pytest.approx(0.15)
    why = {k: " ".join(c.why) for k, c in cands.items()}
    assert "512: no" in why["select=0.1 bs=64"] and "512: undecided" in why["select=0.2 bs=64"]
    assert "not measured at [512]" in why["skip=0.0 select=0.3 bs=64"]
    assert "ablation" in why[FRONTIER[-1][0]] and not cands[FRONTIER[-1][0]].eligible
    assert paper_candidate(list(cands.values())).label == FRONTIER[0][0]
    n, heads = head_table(cands["adaptive mass=0.9 bs=64"])
    assert n == 512 and heads == table(0.15, seed=512)


def test_none_passing_and_the_override():
    frontier = synthetic_frontier([r for r in FRONTIER if r[0].startswith(("select", "skip"))] +
                                  [("unpaired", "sparsed", 0.01, (0, 0))])
    frontier["results"]["unpaired"]["512"]["full_match"] = DENSE[:-1]
    cands = judge(frontier)
    assert "no paired test" in " ".join(cands[-1].why) and not cands[-1].passed
    assert choose(cands) is None                     # the caller then times the paper setting
    assert choose(cands, "select=0.1 bs=64").label == "select=0.1 bs=64"   # even a failing one
    with pytest.raises(ValueError, match="not in frontier.json"):
        choose(cands, "no such setting")
    with pytest.raises(ValueError, match="no dense row"):
        judge({"results": {}, "settings": {}})
    blank = synthetic_frontier(FRONTIER[:2])         # dense solves nothing: nothing can be lost
    for cells in blank["results"].values():
        for cell in cells.values():
            cell["full_match"] = [False] * PROMPTS
    blanks = judge(blank)
    assert choose(blanks) is None and all("vacuous (dense solves 0 of 200" in " ".join(c.why) for c in blanks)


def test_schedule_counts_follow_each_settings_skip():
    ablations.register()
    paper = phase_counts("sparsed", {"skip": 0.2, "select": 0.3})
    assert (paper["dense"], paper["select"], paper["sparse"]) == (205, 1, 818)
    step0 = phase_counts("sparsed_step0", {"skip": 0.2})
    assert (step0["dense"], step0["select"], step0["sparse"]) == (0, 1, 1023)


@pytest.mark.parametrize("src_shape", [(8, 8), (6, 6), (40, 12), (3, 500)])
def test_drawn_densities_follow_the_measured_distribution(src_shape):
    L, H = src_shape
    g = torch.Generator().manual_seed(L)
    source = (torch.rand(L, H, generator=g) * torch.linspace(0.05, 0.5, L)[:, None] + 0.01).tolist()
    drawn = draw_head_densities(source, 32, 32, seed=1)
    assert len(drawn) == 32 and all(len(r) == 32 for r in drawn)
    values = [d for row in drawn for d in row]
    layer_of = {d: s for s, row in enumerate(source) for d in row}           # random floats: distinct
    counts = [values.count(d) for row in source for d in row]
    if L * H <= 1024:   # every measured head drawn equally often (up to one)
        assert max(counts) - min(counts) <= 1 and min(counts) >= 1
    else:               # fewer target heads than measured ones: each drawn at most once
        assert max(counts) == 1 and len(values) == 1024
    depth = [layer_of[d] for d in values]
    assert depth == sorted(depth)                                            # depth order kept
    src, out = torch.tensor(source).flatten(), torch.tensor(values)
    assert abs(out.mean() - src.mean()) < 0.02 * float(src.max())
    cdf = lambda x, v: (x[None, :] <= v[:, None]).double().mean(1)          # noqa: E731
    assert (cdf(out, src) - cdf(src, src)).abs().max() < 0.03               # Kolmogorov-Smirnov distance
    assert draw_head_densities(source, 32, 32, seed=1) == drawn != draw_head_densities(source, 32, 32, seed=2)


def _select(cls, cfg, q, k, v, layers):
    lay = AttentionLayout(num_layers=layers, num_heads=q.shape[1], num_kv_heads=k.shape[1],
                          head_dim=q.shape[2], scale=q.shape[2] ** -0.5)
    backend = cls(lay, "cpu", torch.float32)
    backend.init_pool(PoolSpec(num_blocks=8 * layers, block_bytes=64))
    per = 8
    meta = backend.build_metadata([RowSpec(len(q), len(q) - 40, SELECT, tuple(range(per * layers)), cfg)])
    tiles = []
    for layer in range(layers):
        backend.forward(q, k, v, meta, layer)
        tiles.append(backend.load_tiles(meta.rows[0], layer))
    return backend, tiles


def test_backend_keeps_each_heads_drawn_density_and_the_diagonal():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(300, 4, 16, generator=g) for _ in range(3))
    density = [[0.05, 0.2, 0.5, 1.0], [0.3, 0.3, 0.1, 0.7]]
    cfg = DrawnDensityBackend.resolve_config({"skip": 0.2, "block_size": 16}, {"head_density": density})
    backend, tiles = _select(DrawnDensityBackend, cfg, q, k, v, layers=2)
    nb = tiles[0].shape[-1]
    for layer, keep in enumerate(tiles):
        want = kept_counts(torch.tensor(density[layer]), nb)
        assert torch.equal(keep.sum(-1), want[:, None].expand(4, nb))       # every query block
        assert keep.diagonal(dim1=1, dim2=2).all()
        achieved = backend.achieved[layer]
        assert torch.allclose(achieved, want / nb)
        assert (achieved - torch.tensor(density[layer])).abs().max() <= 0.5 / nb + 1e-6
    # without a table it is exactly SparseD
    plain = DrawnDensityBackend.resolve_config({"skip": 0.2, "block_size": 16})
    _, ours = _select(DrawnDensityBackend, plain, q, k, v, layers=1)
    _, sparsed = _select(SparseDBackend, SparseDConfig(skip=0.2, block_size=16), q, k, v, layers=1)
    assert torch.equal(ours[0], sparsed[0])


def test_bad_density_tables_are_refused():
    for bad in ([[0.2, 0.0]], [[0.2], [0.1, 0.3]], [[1.5]], [["x"]]):
        with pytest.raises(ValueError, match="head_density"):
            DrawnDensityBackend.resolve_config({"head_density": bad})
    with pytest.raises(ValueError, match="source densities"):
        draw_head_densities([[0.2, 2.0]], 4, 4)
    cfg = DrawnDensityBackend.resolve_config({"block_size": 16, "head_density": [[0.3] * 3]})
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(64, 4, 16, generator=g) for _ in range(3))
    with pytest.raises(ValueError, match="1 layers x 3 heads"):
        _select(DrawnDensityBackend, cfg, q, k, v, layers=1)


def test_toy_run_end_to_end(tmp_path, tiny_llada_dir):
    """The whole command on CPU (the tiny LLaDA's 2 x 4 heads): the choice, the drawn patterns at
    the chosen densities, the table."""
    frontier = synthetic_frontier(FRONTIER)
    for label in frontier["settings"]:
        if label != "dense":
            frontier["settings"][label][1]["block_size"] = 16
    (tmp_path / "f.json").write_text(json.dumps(frontier))
    data = main(["--frontier", str(tmp_path / "f.json"), "--out", str(tmp_path / "out"), "--toy",
                 "--length", "160", "--model", str(tiny_llada_dir)])
    assert data["timed"] == "adaptive mass=0.9 bs=64" and data["at_equal_fidelity"]
    drawn = torch.tensor(data["drawn"])
    achieved = torch.tensor(data["times"]["drawn"]["achieved"])
    assert drawn.shape == achieved.shape == (2, 4)
    assert torch.allclose(achieved, kept_counts(drawn, 10) / 10)    # 160 tokens: 10 key blocks of 16
    assert [r["counts"]["sparse"] for r in data["rows"]] == [0, 0, 818, 818]
    md = (tmp_path / "out" / "equal_fidelity.md").read_text()
    assert "| adaptive mass=0.9 bs=64 | 0.150 | PASS |" in md and "at equal fidelity: the target" in md


def test_frontier_runs_in_parts_merge_only_on_the_same_prompts(tmp_path):
    from benchmarks.frontier import load, merge
    first, second = synthetic_frontier(FRONTIER[:2]), synthetic_frontier(FRONTIER[2:4])
    for run in (first, second):
        run["diagnostics"], run["stopped_early"] = {}, False
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    merged = merge(load(tmp_path / "a.json"), load(tmp_path / "b.json"))
    assert sorted(merged["results"]) == sorted(["dense"] + [r[0] for r in FRONTIER[:4]])
    assert set(merged["settings"]) >= {r[0] for r in FRONTIER[:4]}
    assert sorted(merged["results"]["dense"]) == list(LENGTHS)   # ints again, in length order
    assert {c.label for c in judge(merged) if c.passed} == {FRONTIER[0][0], FRONTIER[1][0]}
    other = load(tmp_path / "b.json")
    other["results"]["dense"][512]["full_match"] = losing(1)      # another set of prompts
    with pytest.raises(ValueError, match="dense @ 512 differs"):
        merge(load(tmp_path / "a.json"), other)
