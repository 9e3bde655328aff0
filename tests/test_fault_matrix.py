"""Fault-injection matrix (docs/design.md §8): method × Fisher kind × model (MLP, CNN with
BatchNorm, sequence model with flattened logits) × stage of the fault × kind of step
(statistics only, eigendecomposition, plain) × injected value (NaN, Inf).

A fault is injected into one batch, at step ``s``, of a 9-batch run
(``cov_update_freq=2, eigen_update_freq=4, scale_update_freq=2``, so step 8 refreshes every
basis once more after any fault):

- **whole-step faults**: ``input``, the value in one entry of the batch (an Inf may saturate
  tanh and surface only as a non-finite gradient); ``output``, written into the model's
  output by a forward hook; ``loss``, added to the loss given to ``backward`` (outputs and
  gradients stay finite); ``gradient``, written into one ``.grad`` before ``step()`` (a
  tracked weight, an untracked BatchNorm weight, a tracked bias). The run must end with
  exactly (``torch.equal``) the parameters, momentum buffers, curvature state, step counter
  and BatchNorm buffers of a run that never saw the batch. The BatchNorm buffers are the
  model's (a NaN forward poisons them, and any forward updates them); the run restores them
  as the README advises, from a copy taken before the forward, when a whole-step fault
  (place ``"model"``) is counted, so they are compared too.
- **per-layer faults**, in the first tracked layer ``L`` only: ``factor``, one entry of its
  batch input-side factor made non-finite; ``eigh``, ``torch.linalg.eigh`` returns
  eigenvalues filled with the value for ``L``'s input-side factor and its float64 retry
  raises. After step ``s``: ``factor``, all of ``L``'s state is that of before the step
  (statistics, basis and scaling skipped); ``eigh``, ``L``'s statistics are updated, its
  basis and eigenvalues (and a Kronecker scaling) are those of before the step. Every other
  layer's state equals that of the clean run at the same step. The step is taken and ``L``
  trains on afterwards.
- a per-layer fault on a step that does not do that work (``factor`` on a plain step,
  ``eigh`` on a step without eigendecomposition) cannot happen: the injector is never
  reached, and the run is bit-identical to the clean one, with no fault counted.

Every fault is counted once in ``optimizer.faults`` with its step, and warned about with
that step. The default suite runs a pairwise covering subset (every pair of values of any
two dimensions occurs, 24 cases); the full product (864 cases) is marked ``slow``.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tekfac
import tekfac.config
import tekfac.factors
import tekfac.scaling
from tests.conftest import curvature_of

METHODS = tuple(tekfac.METHODS)
FISHERS = ("mc", "empirical")
MODELS = ("mlp", "cnn_bn", "sequence")
STAGES = ("input", "output", "loss", "gradient", "factor", "eigh")
STEP_KINDS = ("statistics", "eigen", "plain")
VALUES = ("nan", "inf")
DIMENSIONS = (METHODS, FISHERS, MODELS, STAGES, STEP_KINDS, VALUES)
WHOLE_STEP = ("input", "output", "loss", "gradient")

FREQS = dict(cov_update_freq=2, eigen_update_freq=4, scale_update_freq=2)
BATCHES = 9
LAYER_KEYS = ("factor_in", "factor_out", "scale")  # what a failed eigh still updates
BASIS_KEYS = ("basis_in", "basis_out", "eig_in", "eig_out", "basis_scale")


def step_kind(s: int) -> str:
    """What step ``s`` does under :data:`FREQS` (cf. ``Preconditioner.statistics_due`` and
    ``update_curvature``): an eigendecomposition, statistics only, or neither."""
    if s % FREQS["eigen_update_freq"] == 0:
        return "eigen"
    if s % FREQS["cov_update_freq"] == 0 or s % FREQS["scale_update_freq"] == 0:
        return "statistics"
    return "plain"


#: The first step after step 0 of each kind: the step the fault is injected at.
FAULT_STEP = {kind: next(s for s in range(1, BATCHES) if step_kind(s) == kind)
              for kind in STEP_KINDS}


# ------------------------------------------------------------------------- the covering set
def pairwise(dimensions: tuple[tuple, ...]) -> list[tuple]:
    """A deterministic greedy all-pairs covering array: each row starts from the first pair
    of values not yet covered and fills the other dimensions, in order, with the value that
    covers the most new pairs (the first such value on ties)."""
    def pairs_of(row: dict[int, object]) -> set:
        return {(i, row[i], j, row[j]) for i, j in itertools.combinations(sorted(row), 2)}

    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(dimensions)), 2)
                 for a in dimensions[i] for b in dimensions[j]}
    order = sorted(uncovered, key=lambda p: (p[0], dimensions[p[0]].index(p[1]), p[2],
                                             dimensions[p[2]].index(p[3])))
    rows = []
    while uncovered:
        i, a, j, b = next(p for p in order if p in uncovered)
        row = {i: a, j: b}
        for k, values in enumerate(dimensions):
            if k not in row:
                row[k] = max(values, key=lambda v: len(pairs_of({**row, k: v}) & uncovered))
        uncovered -= pairs_of(row)
        rows.append(tuple(row[k] for k in range(len(dimensions))))
    return rows


PAIRWISE = pairwise(DIMENSIONS)
FULL = list(itertools.product(*DIMENSIONS))


def test_the_default_cases_cover_every_pair_and_every_step_kind_is_reached():
    for i, j in itertools.combinations(range(len(DIMENSIONS)), 2):
        seen = {(row[i], row[j]) for row in PAIRWISE}
        assert seen == set(itertools.product(DIMENSIONS[i], DIMENSIONS[j])), (i, j)
    assert FAULT_STEP == {"statistics": 2, "eigen": 4, "plain": 1}
    assert len(set(PAIRWISE)) == len(PAIRWISE) < len(FULL) // 10


# ------------------------------------------------------------------------- models and data
def build(model: str) -> tuple[nn.Module, tuple[int, ...], int]:
    """A small float64 model, the shape of one batch and the number of classes. The factor
    sizes of every tracked layer differ, so that the ``eigh`` fault hits one matrix."""
    torch.manual_seed(0)
    if model == "mlp":
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        return net.double(), (8, 4), 3
    if model == "cnn_bn":
        net = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
                            nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
        return net.double(), (8, 2, 5, 5), 3
    if model == "sequence":  # (N, T, d) inputs, loss on the flattened (N·T, C) logits
        net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 7))
        return net.double(), (4, 5, 3), 7
    raise ValueError(model)


def poisoned_param(model: str, net: nn.Module) -> torch.Tensor:
    """The parameter whose gradient the ``gradient`` stage poisons: a tracked weight, an
    untracked (first-order) BatchNorm weight, a tracked bias."""
    module, name = {"mlp": (0, "weight"), "cnn_bn": (1, "weight"), "sequence": (2, "bias")}[model]
    return getattr(net[module], name)


@dataclass(frozen=True)
class Case:
    method: str
    fisher: str
    model: str
    stage: str
    kind: str
    value: str

    @property
    def step(self) -> int:
        return FAULT_STEP[self.kind]

    @property
    def number(self) -> float:
        return float(self.value)


@dataclass
class Injector:
    """Injects the fault of ``case`` while ``on``, into layer ``target`` (the ``factor`` and
    ``eigh`` stages), and counts how often the per-layer injectors were reached."""

    case: Case
    target: str = ""
    target_size: int = 0
    on: bool = False
    factor_calls: int = 0
    eigh_calls: int = 0

    def output_hook(self, module, args, output):
        if not (self.on and self.case.stage == "output"):
            return output
        output = output.clone()
        output.view(-1)[0] = self.case.number
        return output


@dataclass
class Run:
    net: nn.Module
    opt: tekfac.KroneckerOptimizer
    before: dict | None = None  # opt.state_dict() before the fault step
    after: dict | None = None  # ... and after it
    losses: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    statistics_due: bool | None = None  # at the fault step of the clean run
    eigendecompositions: int = 0  # ... and how many it computed


def whole_step_faults(opt) -> int:
    return sum(r["count"] for (place, _), r in opt.faults.items() if place == "model")


def train(case: Case, injector: Injector | None, skip: bool = False) -> Run:
    """The 9-batch run of ``case``: clean (``injector`` is None), poisoned at step
    ``case.step``, or without that batch (``skip``)."""
    net, shape, classes = build(case.model)
    opt = tekfac.KroneckerOptimizer(net, case.method, fisher=case.fisher, seed=1, lr=0.05,
                                    **FREQS)
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(shape, generator=gen, dtype=torch.float64),
             torch.randint(0, classes, shape[:-1] if case.model == "sequence" else shape[:1],
                           generator=gen)) for _ in range(BATCHES)]
    run = Run(net, opt)
    if injector is not None:
        net.register_forward_hook(injector.output_hook)
        layer = opt.preconditioner.layers[0]
        sizes = [d for la in opt.preconditioner.layers for d in (la.d_in, la.d_out)]
        assert sizes.count(layer.d_in) == 1, sizes  # the eigh fault hits L's input side only
        injector.target, injector.target_size = layer.name, layer.d_in
    s = case.step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(data):
            if i == s:
                if skip:
                    continue
                run.before = copy.deepcopy(opt.state_dict())
                run.statistics_due = opt.preconditioner.statistics_due
                eigendecompositions = opt.preconditioner.estimates.eigendecompositions
            active = injector is not None and i == s
            if injector is not None:
                injector.on = active
            buffers = {k: v.clone() for k, v in net.named_buffers()}
            faults = whole_step_faults(opt)
            if active and case.stage == "input":
                x = x.clone()
                x.view(-1)[0] = case.number
            logits = net(x)
            outputs = logits.view(-1, classes)
            loss = F.cross_entropy(outputs, y.view(-1))
            if active and case.stage == "loss":
                loss = loss + case.number
            opt.zero_grad()
            opt.backward(loss, outputs)
            if active and case.stage == "gradient":
                poisoned_param(case.model, net).grad.view(-1)[0] = case.number
            opt.step()
            if injector is not None:
                injector.on = False
            if whole_step_faults(opt) > faults:  # the README's advice for BatchNorm buffers
                for k, v in net.named_buffers():
                    v.copy_(buffers[k])
            run.losses.append(loss.item())
            if i == s:
                run.after = copy.deepcopy(opt.state_dict())
                run.eigendecompositions = (opt.preconditioner.estimates.eigendecompositions
                                           - eigendecompositions)
    run.warnings = [str(w.message) for w in caught if str(w.message).startswith("tekfac:")]
    return run


def install(case: Case, injector: Injector, monkeypatch) -> None:
    """Patch the two per-layer seams: the factor kind's batch factors and
    ``torch.linalg.eigh`` (the call that ``tekfac.linalg.symmetric_eigh`` retries)."""
    kind = tekfac.factors.FACTOR_KINDS[tekfac.config.METHODS[case.method][0]]
    factors, eigh = kind.factors, torch.linalg.eigh

    def poisoned_factors(ex):
        factor_in, factor_out = factors(ex)
        if injector.on and case.stage == "factor" and ex.layer.name == injector.target:
            injector.factor_calls += 1
            factor_in = factor_in.clone()
            factor_in[0, 0] = case.number
        return factor_in, factor_out

    def failing_eigh(matrix, *args, **kwargs):
        if injector.on and case.stage == "eigh" and matrix.shape[-1] == injector.target_size:
            injector.eigh_calls += 1
            if injector.eigh_calls > 1:  # the float64 retry
                raise torch.linalg.LinAlgError("injected failure")
            values, vectors = eigh(matrix, *args, **kwargs)
            return values.fill_(case.number), vectors
        return eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(kind, "factors", poisoned_factors)
    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)


# ------------------------------------------------------------------------- assertions
def assert_states_equal(a: dict, b: dict, layers=None, keys=None) -> None:
    """The curvature states of ``layers`` (all by default), restricted to ``keys``, are
    bit-equal (and the same fields are set)."""
    for name in layers or a["layers"]:
        mine, theirs = a["layers"][name], b["layers"][name]
        assert mine.keys() == theirs.keys(), name
        for key in keys or mine:
            assert torch.equal(mine[key], theirs[key]), (name, key)


def assert_same_run(a: Run, b: Run) -> None:
    """Parameters, buffers, momentum, curvature state and step counter are bit-equal."""
    for p, q in itertools.chain(zip(a.net.parameters(), b.net.parameters()),
                                zip(a.net.buffers(), b.net.buffers())):
        assert torch.equal(p, q)
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    assert curvature_of(sa)["steps"] == curvature_of(sb)["steps"]
    assert_states_equal(curvature_of(sa), curvature_of(sb))
    assert sa["state"].keys() == sb["state"].keys()
    for key, value in sa["state"].items():
        assert torch.equal(value["momentum_buffer"], sb["state"][key]["momentum_buffer"])


def assert_trains_on(run: Run, s: int) -> None:
    assert all(math.isfinite(loss) for loss in run.losses[s + 1:]), run.losses
    assert all(torch.isfinite(p).all() for p in run.net.parameters())


def check(case: Case, monkeypatch) -> None:
    s = case.step
    injector = Injector(case)
    install(case, injector, monkeypatch)
    clean = train(case, None)
    assert clean.warnings == [] and clean.opt.faults == {}
    assert clean.statistics_due == (case.kind != "plain")  # the schedule is as assumed
    assert (clean.eigendecompositions > 0) == (case.kind == "eigen")
    poisoned = train(case, injector)
    done = poisoned.opt.preconditioner.steps
    local = f"layer {injector.target!r}"

    if case.stage in WHOLE_STEP:
        causes = {"gradient": ["non-finite gradient"],
                  # an Inf input saturates tanh: finite outputs, but 0·Inf in its gradient
                  "input": ["non-finite model outputs or loss", "non-finite gradient"]}
        (place, cause), = poisoned.opt.faults
        assert place == "model" and cause in causes.get(
            case.stage, ["non-finite model outputs or loss"])
        assert poisoned.opt.faults[place, cause] == {"first_step": s, "count": 1}
        assert len(poisoned.warnings) == 1 and f"(step {s};" in poisoned.warnings[0]
        assert done == BATCHES - 1
        assert_same_run(poisoned, train(case, None, skip=True))
        assert_trains_on(poisoned, s)
        return

    reached = (case.stage == "factor" and case.kind != "plain") or (
        case.stage == "eigh" and case.kind == "eigen")
    if not reached:  # that work is not done on this step: nothing can fail
        assert injector.factor_calls == injector.eigh_calls == 0
        assert poisoned.opt.faults == {} and poisoned.warnings == []
        assert_same_run(poisoned, clean)
        return

    before, after = curvature_of(poisoned.before), curvature_of(poisoned.after)
    others = [name for name in after["layers"] if name != injector.target]
    assert after["steps"] == s + 1 and done == BATCHES
    assert_states_equal(after, curvature_of(clean.after), others)
    if case.stage == "factor":
        assert injector.factor_calls >= 1
        assert poisoned.opt.faults == {(local, "non-finite statistics"):
                                       {"first_step": s, "count": 1}}
        assert len(poisoned.warnings) == 1 and f"(step {s};" in poisoned.warnings[0]
        assert_states_equal(after, before, [injector.target])
        changed = "factor_in"  # folded again at the next statistics step
    else:
        assert injector.eigh_calls == 2  # tried, then retried in float64
        faults = poisoned.opt.faults
        assert faults[local, "eigendecomposition failed"] == {"first_step": s, "count": 1}
        assert all(place == local and record == {"first_step": s, "count": 1}
                   for (place, _), record in faults.items())  # e.g. a count of retries
        assert poisoned.warnings and all(f"{local}:" in w and f"(step {s};" in w
                                         for w in poisoned.warnings)
        assert_states_equal(after, curvature_of(clean.after), [injector.target], LAYER_KEYS)
        assert_states_equal(after, before, [injector.target], BASIS_KEYS)
        mine = after["layers"][injector.target]
        if tekfac.scaling.SCALING_KINDS[tekfac.config.METHODS[case.method][1]].refits:
            assert torch.isfinite(mine["scaling"]).all()  # re-fitted in the kept basis
        else:
            assert torch.equal(mine["scaling"], before["layers"][injector.target]["scaling"])
        changed = "basis_in"  # refreshed again at step 8
    assert not torch.equal(poisoned.after["state"][0]["momentum_buffer"],
                           poisoned.before["state"][0]["momentum_buffer"])  # the step was taken
    final = curvature_of(poisoned.opt.state_dict())["layers"][injector.target]
    assert not torch.equal(final[changed], after["layers"][injector.target][changed])
    assert_trains_on(poisoned, s)


@pytest.mark.parametrize("case", [Case(*row) for row in PAIRWISE], ids=lambda c: "-".join(
    (c.method, c.fisher, c.model, c.stage, c.kind, c.value)))
def test_fault_matrix_pairwise(case, monkeypatch):
    check(case, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("case", [Case(*row) for row in FULL], ids=lambda c: "-".join(
    (c.method, c.fisher, c.model, c.stage, c.kind, c.value)))
def test_fault_matrix_full_product(case, monkeypatch):
    check(case, monkeypatch)
