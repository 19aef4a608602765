"""Multi-LoRA op: every backend equals the plain reference (hypothesis over shapes, ranks, mixes)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.kernels import BACKENDS, AdapterWeights, apply_lora, make_meta

CUDA = torch.cuda.is_available()
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


@pytest.mark.parametrize("backend", ["cpu", "cpu_grouped", "cpu_dense", "grouped_mm", "cpu_bmm"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=problems())
def test_backend_equals_reference_fp32(backend, p):
    torch.testing.assert_close(_run(backend, *p), _expected(p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "cpu_grouped", "cpu_dense", "grouped_mm"])
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


@pytest.mark.parametrize("backend", ["cpu_bmm", "cpu", "cpu_grouped", "cpu_dense", "grouped_mm"])
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


def test_meta_is_shared_and_contiguous_blocks():
    idx = torch.tensor([0, 0, 0, 2, 2, 1, -1])
    meta = make_meta(idx, None, 3)
    assert meta.active == [0, 1, 2] and meta.counts == [3, 1, 2] and meta.offsets == [0, 3, 4, 6]
    assert meta.contiguous == {0: (0, 3), 1: (5, 6), 2: (3, 5)}
    mixed = make_meta(torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0.5, 0.5], [0.9, 0.1]]), 2)
    assert mixed.contiguous == {} or all(e in (0, 1) for e in mixed.contiguous)
    with pytest.raises(ValueError, match="out of range"):
        make_meta(torch.tensor([3]), None, 3)


def test_backends_registered():
    assert {"reference", "cpu", "grouped_mm"} <= set(BACKENDS.names())
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match=r"unknown kernel backend 'cuda'; known: "):
        BACKENDS.get("cuda")


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
