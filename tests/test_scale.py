"""Pools of many experts (issue 27): the synthesizer, the batch add, the on-disk digest cache, routing and merges over
tens of adapters, on the tiny model."""

import json
import os
import shutil
import time
from collections import Counter

import pytest
import torch
from conftest import one_line, quiet, suite_data
from safetensors.torch import load_file, save_file

from workbench import io
from workbench.errors import PoolError, RecipeError
from workbench.pool import AddItem, Pool
from workbench.recipes import build, parse_recipe
from workbench.synth import is_synthetic, synthesize


@pytest.fixture()
def src(pool, tiny_dir):
    """The tiny pool's two LoRA experts, the templates of the synthesized adapters."""
    pool.add(tiny_dir / "lora_a", "addition", tags={"task": "addition"}, data=suite_data("addition"))
    pool.add(tiny_dir / "lora_b", "sorting", tags={"task": "sorting"})
    return pool


@pytest.fixture()
def big(src):
    """64 synthesized adapters in their own pool over the tiny base."""
    synthesize("big", 64, source="demo")
    return Pool.open("big")


def _count(monkeypatch, obj, attr):
    calls = []
    real = getattr(obj, attr)

    def counted(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(obj, attr, counted)
    return calls


# ----------------------------------------------------------------------------- the synthesizer


def test_synthesized_pool_verifies_loads_in_peft_and_is_varied(big, src):
    assert big.verify() == []
    experts = big.experts
    assert len(experts) == 64 and all(is_synthetic(e) for e in experts)
    assert Counter(e.entry.lora.r for e in experts).keys() == {4, 8, 16}
    assert len({tuple(e.entry.lora.target_modules) for e in experts}) >= 4  # target modules vary
    assert {e.entry.tags["template"] for e in experts} == {"addition", "sorting"}
    assert all("not a trained expert" in e.entry.notes for e in experts)
    by_template = {e.entry.tags["template"]: e for e in experts}
    assert by_template["addition"].data() == src.expert("addition").data()  # its template's data, for avg_act

    from peft import PeftModel

    pm = PeftModel.from_pretrained(big.base.load(), str(experts[0].path), adapter_name=experts[0].name)
    for e in experts[1:]:
        res = pm.load_adapter(str(e.path), adapter_name=e.name)
        assert not res.unexpected_keys and not [k for k in res.missing_keys if f".{e.name}." in k]
    assert len(pm.peft_config) == 64


def test_synthesized_adapters_stay_near_their_templates(big, src):
    """At a module its template adapts, an adapter's delta points along its template's (cosine > 0.95), and for most
    modules its top right singular vector (Arrow's prototype) is its template's: a router has something to find."""
    from workbench.methods.arrow import top_right_singular_vector

    cos_delta, cos_proto = [], []
    for e in big.experts:
        tpl = src.expert(e.entry.tags["template"])
        for t in set(e.delta_names()) & set(tpl.delta_names()):
            d, dt = e.delta(t), tpl.delta(t)
            cos_delta.append(float((d * dt).sum() / d.norm() / dt.norm()))
            (a, b, _), (ta, tb, _) = e.lora_factors(t), tpl.lora_factors(t)
            cos_proto.append(float(torch.dot(top_right_singular_vector(a, b), top_right_singular_vector(ta, tb)).abs()))
    assert len(cos_delta) > 100 and min(cos_delta) > 0.95
    assert sum(c > 0.9 for c in cos_proto) / len(cos_proto) > 0.85  # the rest: near-equal top singular values


def test_synthesis_is_deterministic_per_index_and_continues_names(src, pools):
    synthesize("p8", 8, source="demo", seed=3)
    synthesize("p12", 12, source="demo", seed=3)
    p8, p12 = Pool.open("p8"), Pool.open("p12")
    for e in p8.experts:  # adapter i depends on (seed, i) only: a small pool is a prefix of a larger one
        assert (e.path / "adapter_model.safetensors").read_bytes() == \
            (p12.expert(e.name).path / "adapter_model.safetensors").read_bytes()
    more = synthesize("p8", 4, seed=3)  # into the existing pool: its own non-synthetic experts are templates (none)
    assert [e.name for e in more] == ["synth-0008", "synth-0009", "synth-0010", "synth-0011"]
    assert all(e.entry.tags["template"] == "random" for e in more)
    assert Pool.open("p8").verify() == []


def test_synthesis_writes_the_manifest_once(src, monkeypatch):
    target = Pool.create("once", base=src.manifest.base.spec)
    saves = _count(monkeypatch, Pool, "_save")
    synthesize(target, 20, source="demo")
    assert len(saves) == 1 and len(Pool.open("once").names()) == 20


@pytest.mark.parametrize("kw, msg", [
    ({"n": 0}, r"n must be an integer from 1 to 4,096 \(got 0\)"),
    ({"n": 5000}, r"n must be an integer from 1 to 4,096"),
    ({"n": 2, "ranks": (0,)}, r"ranks must be integers from 1 to 256"),
    ({"n": 2, "noise": 2.0}, r"noise must be between 0 and 1"),
    ({"n": 2, "seed": -1}, r"seed must be an integer from 0 to 2\*\*32-1"),
])
def test_synthesis_bad_input_is_one_line(src, kw, msg):
    with pytest.raises(PoolError, match=msg) as e:
        synthesize("bad", source="demo", **kw)
    one_line(e)
    assert not (src.root.parent / "bad").exists()


def test_synthesis_of_a_new_pool_needs_a_base(pools):
    with pytest.raises(PoolError, match=r"pool 'nobase' does not exist: give the base") as e:
        synthesize("nobase", 4)
    one_line(e)


# ----------------------------------------------------------------------------- add_many


def test_add_many_validates_each_like_add_and_adds_nothing_on_a_bad_one(src, tiny_dir, tmp_path):
    bad = shutil.copytree(tiny_dir / "lora_a", tmp_path / "nan")
    sd = load_file(bad / "adapter_model.safetensors")
    k = next(iter(sd))
    sd[k][0, 0] = float("nan")
    save_file(sd, str(bad / "adapter_model.safetensors"))
    before = (src.root / "pool.json").read_bytes()
    items = [AddItem(tiny_dir / "lora_a", "x1"), AddItem(bad, "x2"), AddItem(tiny_dir / "lora_b", "x3")]
    with pytest.raises(Exception, match=r"NaN or Inf") as e:
        src.add_many(items)
    one_line(e)
    assert (src.root / "pool.json").read_bytes() == before
    assert sorted(p.name for p in (src.root / "experts").iterdir()) == ["addition", "sorting"]
    for items, msg in (([AddItem(tiny_dir / "lora_a", "y"), AddItem(tiny_dir / "lora_b", "y")], "given twice"),
                       ([AddItem(tiny_dir / "lora_a", "addition")], "already has an expert named 'addition'"),
                       ([AddItem(tiny_dir / "lora_a", "../up")], "invalid expert name"),
                       ([], "no experts given")):
        with pytest.raises(PoolError, match=msg):
            src.add_many(items)
    assert (src.root / "pool.json").read_bytes() == before


def test_add_many_equals_one_add_at_a_time(src, tiny_dir):
    """The same entries as `add` writes (bar the time of adding), in the order given, the manifest written once."""
    other = Pool.create("other", base=src.manifest.base.spec)
    for n, f in (("a", "lora_a"), ("b", "lora_b"), ("c", "full_c")):
        other.add(tiny_dir / f, n, tags={"t": n}, notes="x")
    got = src.add_many([AddItem(tiny_dir / f, n, tags={"t": n}, notes="x")
                        for n, f in (("a", "lora_a"), ("b", "lora_b"), ("c", "full_c"))])
    assert [e.name for e in got] == ["a", "b", "c"] and src.names()[-3:] == ["a", "b", "c"]

    def strip(e):
        return {k: v for k, v in e.entry.model_dump(mode="json").items() if k != "added_at"}

    assert [strip(e) for e in got] == [strip(other.expert(n)) for n in "abc"]
    assert Pool.open(src.root).verify() == []


def test_add_many_killed_while_placing_leaves_the_pool_as_it_was(src, tiny_dir, monkeypatch):
    before = (src.root / "pool.json").read_bytes()
    real = Pool._place
    calls = []

    def flaky(self, tmp, name):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(self, tmp, name)

    monkeypatch.setattr(Pool, "_place", flaky)
    with pytest.raises(KeyboardInterrupt):
        src.add_many([AddItem(tiny_dir / "lora_a", "k1"), AddItem(tiny_dir / "lora_b", "k2")])
    assert (src.root / "pool.json").read_bytes() == before
    assert sorted(p.name for p in (src.root / "experts").iterdir()) == ["addition", "sorting"]
    assert list((src.root / ".staging").iterdir()) == []


def test_lookups_follow_every_manifest_write(src, tiny_dir):
    """Name lookups use an index of the manifest: it follows adds, replaces and removes."""
    assert "sorting" in src and src.expert("sorting").entry.lora.r == 2
    src.add(tiny_dir / "lora_a", "sorting", replace=True)
    assert src.expert("sorting").entry.lora.r == 4
    src.remove("sorting")
    assert "sorting" not in src
    with pytest.raises(PoolError, match="has no expert 'sorting'"):
        src.expert("sorting")
    src.add_many([AddItem(tiny_dir / "lora_b", "z")])
    assert src.expert("z").entry.lora.r == 2 and Pool.open(src.root).expert("z").name == "z"


# ----------------------------------------------------------------------------- the digest cache


def _new_process(monkeypatch):
    """What another process sees: no digest remembered in memory."""
    monkeypatch.setattr(io, "_DIGESTS", {})


def test_second_build_reads_no_unchanged_expert_file_and_a_changed_one_is_caught(src, arts, tmp_path, monkeypatch):
    monkeypatch.setattr(io, "RACY_NS", 0)  # files written by this test are milliseconds old: remember them anyway
    recipe = {"name": "ta", "pool": str(src.root), "method": "task_arithmetic", "experts": ["addition", "sorting"]}
    hashed = _count(monkeypatch, io, "sha256_file")
    build(parse_recipe(recipe), log=quiet)
    files = [e.path / f for e in src.experts for f in e.entry.files]
    assert {str(c[0]) for c in hashed} >= {str(f) for f in files}  # the first build reads each file
    _new_process(monkeypatch)
    hashed.clear()
    build(parse_recipe(recipe), log=quiet)
    build(parse_recipe(recipe), force=True, log=quiet)
    assert [c for c in hashed if str(c[0]).startswith(str(src.root))] == []  # no expert file read again
    weights = src.expert("addition").path / "adapter_model.safetensors"
    st = weights.stat()
    sd = load_file(weights)
    save_file({k: v * 2 for k, v in sd.items()}, str(weights), metadata={"format": "pt"})
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, mtime put back: the ctime tells
    _new_process(monkeypatch)
    with pytest.raises(RecipeError, match=r"^expert 'addition': .*adapter_model\.safetensors changed since it was "
                                          r"added \(sha256 mismatch\)") as e:
        build(parse_recipe(recipe), log=quiet)
    one_line(e)


def test_a_file_changed_just_before_hashing_is_not_remembered_on_disk(tmp_path, monkeypatch):
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"x" * 100)
    hashed = _count(monkeypatch, io, "sha256_file")
    digest = io.sha256_file_cached(f)  # written milliseconds ago: within RACY_NS
    _new_process(monkeypatch)
    assert io.sha256_file_cached(f) == digest and len(hashed) == 2  # read again: nothing was kept on disk
    monkeypatch.setattr(io, "RACY_NS", 0)
    _new_process(monkeypatch)
    io.sha256_file_cached(f)
    _new_process(monkeypatch)
    assert io.sha256_file_cached(f) == digest and len(hashed) == 3  # now remembered: the 4th lookup read nothing


