"""SamplingParams validation and the batched Sampler (greedy, temperature, top-k, top-p, min-p, seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllmx.sampling_params import SamplingParams
from nanovllmx.scheduler.messages import SamplingArrays
from nanovllmx.worker.sampler import TOPK_MAX, Sampler

CPU = torch.device("cpu")


# ------------------------------------------------------------------ SamplingParams
def test_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1.0, 1.0, -1, 0.0, 16)
    assert p.stop == [] and p.stop_token_ids == [] and p.ignore_eos is False and p.seed is None
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.7).greedy


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "1"),
        ("temperature", None),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", -1),
        ("top_p", float("nan")),
        ("top_k", -2),
        ("top_k", 1.5),
        ("top_k", True),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("min_p", float("nan")),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 2.0),
        ("max_tokens", None),
        ("stop", [""]),
        ("stop", [3]),
        ("stop", ""),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["a"]),
        ("stop_token_ids", [1.0]),
        ("ignore_eos", 1),
        ("ignore_eos", "yes"),
        ("seed", 1.5),
        ("seed", "7"),
        ("seed", True),
    ],
)
def test_invalid_values_raise_clear_error(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_validate_rechecks_after_mutation():
    p = SamplingParams(temperature=0.5)
    p.top_p = 2.0
    with pytest.raises(ValueError, match="top_p"):
        p.validate()


def _num_or_junk():
    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(10**6), 10**6),
        st.booleans(),
        st.none(),
        st.text(max_size=3),
    )


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@settings(max_examples=400, deadline=None)
@given(
    temperature=_num_or_junk(),
    top_p=_num_or_junk(),
    top_k=_num_or_junk(),
    min_p=_num_or_junk(),
    max_tokens=_num_or_junk(),
    seed=_num_or_junk(),
)
def test_validation_property(temperature, top_p, top_k, min_p, max_tokens, seed):
    """Valid ranges are accepted, everything else is rejected with ValueError (never another error)."""
    valid = {
        "temperature": _is_num(temperature) and math.isfinite(temperature) and temperature >= 0,
        "top_p": _is_num(top_p) and 0 < top_p <= 1,
        "top_k": _is_int(top_k) and top_k >= -1,
        "min_p": _is_num(min_p) and 0 <= min_p <= 1,
        "max_tokens": _is_int(max_tokens) and max_tokens >= 1,
        "seed": seed is None or _is_int(seed),
    }
    kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, max_tokens=max_tokens, seed=seed)
    if all(valid.values()):
        p = SamplingParams(**kw)
        assert p.temperature == temperature and p.max_tokens == max_tokens
    else:
        with pytest.raises(ValueError) as ei:
            SamplingParams(**kw)
        # the message names a field that is actually wrong
        assert any(name in str(ei.value) for name, ok in valid.items() if not ok), str(ei.value)


@settings(max_examples=200, deadline=None)
@given(
    stop=st.one_of(st.text(max_size=4), st.lists(st.one_of(st.text(max_size=4), st.integers()), max_size=3)),
    stop_token_ids=st.lists(st.one_of(st.integers(-5, 200000), st.floats(), st.booleans()), max_size=3),
)
def test_stop_validation_property(stop, stop_token_ids):
    items = [stop] if isinstance(stop, str) else stop
    ok_stop = all(isinstance(s, str) and s for s in items)
    ok_ids = all(_is_int(t) and t >= 0 for t in stop_token_ids)
    if ok_stop and ok_ids:
        p = SamplingParams(stop=stop, stop_token_ids=stop_token_ids)
        assert p.stop == items and p.stop_token_ids == stop_token_ids
    else:
        with pytest.raises(ValueError, match="stop"):
            SamplingParams(stop=stop, stop_token_ids=stop_token_ids)


# ------------------------------------------------------------------ Sampler
def arrays(B, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=-1, output_len=0) -> SamplingArrays:
    def col(x, dt):
        return np.array(x if isinstance(x, (list, tuple)) else [x] * B, dtype=dt)

    t, tp, tk, mp = col(temperature, np.float32), col(top_p, np.float32), col(top_k, np.int32), col(min_p, np.float32)
    return SamplingArrays(
        temperature=t,
        top_p=tp,
        top_k=tk,
        min_p=mp,
        seeds=col(seed, np.int64),
        output_lens=col(output_len, np.int32),
        needs_filter=bool((tp < 1).any() or (tk > 0).any() or (mp > 0).any()),
        all_greedy=bool((t == 0).all()),
    )


class _OnDevice:
    """A Sampler on `device` that takes and returns CPU tensors (on CUDA, unfiltered batches take
    the one-pass Triton kernel, so the same behaviour tests cover both paths)."""

    def __init__(self, device: str):
        self.s = Sampler(torch.device(device))

    def __call__(self, logits: torch.Tensor, sa: SamplingArrays) -> torch.Tensor:
        return self.s(logits.to(self.s.device), sa).cpu()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def sampler(request):
    torch.manual_seed(1234)
    return _OnDevice(request.param)


def rand_logits(B, V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


def test_greedy_is_argmax(sampler):
    logits = rand_logits(16, 5000)
    assert torch.equal(sampler(logits, arrays(16, temperature=0.0)), logits.argmax(-1))
    # greedy rows mixed with sampled and filtered rows stay argmax
    temps = [0.0, 1.0] * 8
    out = sampler(logits, arrays(16, temperature=temps, top_k=[0, 5] * 8))
    assert torch.equal(out[0::2], logits.argmax(-1)[0::2])


@pytest.mark.parametrize("temperature", [1e-6, 1e-20, 1e-38, 1e-44])
def test_tiny_temperature_is_greedy(sampler, temperature):
    logits = rand_logits(8, 5000, seed=3)
    out = sampler(logits, arrays(8, temperature=[temperature] * 4 + [1.0] * 4))
    assert torch.equal(out[:4], logits.argmax(-1)[:4])


def test_bf16_logits(sampler):
    logits = rand_logits(4, 3000, seed=5).bfloat16()
    assert torch.equal(sampler(logits, arrays(4, temperature=0.0)), logits.float().argmax(-1))
    out = sampler(logits, arrays(4, temperature=1.0, top_k=1))
    assert torch.equal(out, logits.float().argmax(-1))


def test_top_k_1_is_argmax(sampler):
    logits = rand_logits(64, 2000, scale=0.5)  # flat: plain sampling would almost never pick the argmax
    for _ in range(5):
        assert torch.equal(sampler(logits, arrays(64, top_k=1)), logits.argmax(-1))


def test_tiny_top_p_is_argmax(sampler):
    logits = rand_logits(64, 2000, scale=0.5)
    for _ in range(5):
        assert torch.equal(sampler(logits, arrays(64, top_p=1e-6)), logits.argmax(-1))


def _draws(sampler, logits_row, n, **kw) -> np.ndarray:
    """n independent draws from one row (one batched call of n identical rows)."""
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    return sampler(logits, arrays(n, **kw)).numpy()


def test_top_k_support(sampler):
    row = rand_logits(1, 50, seed=2, scale=0.3)[0]
    got = set(_draws(sampler, row, 4000, top_k=5).tolist())
    assert got == set(row.topk(5).indices.tolist())


def test_top_p_support(sampler):
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.05])
    row = probs.log()
    # smallest prefix whose mass reaches 0.7: the first three tokens (0.4 + 0.25 < 0.7 <= 0.8)
    assert set(_draws(sampler, row, 4000, top_p=0.7).tolist()) == {0, 1, 2}
    assert set(_draws(sampler, row, 4000, top_p=0.65).tolist()) == {0, 1}
    assert set(_draws(sampler, row, 6000, top_p=1.0).tolist()) == set(range(6))


def test_min_p_filters(sampler):
    probs = torch.tensor([0.4, 0.3, 0.19, 0.1, 0.01])
    row = probs.log()
    # min_p 0.5 keeps tokens with p >= 0.5 * 0.4 = 0.2
    assert set(_draws(sampler, row, 4000, min_p=0.5).tolist()) == {0, 1}
    assert set(_draws(sampler, row, 4000, min_p=0.2).tolist()) == {0, 1, 2, 3}
    assert set(_draws(sampler, row, 4000, min_p=1.0).tolist()) == {0}


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    n = counts.sum()
    exp = probs * n
    keep = exp > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    return float(((counts[keep] - exp[keep]) ** 2 / exp[keep]).sum())


# 99.99th percentile of chi-square with 7 degrees of freedom is ~29.9; with 2 d.o.f. ~18.4
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_distribution_matches_softmax(sampler, temperature):
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3])
    n = 40000
    counts = np.bincount(_draws(sampler, row, n, temperature=temperature), minlength=8)
    probs = torch.softmax(row / temperature, -1).numpy()
    assert _chi2(counts, probs) < 30.0, (counts, probs * n)


def test_empirical_distribution_after_top_k_and_top_p(sampler):
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3])
    n = 40000
    p = torch.softmax(row, -1).numpy()
    counts = np.bincount(_draws(sampler, row, n, top_k=3), minlength=8)
    want = np.where(np.isin(np.arange(8), np.argsort(-p)[:3]), p, 0)
    assert _chi2(counts, want / want.sum()) < 18.5
    counts = np.bincount(_draws(sampler, row, n, top_p=0.6), minlength=8)
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)]
    want = np.where(np.isin(np.arange(8), keep), p, 0)
    assert _chi2(counts, want / want.sum()) < 18.5


def test_unfiltered_rows_keep_full_support_next_to_filtered_rows():
    """A row that asked for no filtering must not lose (tail) tokens because its batch-mates filter."""
    logits = rand_logits(3, 151936, seed=4)
    f = Sampler._filter(logits.clone(), arrays(3, top_k=[0, 0, 20], top_p=[1.0, 1.0, 0.9], min_p=[0.0, 0.0, 0.1]))
    assert torch.isfinite(f[:2]).all()
    assert torch.equal(f[:2], logits[:2])
    assert torch.isfinite(f[2]).sum() <= 20


def test_seeded_rows_reproducible_across_batches(sampler):
    V = 1000
    target = rand_logits(1, V, seed=7, scale=0.5)[0]  # flat: draws differ a lot between seeds
    others = rand_logits(7, V, seed=8)

    def draw(n_others: int, pos: int, my_seed: int, step: int, **mates) -> int:
        """The seeded target row (temperature 0.8, top_p 0.95) at `pos` among n_others batch-mates."""
        logits = torch.cat([others[:pos], target[None], others[pos:n_others]])
        a = arrays(n_others + 1, **mates)
        a.temperature[pos], a.top_p[pos], a.top_k[pos], a.min_p[pos] = 0.8, 0.95, 0, 0.0
        a.seeds[pos], a.output_lens[pos] = my_seed, step
        a.needs_filter, a.all_greedy = True, False
        return int(sampler(logits, a)[pos])

    for step in range(6):
        alone = draw(0, 0, 42, step)
        # other batch sizes, positions, batch-mates' params, seeded and unseeded batch-mates
        assert draw(3, 1, 42, step, temperature=0.0) == alone
        assert draw(7, 5, 42, step, top_k=3) == alone
        assert draw(2, 2, 42, step, min_p=0.3, seed=7) == alone
        assert draw(4, 0, 42, step, temperature=1.3) == alone
    seq = [draw(0, 0, 42, s) for s in range(10)]
    other_seed = [draw(0, 0, 43, s) for s in range(10)]
    assert sum(a != b for a, b in zip(seq, other_seed)) >= 5
    assert len(set(seq)) >= 5  # successive steps of one seeded request are not all the same draw


def test_seeded_unfiltered_rows_reproducible_across_batches(sampler):
    """Temperature-only batches (the one-pass kernel on CUDA): a seeded row's draw depends on its
    seed and step only."""
    V = 1000
    target = rand_logits(1, V, seed=7, scale=0.5)[0]
    others = rand_logits(7, V, seed=8)

    def draw(n_others: int, pos: int, my_seed: int, step: int, **mates) -> int:
        logits = torch.cat([others[:pos], target[None], others[pos:n_others]])
        a = arrays(n_others + 1, **mates)
        a.temperature[pos], a.seeds[pos], a.output_lens[pos] = 0.8, my_seed, step
        a.all_greedy = False
        return int(sampler(logits, a)[pos])

    for step in range(6):
        alone = draw(0, 0, 42, step)
        assert draw(3, 1, 42, step, temperature=0.0) == alone
        assert draw(7, 5, 42, step, seed=7) == alone
        assert draw(4, 0, 42, step, temperature=1.3) == alone
    seq = [draw(0, 0, 42, s) for s in range(10)]
    assert sum(a != b for a, b in zip(seq, [draw(0, 0, 43, s) for s in range(10)])) >= 5
    assert len(set(seq)) >= 5


@pytest.mark.parametrize("device", DEVICES)
def test_unseeded_rows_vary(device):
    s = _OnDevice(device)
    logits = rand_logits(1, 1000, scale=0.1).expand(32, -1).contiguous()
    out = s(logits, arrays(32))
    assert len(set(out.tolist())) > 20


def test_top_k_path_matches_full_filter_distribution(sampler):
    """Rows with top_k > 0 sample among their top-k logits only (no full sort); with min-p, top-k
    and top-p together the draws follow the distribution the full-vocabulary filter defines."""
    row = torch.tensor([2.0, 1.7, 1.5, 1.2, 1.0, 0.9, 0.5, 0.2, 0.0, -0.3, -1.0, 1.1])
    kw = dict(temperature=0.7, top_k=6, top_p=0.8, min_p=0.1)
    want = torch.softmax(Sampler._filter(row[None] / 0.7, arrays(1, **kw))[0], -1).numpy()
    assert 2 <= (want > 0).sum() < 6  # the case exercises top-p on top of top-k
    counts = np.bincount(_draws(sampler, row, 40000, **kw), minlength=12)
    assert _chi2(counts, want) < 30.0, (counts, want * 40000)


def test_mixed_batch_rows_keep_their_own_filters(sampler):
    """One batch, three paths: a plain row keeps its whole support, a top-k row and a top-p-only
    row (full sort) only theirs."""
    V = 50
    row = rand_logits(1, V, seed=2, scale=0.3)[0]
    n = 3000
    logits = row.expand(3 * n, -1).contiguous()
    a = arrays(3 * n, top_k=[0] * n + [5] * n + [0] * n, top_p=[1.0] * n + [1.0] * n + [0.2] * n)
    out = sampler(logits, a).numpy()
    assert len(set(out[:n].tolist())) > 40
    assert set(out[n : 2 * n].tolist()) == set(row.topk(5).indices.tolist())
    p = torch.softmax(row, -1)
    order = p.argsort(descending=True)
    keep = order[: int(np.searchsorted(p[order].cumsum(0).numpy(), 0.2) + 1)]
    assert set(out[2 * n :].tolist()) == set(keep.tolist())


def test_seeded_top_k_row_independent_of_batch_mates(sampler):
    V = 3000
    target = rand_logits(1, V, seed=9, scale=0.2)[0]
    others = rand_logits(5, V, seed=10)

    def draw(mates_top_k: list[int], step: int, seed: int = 5) -> int:
        logits = torch.cat([target[None], others[: len(mates_top_k)]])
        a = arrays(len(mates_top_k) + 1, top_k=[40] + mates_top_k, top_p=[0.9] + [1.0] * len(mates_top_k))
        a.seeds[0], a.output_lens[:] = seed, step
        return int(sampler(logits, a)[0])

    for step in range(5):
        alone = draw([], step)
        assert draw([TOPK_MAX, 3], step) == alone  # a larger top-k in the batch
        assert draw([0, 0], step) == alone  # plain batch-mates
    assert len({draw([], s) for s in range(10)}) >= 5


@pytest.mark.parametrize("device", DEVICES)
def test_identically_seeded_samplers_draw_alike(device):
    """TP ranks each sample (and feed their own samples to the next step under overlap scheduling):
    samplers whose torch RNG was seeded alike must draw the same unseeded tokens."""
    logits = rand_logits(16, 5000, scale=0.2)
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        s = _OnDevice(device)
        draws.append([s(logits, arrays(16, temperature=0.9)).tolist() for _ in range(3)])
    assert draws[0] == draws[1]
    assert draws[0][0] != draws[0][1]  # and successive steps differ
