"""Multi-LoRA op: every backend equals the plain reference (hypothesis over shapes, ranks, mixes)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.kernels import BACKENDS, AdapterWeights, apply_lora, available_backends, backend_unavailable, make_meta

CUDA = torch.cuda.is_available()
# torch.nn.functional.grouped_mm is newer than the oldest torch the project takes (2.6)
HAS_GROUPED_MM = hasattr(torch.nn.functional, "grouped_mm")
GROUPED_MM = pytest.param("grouped_mm", marks=pytest.mark.skipif(
    not HAS_GROUPED_MM, reason=f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"))
TRITON_OK = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
try:
    import triton  # noqa: F401
except ImportError:
    TRITON_OK = False


@st.composite
def problems(draw, max_tokens=40):
    e = draw(st.integers(1, 6))
    ranks = draw(st.lists(st.integers(1, 12), min_size=e, max_size=e))
    d_in, d_out = draw(st.sampled_from([8, 24, 64])), draw(st.sampled_from([8, 40, 64]))
    t = draw(st.integers(0, max_tokens))
    k = draw(st.integers(1, 3))
    # adapters that no token uses, tokens with no adapter (-1) and zero weights all occur
    used = draw(st.lists(st.integers(0, e - 1), min_size=1, max_size=e, unique=True))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor(used + [-1])
    idx = choices[torch.randint(0, len(choices), (t, k), generator=g)]
    w = torch.rand(t, k, generator=g)
    w[torch.rand(t, k, generator=g) < 0.1] = 0
    wts = AdapterWeights([torch.randn(r, d_in, generator=g) * 0.2 for r in ranks],
                         [torch.randn(d_out, r, generator=g) * 0.2 for r in ranks], torch.rand(e, generator=g) + 0.5)
    # magnitudes below ~1, where bf16's spacing (<= 2**-8) leaves the 2e-2 tolerance meaningful
    x = torch.randn(t, d_in, generator=g) * 0.5
    y0 = torch.randn(t, d_out, generator=g) * 0.25
    return wts, idx, w, x, y0


def _run(backend, wts, idx, w, x, y0, dtype=torch.float32, device="cpu", block=None):
    cast = lambda t: t.to(device=device, dtype=dtype)
    wts = AdapterWeights([cast(a) for a in wts.a], [cast(b) for b in wts.b], wts.scale.to(device))
    meta = make_meta(idx.to(device), w.to(device), wts.num_adapters, block=block)
    y = cast(y0).clone()
    apply_lora(y, cast(x), wts, meta, backend)
    return y.float().cpu()


def _expected(p, dtype=torch.float32):
    return _run("reference", *p, dtype=dtype)


@pytest.mark.parametrize("backend", ["cpu", "cpu_grouped", "cpu_dense", GROUPED_MM, "cpu_bmm"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_backend_equals_reference_fp32(backend, p):
    torch.testing.assert_close(_run(backend, *p), _expected(p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "cpu_grouped", "cpu_dense", GROUPED_MM])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_backend_equals_reference_bf16(backend, p):
    bf = torch.bfloat16  # the reference on the same bf16 inputs (it accumulates in fp32)
    torch.testing.assert_close(_run(backend, *p, dtype=bf), _expected(p, dtype=bf), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not TRITON_OK, reason="triton needs CUDA (or TRITON_INTERPRET=1 on CPU)")
@settings(max_examples=25 if CUDA else 12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems(max_tokens=24))
def test_triton_equals_reference(p):
    dev = "cuda" if CUDA else "cpu"
    torch.testing.assert_close(_run("triton", *p, device=dev), _expected(p), rtol=1e-5, atol=1e-5)
    if CUDA:  # bf16 is a GPU dtype for these kernels
        bf = torch.bfloat16
        torch.testing.assert_close(_run("triton", *p, dtype=bf, device=dev), _expected(p, dtype=bf), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["cpu_bmm", "cpu", "cpu_grouped", "cpu_dense", GROUPED_MM])
@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 6), s=st.integers(1, 9), e=st.integers(1, 5), equal=st.booleans(), seed=st.integers(0, 10**6))
def test_one_adapter_per_sequence(backend, b, s, e, equal, seed):
    """The serving layout: B sequences of S tokens, one adapter (and weight) per sequence;
    equal ranks take the batched-matmul path of `cpu`, mixed ranks its grouped path."""
    g = torch.Generator().manual_seed(seed)
    ranks = [3] * e if equal else torch.randint(1, 9, (e,), generator=g).tolist()
    wts = AdapterWeights([torch.randn(r, 16, generator=g) for r in ranks], [torch.randn(24, r, generator=g) for r in ranks],
                         torch.rand(e, generator=g))
    per_seq = torch.randint(-1, e, (b,), generator=g)
    w = torch.rand(b, generator=g)
    idx, wt = per_seq.repeat_interleave(s), w.repeat_interleave(s)
    x, y0 = torch.randn(b * s, 16, generator=g), torch.randn(b * s, 24, generator=g)
    p = (wts, idx[:, None], wt[:, None], x, y0)
    torch.testing.assert_close(_run(backend, *p), _expected(p), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_run(backend, *p, block=s), _expected(p), rtol=1e-5, atol=1e-5)
    if backend == "cpu":  # tiny problems go dense; force its batched-matmul and grouped choices too
        from unittest import mock

        import workbench.kernels.multi_lora as ml

        with mock.patch.object(ml, "DENSE_MAX_TOKEN_RANKS", 0):
            torch.testing.assert_close(_run(backend, *p, block=s), _expected(p), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(_run(backend, *p), _expected(p), rtol=1e-5, atol=1e-5)


def _runs_of_one(tokens: list[int]) -> bool:
    """Whether `tokens` (one adapter's, in pair order) are consecutive, each once: one contiguous block."""
    return tokens == list(range(tokens[0], tokens[0] + len(tokens)))


def test_meta_is_shared_and_contiguous_blocks(pool, tiny_dir, monkeypatch):
    idx = torch.tensor([0, 0, 0, 2, 2, 1, -1])
    meta = make_meta(idx, None, 3)
    assert meta.active == [0, 1, 2] and meta.counts == [3, 1, 2] and meta.offsets == [0, 3, 4, 6]
    assert meta.contiguous == {0: (0, 3), 1: (5, 6), 2: (3, 5)}
    mixed = make_meta(torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0.5, 0.5], [0.9, 0.1]]), 2)
    assert mixed.contiguous == {0: (0, 2), 1: (0, 2)}
    # not contiguous: a gap, a token twice, a zero weight that drops a pair from the middle
    assert make_meta(torch.tensor([0, 1, 0]), None, 2).contiguous == {1: (1, 2)}
    assert make_meta(torch.tensor([[0, 0], [1, -1]]), None, 2).contiguous == {1: (1, 2)}
    assert make_meta(torch.tensor([0, 0, 0]), torch.tensor([1.0, 0.0, 1.0]), 1).contiguous == {}
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # every block found is one, and every block is found
        ix = torch.randint(-1, 3, (int(torch.randint(1, 9, (1,), generator=g)), 2), generator=g)
        m = make_meta(ix, None, 3)
        want = {}
        for e in m.active:
            toks = m.token_idx[m.offsets[e]:m.offsets[e + 1]].tolist()
            assert sorted(toks) == sorted(t for t in range(ix.shape[0]) for j in range(2) if ix[t, j] == e)
            if _runs_of_one(toks):
                want[e] = (toks[0], toks[-1] + 1)
        assert m.contiguous == want, ix
    with pytest.raises(ValueError, match="out of range"):
        make_meta(torch.tensor([3]), None, 3)

    # shared: one make_meta per batch shape, the same object handed to every adapted layer
    import workbench.modules.routed_lora as routed_mod
    import workbench.serving.engine as engine_mod

    pool.add(tiny_dir / "lora_a", "a")
    pool.add(tiny_dir / "lora_b", "b")
    eng = engine_mod.MultiLoraModel.from_pool(pool, include_artifacts=False)
    built, seen = [], []
    real_make, real_apply = engine_mod.make_meta, routed_mod.apply_lora
    monkeypatch.setattr(engine_mod, "make_meta", lambda *a, **k: built.append(1) or real_make(*a, **k))
    monkeypatch.setattr(routed_mod, "apply_lora", lambda y, x, w, meta, b=None: seen.append(meta) or real_apply(y, x, w, meta, b))
    layers = sum(isinstance(m, routed_mod.RoutedLoraLinear) for m in eng.model.modules())
    assert layers > 1
    eng.forward(torch.randint(5, 90, (3, 6)), assignments=[eng.resolve("a"), eng.resolve("b"), eng.resolve("mix:a=0.5,b=0.5")])
    assert len(built) == 1 and len(seen) == layers and len({id(m) for m in seen}) == 1
    built.clear()
    seen.clear()
    steps = 5  # a prefill and 4 decode steps: one meta for the prefill, one reused by every decode step
    eng.generate([[5, 6, 7], [8, 9]], [eng.resolve("a"), eng.resolve("b")], steps, stop_ids=set())
    assert len(built) == 2 and len(seen) == layers * steps and len({id(m) for m in seen}) == 2