def test_a_torn_cache_entry_is_hashed_again(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "RACY_NS", 0)
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    digest = io.sha256_file_cached(f)
    entry = io._digest_entry(os.stat(f))
    assert entry.read_text().strip() == digest
    entry.write_text(digest[:20])  # a torn write
    _new_process(monkeypatch)
    hashed = _count(monkeypatch, io, "sha256_file")
    assert io.sha256_file_cached(f) == digest and len(hashed) == 1


def test_verify_of_64_adapters_rereads_nothing_the_second_time(big, monkeypatch):
    from workbench.tensors import TensorFile

    monkeypatch.setattr(io, "RACY_NS", 0)
    _new_process(monkeypatch)
    assert big.verify() == []  # hashes every file once, and remembers
    _new_process(monkeypatch)
    hashed = _count(monkeypatch, io, "sha256_file")
    scanned = _count(monkeypatch, TensorFile, "check_finite")  # a LoRA's tensors are scanned through its layout
    assert Pool.open(big.root).verify() == []
    assert hashed == [] and scanned == []  # digests from the disk cache; values passed their scan on add
    assert Pool.open(big.root).verify(deep=True) == [] and len(scanned) == 64
    assert Pool.open(big.root).verify(hashes=False) == [] and len(scanned) == 128
    victim = big.expert("synth-0007").path / "adapter_model.safetensors"
    sd = load_file(victim)
    save_file({k: v + 1 for k, v in sd.items()}, str(victim), metadata={"format": "pt"})
    problems = Pool.open(big.root).verify()
    assert problems == ["synth-0007: adapter_model.safetensors changed since it was added (sha256 mismatch)"]


