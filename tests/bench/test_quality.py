"""The quality harness: the tasks are solvable and correctly labelled, sizes follow the sequence, runs are
deterministic for a seed, and a near-chance accuracy reads ``untrained``."""

import pytest
import torch

import attnzoo  # noqa: F401  (registers the methods)
from attnzoo.bench import quality
from attnzoo.bench.measure import make_call
from attnzoo.registry import get


def solve_mqar(x: torch.Tensor, pairs: int) -> torch.Tensor:
    """At each query, the token after the query's key in the context."""
    out = torch.full_like(x, quality.IGNORE)
    for b in range(x.shape[0]):
        context = x[b, : 2 * pairs].tolist()
        for t in range(2 * pairs, x.shape[1]):
            out[b, t] = context[context.index(int(x[b, t])) + 1]
    return out


def solve_induction(x: torch.Tensor) -> torch.Tensor:
    """In the second half, the token after the current token's first occurrence."""
    out = torch.full_like(x, quality.IGNORE)
    half = x.shape[1] // 2
    for b in range(x.shape[0]):
        row = x[b].tolist()
        for t in range(half, x.shape[1] - 1):
            out[b, t] = row[row.index(row[t]) + 1]
    return out


def solve_selective_copy(x: torch.Tensor, seq: int) -> torch.Tensor:
    """At the j-th marker, the j-th non-blank token of the region."""
    out = torch.full_like(x, quality.IGNORE)
    for b in range(x.shape[0]):
        data = [t for t in x[b, :seq].tolist() if t != 0]
        for j, t in enumerate(range(seq + 1, x.shape[1])):
            out[b, t] = data[j]
    return out


@pytest.mark.parametrize("task, solver", [
    ({"name": "mqar", "pairs": 8, "vocab": 32}, lambda x: solve_mqar(x, 8)),
    ({"name": "induction", "seq": 32, "vocab": 16}, solve_induction),
    ({"name": "selective_copy", "seq": 24, "tokens": 5, "vocab": 12}, lambda x: solve_selective_copy(x, 24)),
])
def test_a_hand_written_solver_scores_one_on_every_task(task, solver):
    args = dict(task)
    (x, y), vocab, answers = quality.TASKS[args.pop("name")](64, torch.Generator().manual_seed(3), **args)
    assert int(x.max()) < vocab and int(x.min()) >= 0 and 1 / answers > 0
    scored = y != quality.IGNORE
    assert int(scored.sum()) > 0
    assert torch.equal(solver(x)[scored], y[scored])
    assert torch.equal(solver(x) != quality.IGNORE, scored)  # every determined position is scored, and no other


def test_generators_refuse_sizes_they_cannot_fill():
    with pytest.raises(ValueError, match="pairs"):
        quality.mqar(1, torch.Generator(), pairs=9, vocab=16)
    with pytest.raises(ValueError, match="vocab"):
        quality.induction(1, torch.Generator(), seq=40, vocab=16)


def call_at(seq: int):
    shape = {"batch": 2, "heads": 2, "kv_heads": 2, "seq_q": seq, "seq_kv": seq, "head_dim": 8, "device": "cpu",
             "dtype": "float32"}
    return make_call(shape, causal=True, requires_grad=True)


def test_sizes_are_relative_to_the_sequence():
    call = call_at(48)
    assert quality.relative_params(get("sliding_window"), call) == {"window": 6}
    assert quality.relative_params(get("neighborhood"), call) == {"kernel_size": 7}
    assert quality.relative_params(get("dilated"), call) == {"dilation": 2, "window": 3}
    assert quality.relative_params(get("topk"), call) == {"top_k": 12}
    assert quality.relative_params(get("moba"), call) == get("moba").spec.at_density(call, quality.DENSITY)
    assert quality.relative_params(get("softmax"), call) == {}


@pytest.mark.parametrize("name", ["sliding_window", "neighborhood", "generalized_neighborhood", "dilated", "topk"])
@pytest.mark.parametrize("seq", [3, 12, 37, 48])
def test_relative_sizes_are_valid_parameters_of_the_method(name, seq):
    m, call = get(name), call_at(seq)
    params = quality.relative_params(m, call)
    assert params
    for p in m.spec.params:
        if p.name in params:
            p.validate(params[p.name], call)


def tiny_case(method: str, seed: int = 0) -> dict:
    return {"kind": "quality", "method": method, "task": {"name": "mqar", "pairs": 4, "vocab": 16}, "seed": seed,
            "device": "cpu", "dim": 16, "heads": 2, "layers": 1, "steps": 3, "batch": 4, "lr": 3e-3, "cosine": True}


