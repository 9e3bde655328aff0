"""Diagonal sides (docs/design.md §2(c)): ``nn.Embedding`` blocks, whose input-side factor is
diagonal exactly, and the ``max_factor_dim`` guard, which keeps only the diagonal of an
oversized factor. Checked against dense float64 references (``tests/reference.py``); the
general formula tests of ``tests/test_curvature_math.py`` also run on the ``"embedding"``
network of ``tests/conftest.py``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tekfac
from tests.conftest import MeanOverSequence, Tokens
from tests.reference import layer_references

TOL = dict(rtol=1e-8, atol=1e-10)
EVERY_STEP = dict(fisher="empirical", cov_update_freq=1, eigen_update_freq=1,
                  scale_update_freq=1, stat_decay=0.0)


def fitted(net: nn.Module, x: torch.Tensor, method: str, **options):
    y = torch.randint(0, 3, (len(x),))
    refs = layer_references(net, x, y)
    pre = tekfac.Preconditioner(net, method, **{**EVERY_STEP, **options})
    F.cross_entropy(net(x), y).backward()
    pre.update_curvature()
    return pre, refs


def kronecker_dense(method: str, ref, diagonal_in: bool, diagonal_out: bool) -> torch.Tensor:
    """The KFAC / TKFAC reference with the diagonal sides' factors restricted to their
    diagonals."""
    def restrict(m: torch.Tensor, diagonal: bool) -> torch.Tensor:
        return torch.diag(torch.diagonal(m)) if diagonal else m

    if method == "kfac":
        a, g = ref.kfac_factors()
        delta = 1.0
    else:
        a, g, delta = ref.trace_restricted_factors()
    return delta * torch.kron(restrict(g, diagonal_out), restrict(a, diagonal_in))


@pytest.mark.parametrize("options", [dict(), dict(max_factor_dim=5)])
def test_embedding_block_against_the_dense_reference(method, options):
    """A bag-of-tokens classifier with padding: the block of the embedding (``M = W^T``,
    diagonal input factor) and, with ``max_factor_dim=5``, the head's 7-wide input side kept
    as its diagonal."""
    torch.manual_seed(0)
    net = nn.Sequential(Tokens(7), nn.Embedding(7, 6, padding_idx=0), nn.Tanh(),
                        MeanOverSequence(), nn.Linear(6, 3)).double()
    x = torch.randn(9, 5, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pre, refs = fitted(net, x, method, **options)
    emb, head = pre.layers
    assert (emb.diagonal_in, emb.diagonal_out) == (True, "max_factor_dim" in options)
    assert head.diagonal_in == ("max_factor_dim" in options) and not head.diagonal_out
    restricted = [w for w in caught if "max_factor_dim" in str(w.message)]
    assert len(restricted) == 2 * ("max_factor_dim" in options)  # head input, embedding output
    for layer in pre.layers:
        ref, curv = refs[layer.module], pre.curvature(layer.module)
        u_out, u_in = curv.eigenbasis()
        q = torch.kron(u_out, u_in)
        if method in ("kfac", "tkfac"):
            expected = kronecker_dense(method, ref, layer.diagonal_in, layer.diagonal_out)
        else:  # corrected scaling: the exact Fisher's diagonal in the basis
            expected = (q * torch.diagonal(q.T @ ref.fisher @ q)) @ q.T
        torch.testing.assert_close(curv.dense(), expected, **TOL)
        for diagonal, u in ((layer.diagonal_in, u_in), (layer.diagonal_out, u_out)):
            if diagonal:
                torch.testing.assert_close(u, torch.eye(len(u), dtype=u.dtype))


def test_embedding_input_factor_is_the_token_frequencies():
    """KFAC's ``A = E[A_i A_iᵀ]/T``: the frequency of each token per location; zero for a token
    never seen and for the padding token, where only the damping acts."""
    emb = nn.Embedding(6, 3, padding_idx=5).double()
    net = nn.Sequential(emb, nn.Flatten(), nn.Linear(12, 2)).double()
    tokens = torch.tensor([[0, 1, 1, 5], [0, 0, 2, 1]])
    pre = tekfac.Preconditioner(net, "kfac", **EVERY_STEP)
    F.cross_entropy(net(tokens), torch.tensor([0, 1])).backward()
    pre.update_curvature()
    factor = pre.states[pre.layers[0]].factor_in
    torch.testing.assert_close(factor, torch.tensor([3, 3, 1, 0, 0, 0], dtype=torch.float64) / 8)
    grad = torch.randn(3, 6, dtype=torch.float64)
    direction = pre.curvature(emb).precondition(grad)
    torch.testing.assert_close(direction[:, 3:], grad[:, 3:] / pre.config.damping)


def test_embedding_steps_and_a_tiny_language_model_trains(method):
    """Token and position embeddings (positions expanded to the batch), a head tied to the
    token embedding; the loss on flattened logits. The embedding tied to the head is left to
    the head's block; the loss falls."""
    torch.manual_seed(0)
    vocab, t = 11, 6

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, 8), nn.Embedding(t, 8)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, vocab, bias=False)
            self.head.weight = self.tok.weight

        def forward(self, idx):
            pos = torch.arange(idx.shape[1]).expand_as(idx)
            return self.head(torch.tanh(self.mix(self.tok(idx) + self.pos(pos))))

    net = LM()
    opt = tekfac.KroneckerOptimizer(net, method, lr=0.1, cov_update_freq=1, eigen_update_freq=5)
    assert [la.name for la in opt.preconditioner.layers] == ["pos", "mix", "head"]
    assert "tied to 'head'" in opt.describe()
    data = torch.randint(0, vocab, (64, t + 1))
    losses = []
    for _ in range(30):
        batch = data[torch.randint(0, 64, (16,))]
        logits = net(batch[:, :-1]).view(-1, vocab)
        loss = F.cross_entropy(logits, batch[:, 1:].reshape(-1))
        opt.zero_grad()
        opt.backward(loss, logits)
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5])