# ----------------------------------------------------------------------------- many adapters open at once


def test_compact_reader_reads_what_safetensors_reads_and_returns_fresh_tensors(tmp_path):
    from workbench.tensors import TensorFile

    g = torch.Generator().manual_seed(0)
    tensors = {"a.f32": torch.randn(3, 5, generator=g), "b.bf16": torch.randn(4, 2, generator=g).bfloat16(),
               "c.f16": torch.randn(7, generator=g).half(), "d.i64": torch.arange(6).view(2, 3),
               "e.bool": torch.tensor([True, False, True]), "f.scalar": torch.tensor(2.5), "g.empty": torch.zeros(0, 4),
               "h.f64": torch.randn(2, 2, 2, generator=g).double(),
               "i.fp8": torch.randn(3, 3, generator=g).to(torch.float8_e4m3fn)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    tf = TensorFile(path)
    ref = load_file(str(path))
    assert sorted(tf.keys()) == sorted(ref)
    for k, v in ref.items():
        got = tf.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape, k
        assert torch.equal(got.view(torch.uint8), v.view(torch.uint8)) if v.dtype == torch.float8_e4m3fn else \
            torch.equal(got, v), k
        assert tf.shape(k) == tuple(v.shape)
    first = tf.get("a.f32")
    first.mul_(0)  # the caller's own copy: the next read is the file's values again
    assert torch.equal(tf.get("a.f32"), ref["a.f32"])


@pytest.mark.parametrize("bad", ["span past the end", "span of the wrong length", "unknown dtype", "header length",
                                 "not json", "overlapping spans", "huge dimension"])
def test_compact_reader_refuses_a_bad_header_in_one_line(tmp_path, bad):
    import struct

    from workbench.errors import ExpertValidationError
    from workbench.tensors import TensorFile

    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(4, 4), "x": torch.ones(4, 4)}, str(path))
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    if bad == "span past the end":
        header["x"]["data_offsets"] = [64, 256]
        header["x"]["shape"] = [12, 4]
    elif bad == "span of the wrong length":
        header["w"]["data_offsets"] = [0, 60]
    elif bad == "unknown dtype":
        header["w"]["dtype"] = "F33"
    elif bad == "overlapping spans":
        header["x"]["data_offsets"] = [32, 96]
    elif bad == "huge dimension":
        header["w"]["shape"], header["w"]["data_offsets"] = [0, 2 ** 70], [0, 0]
    body = b"{not json" if bad == "not json" else json.dumps(header).encode()
    size = len(raw) * 4 if bad == "header length" else len(body)
    path.write_bytes(struct.pack("<Q", size) + body + data)
    with pytest.raises(ExpertValidationError) as e:
        TensorFile(path)
    assert str(path) in one_line(e)
    if bad == "unknown dtype":
        assert "dtype 'F33' is not supported" in str(e.value)


