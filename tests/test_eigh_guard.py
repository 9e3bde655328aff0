"""The float64 retry of an eigendecomposition is warned about once and counted (issue #15
 item 3); CPU eigendecompositions run on `tekfac.linalg.EIGH_THREADS` threads."""

import warnings

import torch
from torch import nn

import tekfac
from tekfac import linalg


def test_float64_retries_are_warned_once_and_counted(monkeypatch):
    real = torch.linalg.eigh

    def flaky(m):  # the first attempt on every matrix fails, the float64 retry works
        if m.dtype != torch.float64:
            raise torch.linalg.LinAlgError("forced failure")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = tekfac.KFAC(net, fisher="empirical", cov_update_freq=1, eigen_update_freq=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    messages = [str(w.message) for w in caught if str(w.message).startswith("tekfac:")]
    cause = "eigendecomposition failed in the factor dtype"
    # every factor (2 per layer) on every step (3)
    assert opt.faults == {("layer '0'", cause): {"first_step": 0, "count": 6},
                          ("layer '2'", cause): {"first_step": 0, "count": 6}}
    assert len(messages) == 2 and all("retrying in float64 with jitter (step 0;" in m
                                      for m in messages)
    assert all(s.basis_in.dtype == torch.float32 for s in opt.preconditioner.states.values())


def test_single_threaded_cpu_eigh_restores_the_thread_count(monkeypatch):
    seen = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: seen.append(torch.get_num_threads())
                        or real(m))
    before = torch.get_num_threads()
    m = torch.randn(6, 6)
    linalg.symmetric_eigh(m @ m.T)
    assert seen == [linalg.EIGH_THREADS] and torch.get_num_threads() == before