def test_positions_broadcast_over_the_batch_are_refused():
    """``pos(torch.arange(T))`` gives one ``(T, d)`` output added to every sequence: its
    per-example gradients are summed before any hook sees them."""
    tok, pos, head = nn.Embedding(5, 4), nn.Embedding(3, 4), nn.Linear(4, 5)
    opt = tekfac.KFAC(nn.ModuleList([tok, pos, head]), cov_update_freq=1)
    idx = torch.randint(0, 5, (8, 3))
    logits = head(tok(idx) + pos(torch.arange(3))).view(-1, 5)
    with pytest.raises(RuntimeError, match=r"'1' \(nn.Embedding\).*expanded to the batch"):
        opt.backward(F.cross_entropy(logits, idx.view(-1)), logits)
        opt.step()


@pytest.mark.parametrize(("option", "value"), [("sparse", True), ("max_norm", 1.0),
                                               ("scale_grad_by_freq", True)])
def test_embeddings_whose_gradient_no_block_fits_are_refused(option, value):
    net = nn.Sequential(nn.Embedding(5, 4, **{option: value}), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=rf"'0' \({option}={value}\).*exclude"):
        tekfac.TEKFAC(net)
    assert [la.name for la in tekfac.TEKFAC(net, exclude=["0"]).preconditioner.layers] == ["1"]


def test_an_unbatched_index_is_one_example():
    net = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3)).double()
    pre = tekfac.Preconditioner(net, "ekfac", **EVERY_STEP)
    F.cross_entropy(net(torch.tensor(2)), torch.tensor(1)).backward()
    pre.update_curvature()
    factor = pre.states[pre.layers[0]].factor_in
    torch.testing.assert_close(factor, F.one_hot(torch.tensor(2), 5).double())


def test_max_factor_dim_warns_once_per_side_and_names_the_layer():
    net = nn.Sequential(nn.Linear(300, 4), nn.Tanh(), nn.Linear(4, 3))
    with pytest.warns(UserWarning, match=r"Layer '0': its input-side factor would be 301 × 301, "
                                         r"over max_factor_dim=256"):
        opt = tekfac.TEKFAC(net, max_factor_dim=256)
    assert [(la.diagonal_in, la.diagonal_out) for la in opt.preconditioner.layers] == [
        (True, False), (False, False)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tekfac.TEKFAC(net, max_factor_dim=None)
    with pytest.raises(ValueError, match="max_factor_dim"):
        tekfac.TEKFAC(net, max_factor_dim=0)


def test_diagonal_sides_round_trip_through_checkpoints(method):
    """A checkpoint of a layer with diagonal sides resumes bit for bit; loading it where the
    side is whole is refused."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(9, 6), nn.Flatten(), nn.Linear(18, 3)).double()
    idx = torch.randint(0, 9, (10, 3))
    y = torch.randint(0, 3, (10,))

    def run(opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            out = net(idx)
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()

    with pytest.warns(UserWarning, match="max_factor_dim"):
        opt = tekfac.KroneckerOptimizer(net, method, cov_update_freq=1, eigen_update_freq=2,
                                        max_factor_dim=10, seed=0)
    run(opt, 3)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    state = copy.deepcopy(opt.state_dict())
    run(opt, 2)
    after = [p.clone() for p in net.parameters()]
    net.load_state_dict(saved)
    with pytest.warns(UserWarning, match="max_factor_dim"):
        again = tekfac.KroneckerOptimizer(net, method, cov_update_freq=1, eigen_update_freq=2,
                                          max_factor_dim=10, seed=0)
    again.load_state_dict(state)
    run(again, 2)
    for p, q in zip(net.parameters(), after):
        assert torch.equal(p, q)
    whole = tekfac.KroneckerOptimizer(net, method, max_factor_dim=None)
    with pytest.raises(ValueError, match="does not match layer '2'"):
        whole.load_state_dict(state)