@pytest.mark.parametrize("change", ["truncated", "replaced", "rewritten in place, mtime restored"])
def test_a_tensor_file_changed_after_its_check_fails_its_reads_in_one_line(tmp_path, change):
    """Reads go to byte positions found when the header was checked: a file rewritten or replaced since (e.g. an
    expert replaced by `pool add --replace` while a merge holds its layout) is a one-line error, never another
    file's bytes read at the old positions."""
    from workbench.errors import ExpertValidationError
    from workbench.tensors import TensorFile

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(8, 8), "z": torch.ones(64, 64)}, str(path))
    tf = TensorFile(path)
    if change == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif change.startswith("rewritten"):  # same inode, same size, the old mtime put back: only the ctime moves
        st = path.stat()
        time.sleep(0.02)
        data = bytearray(path.read_bytes())
        data[-4:] = b"\x00\x00\xc0\x7f"  # z's last value: NaN now
        with open(path, "r+b") as f:
            f.write(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_ino == st.st_ino and path.stat().st_mtime_ns == st.st_mtime_ns
    else:  # the same tensors, other header bytes (longer metadata): the old positions point elsewhere
        other = tmp_path / "new.safetensors"
        save_file({"a": torch.ones(8, 8), "z": torch.ones(64, 64)}, str(other), metadata={"note": "x" * 37})
        os.replace(other, path)
    for read in (lambda: tf.get("a"), lambda: tf.check_finite("it")):
        with pytest.raises(ExpertValidationError, match="changed since it was checked") as e:
            read()
        assert str(path) in one_line(e)
    assert change != "replaced" or torch.equal(TensorFile(path).get("a"), torch.ones(8, 8))


def test_open_lora_layouts_hold_a_few_bytes_a_tensor_and_no_file(pools, tmp_path):
    """A merge over N adapters keeps every adapter's layout for its whole run: each must cost little (its
    tensors' spans, not safetensors' handle and per-tensor dicts: about 0.2 MB an adapter of SmolLM2 before), and
    hold no open file. A deep tiny base (24 layers x 7 adapted projections: SmolLM2's 30 x 7 in kind)."""
    import gc
    import tracemalloc

    from workbench.testing import make_tiny_base, make_tiny_lora

    base = make_tiny_base(tmp_path / "deep", num_hidden_layers=24)
    mods = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora = make_tiny_lora(base, tmp_path / "lora", r=4, target_modules=mods)
    pool = Pool.create("deep", base=str(base))
    for i in range(12):
        shutil.copytree(lora, tmp_path / f"l{i}")
    pool.add_many([AddItem(source=str(tmp_path / f"l{i}"), name=f"e{i}") for i in range(12)])
    experts = Pool.open("deep").experts
    experts[0]._lora  # first-use imports and shared tables out of the count
    tensors = 2 * len(experts[0].delta_names())
    assert tensors == 24 * 7 * 2
    gc.collect()
    fds = len(os.listdir("/proc/self/fd"))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for e in experts[1:]:
            e._lora
        gc.collect()
        per = (tracemalloc.get_traced_memory()[0] - before) / (len(experts) - 1) / tensors
    finally:
        tracemalloc.stop()
    assert per < 160, f"{per:.0f} bytes per LoRA tensor of an open layout"  # 337 before
    assert len(os.listdir("/proc/self/fd")) == fds
    e = experts[5]
    name = e.delta_names()[3]
    a, b, _ = e.lora_factors(name)
    ref = load_file(str(e.path / "adapter_model.safetensors"))
    a_key, b_key, _ = e._lora.modules[name]
    assert torch.equal(a, ref[a_key].float()) and torch.equal(b, ref[b_key].float())


# ----------------------------------------------------------------------------- routing over many experts


def _peft_logits(pool, name, ids):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(pool.base.load(), str(pool.expert(name).path), is_trainable=False).eval()
    with torch.no_grad():
        return pm(input_ids=ids).logits


def test_routed_over_64_forced_to_one_equals_its_peft_output(big):
    from workbench.modules.routed_lora import RoutedGroup, wrap_experts
    from workbench.modules.routers import FixedRouter

    experts = big.experts
    names = [e.name for e in experts]
    model = big.base.load().eval()
    ctx = wrap_experts(model, experts)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    ranks = set()
    for j in (0, 29, 63):
        w = [0.0] * 64
        w[j] = 1.0
        with torch.no_grad(), ctx.use(groups=[RoutedGroup(FixedRouter(names, w, k=1), None)]):
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, _peft_logits(big, names[j], ids), atol=1e-5, rtol=0)
        ranks.add(experts[j].entry.lora.r)
    assert len(ranks) >= 2  # experts of several ranks were forced


