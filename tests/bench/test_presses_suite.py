"""``attnzoo bench --suite presses``: the retrieval task, the model decoded through attnzoo.prefill/step with a press,
the planted layer inputs, the registry walk, the tables and the files. Tiny sizes (the model trains in seconds); the
presses are defined here, so the tests do not depend on which presses are registered."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import attnzoo.api as api
from attnzoo.bench import main, suites
from attnzoo.bench.retrieval import (
    IGNORE,
    RetrievalTask,
    Training,
    decode_answers,
    evaluate,
    retrieval_batch,
    trained_model,
    training_sequence,
)
from attnzoo.bench.suites import presses as suite
from attnzoo.bench.tables import press_error_table, press_leaderboard
from attnzoo.errors import AttnzooError
from attnzoo.kv.cache import KVCache
from attnzoo.kv.presses.base import Press, PressContext, PressInfo, ScorerPress

TASK = RetrievalTask(context=64, pairs=12, queries=4, keys=16, values=16, fillers=8)
TINY = suite.PressSuite(
    task=TASK, training=Training(dim=32, heads=2, layers=2, train_context=32, train_pairs=6, steps=150),
    sequences=32, chunk=16, calibration_sequences=4, budgets=(1.0, 0.5, 0.1),
    planted=suite.Planted(batch=1, heads=2, context=128, decode=4, head_dim=16, needles=2, hitters=2, band=8,
                          window=8))


@dataclass(frozen=True)
class KeepRecentPress(ScorerPress):
    """Keeps the latest tokens."""

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        return cache.positions.float()


@dataclass(frozen=True)
class KeyNormPress(ScorerPress):
    """Keeps the keys of smallest norm."""

    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        return -cache.keys.norm(dim=-1)


@dataclass(frozen=True)
class KeepAllPress(Press):
    """Keeps everything whatever the budget."""

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        return cache

    @classmethod
    def for_budget(cls, fraction: float, **options: Any) -> Press:
        return cls()


@dataclass(frozen=True)
class RecordingPress(KeepRecentPress):
    """Keep-recent that records every call it gets (phase, layer, queries seen, tokens it held)."""

    calls: list = field(default_factory=list)

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        self.calls.append(("prefill", context.layer, context.queries.shape[2], int(cache.token_counts().max())))
        return super().compress(cache, context)

    def step(self, cache: KVCache, context: PressContext) -> KVCache:
        self.calls.append(("step", context.layer, context.queries.shape[2], int(cache.token_counts().max())))
        return cache


@dataclass(frozen=True)
class DropPositionsPress(Press):
    """Drops the tokens at ``drop (B, C)`` (True: dropped) of each sequence."""

    drop: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        keep = ~self.drop.unsqueeze(1).expand_as(cache.positions)
        order = torch.sort((~keep).int(), dim=-1, stable=True).indices  # kept slots first, in position order
        width = int(keep.sum(-1).max())
        index = order[..., :width]
        return cache.keep(torch.where(keep.gather(2, index), index, -1))


@dataclass(frozen=True)
class CalibratedPress(KeepRecentPress):
    """Needs calibration and takes it: records what it was given."""

    given: tuple = ()

    @classmethod
    def for_budget(cls, fraction: float, calibration: Any = None, **options: Any) -> Press:
        assert calibration is not None
        return cls(compression_ratio=1.0 - fraction, given=tuple(tuple(t.shape) for t in calibration[0]))


@dataclass(frozen=True)
class UncalibratedPress(KeepRecentPress):
    """Needs training but its for_budget cannot take calibration data."""

    @classmethod
    def for_budget(cls, fraction: float) -> Press:
        return cls(compression_ratio=1.0 - fraction)


@dataclass(frozen=True)
class WrapperPress(Press):
    """Applies the press it wraps."""

    press: Press | None = None

    def compress(self, cache: KVCache, context: PressContext) -> KVCache:
        assert self.press is not None
        return self.press.compress(cache, context)

    @classmethod
    def for_budget(cls, fraction: float, **options: Any) -> Press:
        return cls(press=options["press"])


@dataclass(frozen=True)
class BrokenPress(KeepRecentPress):
    def score(self, cache: KVCache, context: PressContext) -> torch.Tensor:
        raise RuntimeError("broken score")


@dataclass(frozen=True)
class VideoPress(KeepRecentPress):
    """Needs video frames, which the retrieval task has not."""


def info(cls: type[Press], needs: tuple[str, ...] = ()) -> PressInfo:
    return PressInfo(cls.__name__, cls, "K2", "a test press", None, cls.__doc__ or "", needs)


INFOS = [info(KeepRecentPress), info(KeyNormPress), info(KeepAllPress), info(CalibratedPress, ("calibration",)),
         info(UncalibratedPress, ("training",)), info(BrokenPress), info(WrapperPress, ("press", "queries")),
         info(VideoPress, ("frames",))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the suite itself runs (small calls on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("presses")
    results = suite.run(out, INFOS, TINY, command="attnzoo bench --suite presses", inner=INFOS[0],
                        echo=lambda _: None)
    return out, results


@pytest.fixture(scope="module")
def model(run):
    out, _ = run
    got, meta = trained_model(TASK, TINY.training, out / "press-model")
    assert meta["cached"]  # the suite's run trained and saved it: loading does not train again
    return got


@pytest.fixture(scope="module")
def data():
    return retrieval_batch(TASK, 32, torch.Generator().manual_seed(5))


def test_the_task_puts_each_answer_after_its_key_in_the_context(data):
    b, c = data.context.shape
    value0 = TASK.fillers + TASK.keys
    assert c == TASK.context and data.queries.shape == data.answers.shape == (b, TASK.queries)
    assert ((data.queries >= TASK.fillers) & (data.queries < value0)).all()
    for i in range(b):
        for j in range(TASK.queries):
            where = data.needles[i, j].nonzero().flatten()
            assert len(where) >= 1
            assert (data.context[i, where - 1] == data.queries[i, j]).all()
            assert (data.context[i, where] == value0 + data.answers[i, j]).all()
        # a repeated key is scored with its value (the next token); a first occurrence is not
        keys = [(t, int(x)) for t, x in enumerate(data.context[i]) if TASK.fillers <= x < value0]
        assert len(keys) == TASK.pairs
        for n, (t, key) in enumerate(keys):
            repeated = any(k == key for _, k in keys[:n])
            expected = int(data.context[i, t + 1]) - value0 if repeated else IGNORE
            assert int(data.targets[i, t]) == expected
    x, y = training_sequence(data)
    assert (x[:, c:] == data.queries).all() and (y[:, c:] == data.answers).all()
    with pytest.raises(AttnzooError, match="context"):
        RetrievalTask(context=10, pairs=6)
    with pytest.raises(AttnzooError, match="queries"):
        RetrievalTask(queries=0)


def test_the_model_finds_the_answers_with_the_full_cache(model, data):
    assert evaluate(model, data, None)["accuracy"] >= 0.9
    x, _ = training_sequence(data)
    with torch.no_grad():
        forward = model(x)[:, TASK.context:].argmax(-1)
    assert torch.equal(forward, decode_answers(model, data, None)[0])  # decoding = one forward pass


def test_each_layer_prefills_with_the_press_and_the_queries_are_stepped(model, data, monkeypatch):
    seen = []
    prefill = api.prefill

    def spy(*args, **kwargs):
        seen.append((kwargs["method"], kwargs["layer"], kwargs["press"]))
        return prefill(*args, **kwargs)

    monkeypatch.setattr(api, "prefill", spy)
    press = RecordingPress(compression_ratio=0.5)
    _, caches = decode_answers(model, data, press)
    assert seen == [("softmax", 0, press), ("softmax", 1, press)]
    prompt = [c for c in press.calls if c[0] == "prefill"]
    steps = [c for c in press.calls if c[0] == "step"]
    assert prompt == [("prefill", layer, TASK.context, TASK.context) for layer in (0, 1)]
    # one step per query token and layer, each reading a cache the press had halved (plus the tokens stepped so far)
    assert len(steps) == TASK.queries * 2 and {c[2] for c in steps} == {1}
    assert max(c[3] for c in steps) <= TASK.context // 2 + TASK.queries
    assert all(int(c.token_counts().max()) == TASK.context // 2 for c in caches)


def test_keeping_everything_matches_the_full_cache_and_dropping_the_needles_loses_them(model, data):
    full = evaluate(model, data, None)
    assert evaluate(model, data, KeepAllPress.for_budget(0.1))["accuracy"] == full["accuracy"]
    needles = data.needles.any(1)
    lost = evaluate(model, data, DropPositionsPress(drop=needles), chunk=len(needles))
    assert lost["accuracy"] <= 0.3 < full["accuracy"] - 0.5
    assert lost["cache_tokens"] == full["cache_tokens"] - needles.sum() * TINY.training.heads


def test_the_suite_walks_the_presses_at_every_budget(run):
    _, results = run
    rows = {(r["test"], r["press"], r["budget"]): r for r in results["presses"]}
    assert rows[("retrieval", "full cache", 1.0)]["accuracy"] >= 0.9
    names = [suite.label(i, INFOS[0]) for i in INFOS]
    assert "WrapperPress(KeepRecentPress)" in names
    for test in ("retrieval", "layer_error"):
        for name in names:
            assert {b for t, p, b in rows if (t, p) == (test, name)} == set(TINY.budgets)
    full = rows[("retrieval", "full cache", 1.0)]["accuracy"]
    for b in TINY.budgets:
        assert rows[("retrieval", "KeepAllPress", b)]["accuracy"] == full
        assert rows[("layer_error", "KeepAllPress", b)]["rel_l2"] < 1e-5  # rounding only
        assert rows[("retrieval", "UncalibratedPress", b)]["status"] == "skipped"
        assert "calibration" in rows[("retrieval", "UncalibratedPress", b)]["reason"]
        assert rows[("retrieval", "BrokenPress", b)]["status"] == "error"
        assert "broken score" in rows[("layer_error", "BrokenPress", b)]["reason"]
        assert rows[("retrieval", "CalibratedPress", b)]["status"] == "ok"
        assert rows[("retrieval", "VideoPress", b)]["status"] == "skipped"
        assert "frames" in rows[("layer_error", "VideoPress", b)]["reason"]
        for test, metric in (("retrieval", "accuracy"), ("layer_error", "rel_l2")):  # the wrapper = what it wraps
            assert rows[(test, "WrapperPress(KeepRecentPress)", b)][metric] == rows[(test, "KeepRecentPress", b)][
                metric]
    assert rows[("retrieval", "KeepRecentPress", 1.0)]["accuracy"] == full  # a scorer at 100 % keeps everything
    assert rows[("retrieval", "KeepRecentPress", 0.1)]["accuracy"] < full
    assert rows[("retrieval", "KeepRecentPress", 0.5)]["tokens_fraction"] == pytest.approx(0.5)
    assert rows[("retrieval", "KeepRecentPress", 0.5)]["bytes_fraction"] == pytest.approx(0.5)
    assert rows[("layer_error", "KeepRecentPress", 0.1)]["rel_l2"] > 0


def test_presses_get_what_they_need():
    given = suite.build(info(CalibratedPress, ("calibration",)), 0.5, lambda: [(torch.zeros(2, 3, 4, 5),) * 3])
    assert given.given == ((2, 3, 4, 5),) * 3 and given.compression_ratio == 0.5
    with pytest.raises(NotImplementedError, match="calibration"):
        suite.build(info(UncalibratedPress, ("training",)), 0.5, lambda: [])
    with pytest.raises(NotImplementedError, match="does not take calibration"):  # **options, refused by __init__
        suite.build(info(KeyNormPress, ("calibration",)), 0.5, lambda: [])
    wrapper = suite.build(info(WrapperPress, ("press",)), 0.25, list, info(KeyNormPress))
    assert wrapper.press == KeyNormPress(compression_ratio=0.75)
    with pytest.raises(NotImplementedError, match="no scoring press"):
        suite.build(info(WrapperPress, ("press",)), 0.25, list)
    with pytest.raises(NotImplementedError, match="defines no for_budget"):
        suite.build(info(Press), 0.25, list)
    assert suite.wrapped(INFOS).name == "KeepRecentPress"  # the first plain scoring press (SnapKV when registered)


def test_results_report_and_tables_are_written(run):
    out, results = run
    back = json.loads((out / "results.json").read_text())
    assert back["schema"] == "attnzoo.bench/1.5" and back["status"] == "complete"
    assert len(back["presses"]) == 1 + 2 * len(INFOS) * len(TINY.budgets)
    assert back["config"]["model"]["cached"] is False
    for name in ("summary.md", "report.html", "presses.md", "presses.png"):
        assert (out / name).stat().st_size > 0
    summary, doc = (out / "summary.md").read_text(), (out / "presses.md").read_text()
    assert "retrieval accuracy by cache budget" in summary and "| press | K | 100 % | 50 % | 10 % |" in doc
    assert "| UncalibratedPress | retrieval | skipped | 100 %, 50 %, 10 % |" in doc
    body = press_leaderboard(results)[1]
    assert body[0][0] == "full cache (ceiling)"
    ranked = [r[0] for r in body[1:]]
    assert ranked.index("KeepAllPress") < ranked.index("KeepRecentPress")
    assert ranked[-3:] == ["BrokenPress", "UncalibratedPress", "VideoPress"]  # no figure: last
    assert press_error_table(results)[1][0][0] == "KeepAllPress"


def test_ranks_at_each_budget():
    rows = [{"test": "retrieval", "press": p, "mechanism": "K2", "budget": b, "status": "ok", "accuracy": a,
             "bytes_fraction": b}
            for p, accs in (("A", (1.0, 0.5, 0.4)), ("B", (1.0, 0.9, 0.1)), ("C", (1.0, 0.5, 0.2)))
            for b, a in zip((1.0, 0.5, 0.1), accs, strict=True)]
    rows += [{"test": "retrieval", "press": "D", "mechanism": "K9", "budget": b, "status": "ok", "accuracy": 1.0,
              "bytes_fraction": b} for b in (1.0, 0.5)]  # D cannot reach 10 %: after every press that can
    rows.append({"test": "retrieval", "press": "D", "mechanism": "K9", "budget": 0.1, "status": "unsupported"})
    header, body = press_leaderboard({"presses": rows})
    assert header[2:5] == ["100 %", "50 %", "10 %"]
    assert body == [["B", "K2", "1.000 (1)", "0.900 (2)", "0.100 (3)", "0.500", "10 %"],
                    ["A", "K2", "1.000 (1)", "0.500 (3)", "0.400 (1)", "0.450", "10 %"],
                    ["C", "K2", "1.000 (1)", "0.500 (3)", "0.200 (2)", "0.350", "10 %"],
                    ["D", "K9", "1.000 (1)", "1.000 (1)", "unsupported", "—", "—"]]


def test_planted_inputs_put_attention_on_needles_hitters_and_recent_keys():
    p = suite.Planted()
    q, k, _, qd, kd, _ = suite.planted_inputs(p, torch.Generator().manual_seed(0))
    assert q.shape == (p.batch, p.heads, p.context, p.head_dim) and qd.shape[2] == kd.shape[2] == p.decode
    decoded = torch.softmax(qd @ torch.cat([k, kd], 2).transpose(-1, -2) / p.head_dim**0.5, -1).mean((0, 1, 2))
    assert decoded[: p.context // 4].topk(p.needles + 1).values.sum() > 0.3  # the needles (and the sink), far back
    assert decoded[0] > 20 / p.context  # the sink, a heavy hitter
    t = p.context // 2  # a prompt query outside the window leans on the keys just before it
    prompt = torch.softmax(q[:, :, t : t + 1] @ k[:, :, : t + 1].transpose(-1, -2) / p.head_dim**0.5, -1)
    assert prompt[..., -p.band :].sum(-1).mean() > 0.5


def test_press_selection_and_the_cli():
    assert [i.name for i in suite.select(["Key*", "KeepAll*"], INFOS)] == ["KeyNormPress", "KeepAllPress"]
    with pytest.raises(AttnzooError, match="--cases"):
        suite.select(["nope"], INFOS)
    assert "presses:" in suites.listing()
    args = type("Args", (), {"compare": None, "imports": [], "suite": "presses", "device": "cuda", "cases": None})()
    assert main(args) == 2  # the press suite runs on the CPU: a bad option, not a crash