def test_a_run_is_deterministic_for_its_seed_and_records_its_sizes():
    first, again = quality.run_case(tiny_case("sliding_window")), quality.run_case(tiny_case("sliding_window"))
    assert first["status"] == "ok", first["reason"]
    assert (first["accuracy"], first["final_loss"]) == (again["accuracy"], again["final_loss"])
    assert first["sizes"] == {"window": 2} and first["params"]["window"] == 2 and first["seq"] == 12


def test_parameters_the_paper_layer_computes_are_left_to_it():
    row = quality.run_case(tiny_case("gated_delta"))
    assert row["status"] == "ok", row["reason"]
    assert row["layer"] == "paper" and not {"beta", "log_gate"} & set(row["params"])


def test_short_sequences_train_on_the_reference_unless_auto_picks_sdpa():
    short = make_call({"batch": 2, "heads": 1, "kv_heads": 1, "seq_q": 24, "seq_kv": 24, "head_dim": 8,
                       "device": "cpu", "dtype": "float32"}, causal=True, requires_grad=True)
    long = make_call({"batch": 1, "heads": 1, "kv_heads": 1, "seq_q": 512, "seq_kv": 512, "head_dim": 8,
                      "device": "cpu", "dtype": "float32"}, causal=True, requires_grad=True)
    assert quality.train_backend(get("moba"), short) == "reference"
    assert quality.train_backend(get("softmax"), short) == "sdpa"
    assert quality.train_backend(get("moba"), long) not in ("reference", "auto")
    row = quality.run_case(tiny_case("moba"))
    assert row["status"] == "ok" and row["backend"] == "reference", row.get("reason")


def test_a_method_whose_approximate_backend_cannot_train_is_unsupported_not_its_reference():
    row = quality.run_case(tiny_case("sage"))  # sage's quantised backend has no backward; its reference is softmax
    assert row["status"] == "unsupported" and row["reason"].startswith("backend:"), row


def test_hedgehog_trains_with_its_distillation_loss_added():
    from attnzoo.nn.layers.hedgehog import distillation_loss

    assert quality.training_loss("hedgehog") is distillation_loss and quality.training_loss("linear") is None
    torch.manual_seed(0)
    model = quality.TinyLM(16, 12, 16, 2, 2, "hedgehog", {}, "reference", distillation_loss)
    x = torch.randint(0, 16, (3, 12))
    model(x)
    assert float(model.extra_loss.detach()) > 0
    model.extra_loss.backward()
    maps = [p.grad for n, p in model.named_parameters() if "learnable" in n]
    assert maps and all(g is not None and float(g.abs().sum()) > 0 for g in maps)
    model.eval()
    model(x)
    assert float(model.extra_loss) == 0  # only while training
    row = quality.run_case(tiny_case("hedgehog"))
    assert row["status"] == "ok" and row["layer_loss"] is True, row.get("reason")


def test_near_chance_reads_untrained():
    assert quality.untrained(0.15, 0.125) and not quality.untrained(0.3, 0.125)
    assert quality.accuracy_text(0.13, 0.125) == "untrained" and quality.accuracy_text(0.5, 0.125) == "0.500"


def test_the_learning_rate_chosen_is_the_best_sweep_row():
    rows = [{"sweep": True, "status": "ok", "lr": 1e-3, "accuracy": 0.9, "final_loss": 0.2},
            {"sweep": True, "status": "ok", "lr": 3e-3, "accuracy": 1.0, "final_loss": 0.1},
            {"sweep": True, "status": "ok", "lr": 1e-2, "accuracy": 1.0, "final_loss": 0.05},
            {"sweep": False, "status": "ok", "lr": 3e-2, "accuracy": 1.0, "final_loss": 0.0},
            {"sweep": True, "status": "error", "lr": 1e-1}]
    assert quality.choose_lr(rows) == 1e-2
    assert quality.choose_lr(rows[3:]) is None


def test_quick_quality_is_a_task_softmax_learns():
    from attnzoo.bench.sweep import quick_config
    from attnzoo.bench.worker import run_any

    cfg = quick_config()  # one torch thread, as --quick runs it
    row = run_any({"kind": "quality", "method": "softmax", "task": cfg.tasks[0], "seed": cfg.seed, "device": "cpu",
                   **cfg.model})
    assert row["status"] == "ok" and row["accuracy"] >= 0.95