class _Recording(list):
    """A list of factors that records which entries were read."""

    def __init__(self, items, seen):
        super().__init__(items)
        self.seen = seen

    def __getitem__(self, i):
        self.seen.add(i)
        return super().__getitem__(i)


def test_top2_dispatch_touches_only_the_chosen_experts_factors(big):
    from workbench.modules.routed_lora import RoutedGroup, Trace, routed_modules, wrap_experts
    from workbench.modules.routers import PrototypeRouter

    experts = big.experts
    model = big.base.load().eval()
    ctx = wrap_experts(model, experts)
    mods = routed_modules(model)
    seen = {m: set() for m in mods}
    for m, lin in mods.items():
        lin.weights.a = _Recording(lin.weights.a, seen[m])
        lin.weights.b = _Recording(lin.weights.b, seen[m])
    g = torch.Generator().manual_seed(1)
    protos = {m: torch.randn(64, lin.base.in_features, generator=g) for m, lin in mods.items()}
    for i, e in enumerate(experts):  # zero rows where an expert does not adapt the module: never chosen there
        own = {t[: -len(".weight")] for t in e.delta_names()}
        for m, p in protos.items():
            if m not in own:
                p[i] = 0
    router = PrototypeRouter([e.name for e in experts], protos, k=2, standardize=False, absolute=True, scale="one")
    trace = Trace()
    with torch.no_grad(), ctx.use(groups=[RoutedGroup(router, None)], trace=trace):
        model(input_ids=torch.tensor([[5, 17, 30]]))
    for m, lin in mods.items():
        chosen = {int(i) for idx, w in trace.modules[m] for i, x in zip(idx.flatten(), w.flatten()) if i >= 0 and x > 0}
        assert chosen and seen[m] <= chosen, (m, sorted(seen[m] - chosen))
        assert len(seen[m]) <= 6  # 3 tokens x top-2: at most 6 experts' factors read, of 64
        assert "padded" not in lin.weights.__dict__ and "stacked" not in lin.weights.__dict__  # no copy over all E


def test_compact_prototype_scoring_equals_the_full_reference():
    """Over >= COMPACT_MIN_EXPERTS experts, a module is scored against the experts that adapt it only: the same
    choices and weights as scoring every row with -inf for the absent ones; fewer than k present: padded."""
    from workbench.modules.routers import COMPACT_MIN_EXPERTS, PrototypeRouter, standardise

    g = torch.Generator().manual_seed(5)
    e, d, t = COMPACT_MIN_EXPERTS + 8, 24, 30
    protos = {"m": torch.randn(e, d, generator=g), "few": torch.zeros(e, d)}
    protos["m"][::3] = 0  # a third of the experts do not adapt m
    protos["few"][7] = torch.randn(d, generator=g)  # one expert adapts "few"
    x = torch.randn(t, d, generator=g)
    for standardize, absolute, scale in ((True, False, "inv_sqrt_d"), (False, True, "one")):
        r = PrototypeRouter([f"e{i}" for i in range(e)], protos, k=3, standardize=standardize, absolute=absolute,
                            scale=scale)
        assert set(r._present) == {"m", "few"}
        p = standardise(protos["m"]) if standardize else protos["m"]
        h = standardise(x) if standardize else x
        s = h @ p.T / (d ** 0.5 if scale == "inv_sqrt_d" else 1)
        s = (s.abs() if absolute else s).masked_fill((protos["m"] == 0).all(1), float("-inf"))
        top = s.topk(3, -1)
        idx, w = r.route("m", x)
        assert torch.equal(idx, top.indices)
        torch.testing.assert_close(w, torch.softmax(top.values, -1), atol=1e-6, rtol=0)
        torch.testing.assert_close(r.scores("m", x), s, atol=1e-5, rtol=0)
        idx, w = r.route("few", x)
        assert (idx[:, 0] == 7).all() and (idx[:, 1:] == -1).all() and (w[:, 0] == 1).all() and (w[:, 1:] == 0).all()
    small = PrototypeRouter(["a", "b", "c"], {"m": protos["m"][:3]}, k=2)
    assert small._present == {}  # a few experts: every row scored, as before