def test_backends_registered():
    assert {"reference", "cpu", "grouped_mm"} <= set(BACKENDS.names())
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match=r"unknown kernel backend 'cuda'; known: "):
        BACKENDS.get("cuda")


def test_grouped_mm_unavailable_without_torch_support(monkeypatch):
    """On a torch without torch.nn.functional.grouped_mm the backend says so, and choosing it is a clear error."""
    from workbench.errors import WorkbenchError

    assert ("grouped_mm" in available_backends()) == HAS_GROUPED_MM
    monkeypatch.delattr(torch.nn.functional, "grouped_mm", raising=False)
    assert "grouped_mm" not in available_backends() and "cpu" in available_backends()
    assert "torch.nn.functional.grouped_mm" in backend_unavailable("grouped_mm")
    wts = AdapterWeights([torch.ones(2, 4)], [torch.ones(3, 2)], torch.ones(1))
    y = torch.zeros(2, 3)
    with pytest.raises(WorkbenchError, match=r"^kernel backend 'grouped_mm' needs torch.nn.functional.grouped_mm, "
                                             r"which torch .* lacks; use one of: .*cpu"):
        apply_lora(y, torch.ones(2, 4), wts, make_meta(torch.tensor([0, -1]), None, 1), "grouped_mm")
    assert not y.any()


def test_bench_kernels_runs_on_a_tiny_model(tiny_dir, tmp_path):
    """The benchmark's own correctness column: every backend agrees with PEFT's mixed batch."""
    import json

    from workbench.bench.kernels import run

    out = tmp_path / "k.json"
    rec = run(str(tiny_dir / "base"), ranks=(2,), us=(1, 3), seqs=6, tokens=8, reps=1, backends=("cpu", "cpu_bmm"),
              out_file=out, log=lambda *a: None)
    assert json.loads(out.read_text())["rows"] == rec["rows"] and len(rec["rows"]) == 2
    for row in rec["rows"]:
        assert row["base_s"] > 0 and row["ours_cpu_x_base"] > 0 and row["peft_mixed_x_base"] > 0
        assert row["max_abs_diff_vs_peft_cpu"] < 1e-4 and row["max_abs_diff_vs_peft_cpu_bmm"] < 1e-4