def test_sibling_projections_are_scored_in_one_matmul_per_distinct_input(monkeypatch):
    """Over >= COMPACT_MIN_EXPERTS experts, q/k/v (and gate/up) of one layer read one input: one scoring matmul for
    all three against their stacked matrices, each module's scores equal to scoring it alone; another input (the
    next layer's, or another tensor of the same shape) is scored afresh; o_proj, without siblings, alone."""
    import workbench.modules.routers as routers
    from workbench.modules.routers import COMPACT_MIN_EXPERTS, PrototypeRouter

    g = torch.Generator().manual_seed(6)
    e, d, t = COMPACT_MIN_EXPERTS + 4, 16, 12
    names = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    protos = {m: torch.randn(e, d, generator=g) for m in names}
    protos[names[1]][::4] = 0  # k_proj: a quarter of the experts do not adapt it (compacted rows)
    r = PrototypeRouter([f"e{i}" for i in range(e)], protos, k=2)
    alone = PrototypeRouter([f"e{i}" for i in range(e)], protos, k=2)
    alone._siblings = {}
    assert set(r._siblings) == set(names) - {names[3], names[7]}
    matmuls = []
    score = PrototypeRouter._score
    monkeypatch.setattr(routers.PrototypeRouter, "_score",
                        lambda self, p, x: (matmuls.append(p.shape[0]) if self is r else None, score(self, p, x))[1])
    x0, x1 = torch.randn(t, d, generator=g), torch.randn(t, d, generator=g)
    for i, x in ((0, x0), (0, x1.clone()), (1, x1)):  # the same layer with another input: scored afresh
        matmuls.clear()
        for m in names[4 * i: 4 * i + 4]:
            torch.testing.assert_close(r.scores(m, x), alone.scores(m, x), atol=1e-5, rtol=0)
            idx, w = r.route(m, x)
            want = alone.route(m, x)
            assert torch.equal(idx, want[0]) and torch.allclose(w, want[1], atol=1e-6)
        stacked = 3 * e - (len(range(0, e, 4)) if i == 0 else 0)  # layer 0's k_proj compacted
        assert matmuls == [stacked, e, e]  # q/k/v once, o_proj per call


def test_a_routed_group_of_some_rows_scores_siblings_once_per_layer(monkeypatch):
    """In a mixed batch a routed composition reads its own rows of each module's input: gathered once per input
    (RoutingContext.rows_of), so q/k/v hand the router one tensor and it scores them in one matmul; the pairs are
    those of scoring each module alone."""
    import workbench.modules.routers as routers
    from workbench.modules.routed_lora import RoutedGroup, RoutingContext
    from workbench.modules.routers import COMPACT_MIN_EXPERTS, PrototypeRouter

    g = torch.Generator().manual_seed(7)
    e, d, t = COMPACT_MIN_EXPERTS, 16, 10
    names = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    protos = {m: torch.randn(e, d, generator=g) for m in names}
    r = PrototypeRouter([f"e{i}" for i in range(e)], protos, k=2)
    alone = PrototypeRouter([f"e{i}" for i in range(e)], protos, k=2)
    alone._siblings = {}
    scored = []
    score = PrototypeRouter._score
    monkeypatch.setattr(routers.PrototypeRouter, "_score",
                        lambda self, p, x: (scored.append(self) if self is r else None, score(self, p, x))[1])
    ctx = RoutingContext(e)
    rows = torch.tensor([1, 4, 5, 8])
    x = torch.randn(t, d, generator=g)
    with ctx.use(groups=[RoutedGroup(r, rows, None)]):
        for m in names:
            meta = ctx.pairs_meta(m, x)
            want_idx, want_w = alone.route(m, x[rows])
            assert torch.equal(meta.idx[rows], want_idx) and torch.allclose(meta.w[rows], want_w, atol=1e-6)
            assert (meta.idx[[0, 2, 3, 6, 7, 9]] == -1).all()
    assert len(scored) == 1

def test_arrow_over_64_synthesized_experts_builds_linearly_and_routes(big, arts, monkeypatch):
    """One SVD per (expert, module it adapts): time linear in N; one [N, d_in] prototype matrix per module."""
    from workbench.artifacts import load_artifact
    from workbench.methods import arrow
    from workbench.modules.routers import load_router

    svds = _count(monkeypatch, arrow, "top_right_singular_vector")
    recipe = {"name": "arrow64", "pool": str(big.root), "method": "arrow", "parameters": {"k": 2}}
    path = build(parse_recipe(recipe), log=quiet)
    assert len(svds) == sum(len(e.delta_names()) for e in big.experts)
    router = load_router(path)
    assert len(router.experts) == 64 and all(p.shape[0] == 64 for p in router.tensors().values())
    loaded = load_artifact(path)
    ids = torch.randint(3, 60, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = loaded.model(input_ids=ids).logits
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- merges over many experts


def _lora_tensors(path):
    return load_file(path / "adapter_model.safetensors")


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.5}), ("dare_ties", {"density": 0.6, "seed": 4}),
                                            ("task_arithmetic", {"normalize": True, "lambda": 0.5}),
                                            ("della", {"density": 0.5})])
def test_streamed_merge_of_two_equals_the_stacked_one_bit_for_bit(src, arts, monkeypatch, method, params):
    from workbench.methods import merge_ta

    recipe = {"name": f"s-{method}", "pool": str(src.root), "method": method, "experts": ["addition", "sorting"],
              "parameters": params, "output": {"kind": "lora", "rank": 4}}
    stacked = _lora_tensors(build(parse_recipe(recipe), log=quiet))
    monkeypatch.setattr(merge_ta, "STREAM_MIN_EXPERTS", 1)  # two experts, streamed
    streamed = _lora_tensors(build(parse_recipe(recipe), force=True, log=quiet))
    assert stacked.keys() == streamed.keys() and all(torch.equal(stacked[k], streamed[k]) for k in stacked)


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.4}), ("task_arithmetic", {"lambda": 0.3}),
                                            ("dare_linear", {"density": 0.7, "seed": 1})])
def test_merges_of_40_synthesized_loras_stream_and_match_the_stacked_ones(big, arts, monkeypatch, method, params):
    """Beyond STREAM_MIN_EXPERTS experts a tensor's task vectors are read one at a time (task arithmetic: the factor
    product in groups); the merged deltas equal the stacked computation up to fp32 rounding."""
    from workbench.methods import merge_ta

    names = big.names()[:40]
    resolved = parse_recipe({"name": f"m-{method}", "pool": str(big.root), "method": method, "experts": names,
                             "parameters": params})
    calls = _count(monkeypatch, merge_ta.TaskArithmeticFamily, "merge_tensor")

    class Ctx:
        experts, params, pool = resolved.experts, resolved.params, resolved.pool

    streamed = dict(resolved.method.iter_merged_deltas(Ctx))
    assert calls == []  # nothing stacked
    monkeypatch.setattr(merge_ta, "STREAM_MIN_EXPERTS", 1000)
    stacked = dict(resolved.method.iter_merged_deltas(Ctx))
    assert streamed.keys() == stacked.keys()
    for k, v in stacked.items():
        torch.testing.assert_close(streamed[k], v, atol=2e-6, rtol=1e-5)
    if method != "task_arithmetic":
        assert len(calls) == len(stacked)


def test_scale_benchmark_quick_on_the_tiny_model(src, tmp_path, monkeypatch):
    from workbench.bench import scale

    out = tmp_path / "scale.json"
    rec = scale.run(base_spec=str(src.base.path), source=str(src.root), quick=True, out_file=out,
                    plot=tmp_path / "scale.svg", log=quiet)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(rec))
    assert saved["ns"] == [4, 8, 16]
    ops = saved["operations"]
    assert set(ops) == {"pool_add", "verify", "verify_again", "ties_merge_lora", "arrow_build",
                        "routed_forward_top2", "server_start", "server_start_all_resident", "zipf_serving"}
    for op, rows in ops.items():
        assert [r["n"] for r in rows] == [4, 8, 16], op
        assert all(r["wall_s"] > 0 and r["peak_rss_anon_mb"] > 0 for r in rows), op
        assert isinstance(saved["exponents"][op]["wall_s"], float)
    assert all(r["ratio_to_base"] > 0 for r in ops["routed_forward_top2"])
    for r in ops["routed_forward_top2"]:  # where the routed forward's time goes: pieces of one clocked forward
        parts = r["parts"]
        assert 0 < parts["route_s"] + parts["make_meta_s"] + parts["apply_lora_s"] <= parts["forward_s"]
        assert parts["module_calls"] > 0 and 1 <= parts["active_experts_per_call"] <= r["n"]
    assert (tmp_path / "scale.svg").stat().st_size > 1000
    # the servers: the paged one reads only its slots' adapters at start (all 4..16 fit in 64: all of them here)
    assert [r["adapters_read_at_start"] for r in ops["server_start"]] == [4, 8, 16]
    assert [r["adapters_read_at_start"] for r in ops["server_start_all_resident"]] == [4, 8, 16]
    for r in ops["zipf_serving"]:
        assert r["arms"]["paged"]["failed"] == 0 and r["arms"]["resident"]["failed"] == 0
        assert r["throughput_ratio"] > 0 and r["p95_ttft_ratio"] > 0 and r["requests"] == 12
        assert 0 < r["adapter_memory_mb"]["paged"] <= r["adapter_memory_mb"]["resident"]
        assert r["distinct_adapters"] <= r["n"]
    zipf = saved["figures"]["zipf_serving (64 resident / all resident)"]
    assert sorted(zipf) == ["16", "4", "8"] and zipf["16"]["throughput_ratio"] == ops["zipf_serving"][2]["throughput_ratio"]


def test_scale_benchmark_of_some_operations(src, tmp_path):
    """`--op`: only the named operations run (and pool_add, which makes the pool of N; the routed forward brings the
    Arrow build it runs on); a wrong name,
    or a partial run that would overwrite the full record's default file, is one line."""
    from workbench.bench import scale
    from workbench.errors import WorkbenchError

    kw = {"base_spec": str(src.base.path), "source": str(src.root), "log": quiet}
    out = tmp_path / "part.json"
    rec = scale.run(**kw, ns=[4, 8], reps=1, seqs=2, tokens=8, only=["routed_forward_top2"], out_file=out)
    assert list(rec["operations"]) == ["pool_add", "arrow_build", "routed_forward_top2"] == rec["only"]
    assert [r["n"] for r in rec["operations"]["routed_forward_top2"]] == [4, 8]
    assert set(rec["figures"]["routed_forward_top2 ratio_to_base"]) == {4, 8}
    assert json.loads(out.read_text())["only"] == rec["only"]
    rec = scale.run(**kw, ns=[4, 8], reps=1, only=["verify_again"], out_file=out)  # the warm verify needs the cold one
    assert list(rec["operations"]) == ["pool_add", "verify", "verify_again"]
    for only, extra, msg in ((["ties"], {"out_file": out}, "unknown operation 'ties'"),
                             ([], {"out_file": out}, "no operation given"),
                             (["ties_merge_lora"], {}, "needs --out"), (["verify"], {"quick": True}, "needs --out")):
        with pytest.raises(WorkbenchError, match=msg) as e:
            scale.run(**kw, ns=[4, 8], only=only, **extra)
        one_line(e)


def test_zipf_draws_follow_one_over_k_and_the_paged_server_reads_only_its_slots(src, tmp_path):
    """Zipf(1.0): adapter 1 about twice as often as adapter 2 and ten times adapter 10; a server over 12 adapters
    with 4 slots (the scale benchmark's paged arm, scaled down) reads 4 at start and answers."""
    from workbench.bench import scale_serve
    from workbench.synth import synthesize

    names = [f"a{k}" for k in range(50)]
    draws = scale_serve.zipf_models(50, 20000, 0, names)
    c = {n: draws.count(n) for n in names}
    assert 1.8 < c["a0"] / c["a1"] < 2.2 and 8 < c["a0"] / c["a9"] < 12.5
    assert scale_serve.zipf_models(50, 100, 0, names) == scale_serve.zipf_models(50, 100, 0, names)  # seeded
    assert scale_serve.zipf_models(50, 100, 0, names) != scale_serve.zipf_models(50, 100, 1, names)
    synthesize(str(tmp_path / "p12"), 12, source=src, seed=0)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(scale_serve, "RESIDENT_SLOTS", 4)
    try:
        row = scale_serve.server_start({"n": 12, "pool": str(tmp_path / "p12")})
    finally:
        monkey.undo()
    assert row == {"adapters_read_at_start": 4, "slots": 4}


def test_pool_list_show_verify_read_the_manifest_once(big, run_cli, monkeypatch):
    """At any N, `pool list/show/verify` parse the manifest once (lookups by name use its index), not per expert."""
    from workbench import pool as pool_mod

    monkeypatch.setattr(io, "RACY_NS", 0)
    reads = _count(monkeypatch, pool_mod, "_read_manifest")
    for args in (("list", "big"), ("show", "big"), ("show", "big", "synth-0063"), ("verify", "big")):
        reads.clear()
        code, out, _ = run_cli("pool", *args)
        assert code == 0 and len(reads) == 1, (args, len(reads))
    assert "64 experts verified" in out


def test_pool_synth_cli_writes_a_pool_that_verifies(src, run_cli):
    code, out, err = run_cli("pool", "synth", "syn", "--n", "3", "--from", "demo", "--rank", "4", "--seed", "1")
    assert code == 0, err
    p = Pool.open("syn")
    assert len(p.names()) == 3 and p.verify() == []
    assert {p.expert(n).lora_factors(p.expert(n).delta_names()[0])[0].shape[0] for n in p.names()} == {4}
    code, out, err = run_cli("pool", "synth", "syn2", "--n", "0", "--from", "demo")
    assert code == 2 and "\n" not in err.strip()
