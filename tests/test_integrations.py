"""Hugging Face models, the HF ``Trainer``, accelerate and Lightning (README, "Use with").

Each stack is checked the same way: the steps it takes with tekfac equal a plain loop's
(float64, same batches), with both Fishers; the MC Fisher's labels are drawn in the layout of
each Hugging Face loss, ignored positions left out; and the examples under ``examples/`` run.
The framework packages are optional: without one its tests are skipped.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tekfac
from tekfac.bench.data import DataError, load_fortunes
from tests.conftest import counting_argmax_labels
from tests.test_distributed import launch

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402
from transformers.utils import logging  # noqa: E402

from tekfac.integrations import huggingface  # noqa: E402

logging.set_verbosity_error()
EXAMPLES = Path(__file__).parents[1] / "examples"
EVERY_STEP = dict(cov_update_freq=1, eigen_update_freq=2, damping=1e-2, seed=0)
VOCAB, T = 11, 6


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=8, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0,
                                     attn_implementation="eager", resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)  # same outputs twice
    return transformers.GPT2LMHeadModel(config).double()


def tiny_configs() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, max_position_embeddings=T,
                                     tie_word_embeddings=True)
    bert = transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   max_position_embeddings=T, num_labels=3)
    return {"gpt2": gpt2(), "llama": transformers.LlamaForCausalLM(llama).double(),
            "bert": transformers.BertForSequenceClassification(bert).double()}


def flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


# ------------------------------------------------------------------------- layers and models
@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_hf_conv1d_takes_the_steps_of_the_same_linear_layer(method, fisher):
    """``Conv1D`` holds the transposed weight of ``nn.Linear``: the two nets take the same
    steps with every method (and, with the same seed, draw the same MC labels)."""
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5)).double()
    linear = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for c, li in zip(conv[::2], linear[::2]):
            li.weight.copy_(c.weight.T)
            li.bias.copy_(c.bias)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    for net in (conv, linear):
        opt = tekfac.KroneckerOptimizer(net, method, lr=0.1, fisher=fisher, **EVERY_STEP)
        assert len(opt.preconditioner.layers) == 2
        for _ in range(3):
            out = net(x)
            opt.zero_grad()
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()
    for c, li in zip(conv[::2], linear[::2]):
        torch.testing.assert_close(c.weight.T, li.weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c.bias, li.bias, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_every_projection_of_the_tiny_hf_models_gets_a_block(name):
    """No module with a 2-D weight is left unclaimed (so no warning); every projection, the
    position and token embeddings get blocks; a tied input embedding is its head's."""
    net = tiny_configs()[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = tekfac.TEKFAC(net)
    tracked = {la.name for la in opt.preconditioner.layers}
    projections = {n for n, m in net.named_modules()
                   if isinstance(m, nn.Linear | Conv1D | nn.Embedding)}
    tied = {"gpt2": {"transformer.wte"}, "llama": {"model.embed_tokens"}, "bert": set()}[name]
    assert tracked == projections - tied
    table = opt.describe()
    assert all(f"{n}" in table for n in projections)
    assert "Conv1D has no Kronecker block" not in table


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_the_tiny_hf_models_take_mc_steps(name):
    """Llama (RMSNorm, rotary positions, tied head) as a causal LM with ignored labels; BERT
    as a sequence classifier (its position embedding fed per example)."""
    net = tiny_configs()[name]
    opt = tekfac.TEKFAC(net, **EVERY_STEP)
    ids = torch.randint(0, VOCAB, (4, T), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :2] = -100
    before = flat(net)
    for _ in range(2):
        if name == "bert":
            out = net(input_ids=ids, labels=labels[:, -1] % 3,
                      position_ids=huggingface.batch_position_ids(ids))
            outputs, mask = out.logits, None
        else:
            out = net(input_ids=ids, labels=labels,
                      position_ids=huggingface.batch_position_ids(ids))
            outputs, mask = huggingface.causal_lm_outputs(out.logits, labels)
        opt.zero_grad()
        opt.backward(out.loss, outputs, mask=mask)
        opt.step()
    assert opt.preconditioner.steps == 2 and not opt.faults
    assert flat(net).isfinite().all() and not torch.equal(flat(net), before)


def test_a_module_no_layer_kind_claims_is_warned_about_with_its_share():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attention(x, x, x)[0])

    model = Model()
    own = sum(p.numel() for p in model.attention.parameters())
    share = own / sum(p.numel() for p in model.parameters())
    with pytest.warns(UserWarning, match=rf"'attention' \(MultiheadAttention\), "
                                         rf"'attention.out_proj' .* {share:.1%} .*exclude="):
        tekfac.KFAC(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tekfac.KFAC(model, exclude=["attention"])


def test_default_positions_of_a_hf_model_are_refused_and_batch_position_ids_fix_it():
    net = gpt2()
    opt = tekfac.KFAC(net, fisher="empirical", **EVERY_STEP)
    ids = torch.randint(0, VOCAB, (4, T))
    net(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match=r"'transformer.wpe' \(nn.Embedding\).*1 example.*"
                                           r"position_ids=torch.arange\(T\).expand\(B, T\)"):
        opt.step()
    opt.zero_grad()
    net(input_ids=ids, labels=ids,
        position_ids=huggingface.batch_position_ids(ids)).loss.backward()
    opt.step()


def test_hf_causal_lm_positions_without_a_label_add_nothing(argmax_sampler):
    """GPT-2's own loss (labels shifted inside the model, ``-100`` ignored): with the MC
    labels equal to the labels of the user's loss, the MC statistics of ``causal_lm_outputs``
    equal the empirical statistics of that loss at every layer; the plain flattened logits
    (every position sampled) give other statistics."""
    net = gpt2()
    ids = torch.randint(0, VOCAB, (4, T))
    positions = huggingface.batch_position_ids(ids)
    with torch.no_grad():
        predicted = net(input_ids=ids, position_ids=positions).logits.argmax(-1)
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = predicted[:, :-1]  # label t + 1 is the argmax at position t ...
    labels[0, 1:4] = labels[2, 2:] = -100  # ... except where the loss ignores it

    def statistics(fisher, view):
        opt = tekfac.KFAC(net, fisher=fisher, stat_decay=0.0, **EVERY_STEP)
        out = net(input_ids=ids, labels=labels, position_ids=positions)
        outputs, mask = view(out.logits)
        opt.zero_grad()
        opt.backward(out.loss, outputs, mask=mask)
        opt.preconditioner.update_curvature()
        pre = opt.preconditioner
        return [(pre.states[la].factor_in, pre.states[la].factor_out) for la in pre.layers]

    def causal(logits):
        return huggingface.causal_lm_outputs(logits, labels)

    mc, empirical = statistics("mc", causal), statistics("empirical", causal)
    assert argmax_sampler
    for (a_mc, g_mc), (a_emp, g_emp) in zip(mc, empirical):
        torch.testing.assert_close(a_mc, a_emp, rtol=1e-12, atol=0)
        # HF's loss casts the logits to float32 (logits.float()), hence the tolerance
        torch.testing.assert_close(g_mc, g_emp, rtol=1e-5, atol=1e-9)
    everywhere = statistics("mc", lambda logits: (logits.reshape(-1, VOCAB), None))
    assert not torch.allclose(everywhere[-1][1], mc[-1][1], rtol=1e-3)


def test_loss_outputs_follow_each_hf_loss():
    models = tiny_configs()
    logits = torch.randn(2, T, VOCAB)
    labels = torch.randint(0, VOCAB, (2, T))
    labels[1, 2] = -100
    outputs, mask = huggingface.loss_outputs(models["gpt2"], logits, labels)
    assert outputs.shape == (2 * T, VOCAB)
    expected = torch.ones(2, T, dtype=torch.bool)
    expected[:, -1] = False  # nothing follows the last position
    expected[1, 1] = False  # position 1 predicts the ignored label 2
    assert torch.equal(mask, expected.reshape(-1))
    _, token_mask = huggingface.token_outputs(logits, labels)
    assert token_mask.sum() == 2 * T - 1 and not token_mask[T + 2]
    classification = torch.randn(2, 3)
    assert huggingface.loss_outputs(models["bert"], classification, labels[:, 0]) == (
        classification, None)


# ------------------------------------------------------------------------- the stacks
def _windows(n: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("fisher", "accumulate"), [("mc", 1), ("empirical", 1), ("mc", 2)])
def test_tekfac_trainer_takes_the_steps_of_the_plain_loop(fisher, accumulate, argmax_sampler,
                                                          tmp_path):
    """Each step holds the whole (shuffled) data set, in ``accumulate`` micro-batches whose
    losses the Trainer divides by the step's token count; so both take the same steps, and
    the argmax labels make the MC statistics independent of the shuffled order. (The first
    label of each window is ignored: this Trainer counts GPT-2's tokens over the unshifted
    labels, N·T of them where the loss has N·(T − 1), unless no first label counts.)"""
    windows, steps = _windows(), 3
    labels = windows.clone()
    labels[:, 0] = -100
    tokens = (labels[:, 1:] != -100).sum()
    micro = len(windows) // accumulate
    loop_net, trainer_net = gpt2(), gpt2()
    opt = tekfac.TEKFAC(loop_net, lr=0.05, fisher=fisher, **EVERY_STEP)
    for _ in range(steps):
        opt.zero_grad()
        for part in torch.arange(len(windows)).split(micro):
            ids, targets = windows[part], labels[part]
            out = loop_net(input_ids=ids, labels=targets, num_items_in_batch=tokens,
                           position_ids=huggingface.batch_position_ids(ids))
            opt.backward(out.loss, *huggingface.causal_lm_outputs(out.logits, targets))
        opt.step()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulate, save_strategy="no", report_to=[],
        max_grad_norm=0.0, use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant")
    data = [{"input_ids": w, "labels": v} for w, v in zip(windows, labels)]
    trainer = huggingface.TekfacTrainer(
        model=trainer_net, args=args, train_dataset=data,
        optimizers=(tekfac.TEKFAC(trainer_net, lr=0.05, fisher=fisher, **EVERY_STEP), None),
        expand_position_ids=True)
    trainer.train()
    assert argmax_sampler or fisher == "empirical"
    torch.testing.assert_close(flat(trainer_net), flat(loop_net), rtol=1e-8, atol=1e-10)


def test_tekfac_trainer_without_per_example_positions_says_how_to_get_them(tmp_path):
    net = gpt2()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
        save_strategy="no", report_to=[], max_grad_norm=0.0, use_cpu=True, disable_tqdm=True)
    windows = _windows()
    trainer = huggingface.TekfacTrainer(
        model=net, args=args, train_dataset=[{"input_ids": w, "labels": w} for w in windows],
        optimizers=(tekfac.KFAC(net, fisher="empirical", **EVERY_STEP), None))
    with pytest.raises(RuntimeError, match=r"'transformer.wpe'.*expand_position_ids=True"):
        trainer.train()


def test_tekfac_trainer_refuses_another_optimizer_and_warns_about_clipping(tmp_path):
    net = gpt2()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[],
                                          use_cpu=True)
    with pytest.raises(ValueError, match=r"optimizers=\(tekfac\.TEKFAC"):
        huggingface.TekfacTrainer(model=net, args=args, train_dataset=[])
    with pytest.raises(TypeError, match="Expected a tekfac optimizer"):
        huggingface.TekfacTrainer(model=net, args=args, train_dataset=[],
                                  optimizers=(torch.optim.SGD(net.parameters(), 0.1), None))
    with pytest.raises(ValueError, match=r"damping_adaptive=True needs step\(closure\)"):
        huggingface.TekfacTrainer(model=net, args=args, train_dataset=[],
                                  optimizers=(tekfac.KFAC(net, damping_adaptive=True), None))
    with pytest.warns(UserWarning, match="max_grad_norm=1.0 clips"):
        huggingface.TekfacTrainer(model=net, args=args, train_dataset=[],
                                  optimizers=(tekfac.KFAC(net), None))


def _classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _classification_data(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=gen)


def _plain_loop(net, fisher, x, y, batch, accumulate, steps):
    """Steps of ``batch`` examples as ``accumulate`` micro-batches, in order."""
    opt = tekfac.TEKFAC(net, lr=0.1, fisher=fisher, **EVERY_STEP)
    micro = batch // accumulate
    for step in range(steps):
        opt.zero_grad()
        for k in range(accumulate):
            start = step * batch + k * micro
            out = net(x[start:start + micro])
            opt.backward(F.cross_entropy(out, y[start:start + micro]) / accumulate, out)
        opt.step()


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_accelerate_backward_with_accumulation_takes_the_steps_of_the_plain_loop(fisher):
    accelerate = pytest.importorskip("accelerate")
    from tekfac.integrations.accelerate import backward

    x, y = _classification_data()
    reference, net = _classifier(), _classifier()
    _plain_loop(reference, fisher, x, y, batch=8, accumulate=2, steps=2)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = tekfac.TEKFAC(net, lr=0.1, fisher=fisher, **EVERY_STEP)
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=4)
    net, opt, loader = accelerator.prepare(net, opt, loader)
    for xb, yb in loader:
        with accelerator.accumulate(net):
            out = net(xb)
            backward(accelerator, opt, F.cross_entropy(out, yb), out)
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(flat(net), flat(reference), rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match=r"no loss\.backward\(\) arguments"):
        backward(accelerator, opt, F.cross_entropy(out, yb), out, retain_graph=True)


def _accelerate_ddp(rank, world, tmp, fisher, port):
    """Each rank trains a prepared (DDP) model on its half of every global batch; the result
    equals one process on the whole batches (the MC labels are the argmax, the same on every
    rank and in the reference)."""
    import accelerate

    from tekfac.integrations.accelerate import backward

    tekfac.fisher.sample_targets = counting_argmax_labels([])
    x, y = _classification_data()
    reference = _classifier()
    _plain_loop(reference, fisher, x, y, batch=8, accumulate=1, steps=2)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    accelerator = accelerate.Accelerator(cpu=True)
    assert accelerator.num_processes == world
    net = _classifier()
    opt = tekfac.TEKFAC(net, lr=0.1, fisher=fisher, **EVERY_STEP)
    ddp, opt = accelerator.prepare(net, opt)
    assert isinstance(ddp, nn.parallel.DistributedDataParallel)
    share = 8 // world
    for step in range(2):
        start = step * 8 + rank * share
        out = ddp(x[start:start + share])
        backward(accelerator, opt, F.cross_entropy(out, y[start:start + share]), out)
        opt.step()
        opt.zero_grad()
    assert (flat(net) - flat(reference)).norm() <= 1e-6 * flat(reference).norm()


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_accelerate_ddp_takes_the_steps_of_one_process(fisher, tmp_path):
    pytest.importorskip("accelerate")
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch(_accelerate_ddp, 2, tmp_path, fisher, port)


@pytest.mark.parametrize(("fisher", "accumulate"), [("mc", 1), ("empirical", 1), ("mc", 2)])
def test_lightning_automatic_optimisation_takes_the_steps_of_the_plain_loop(fisher,
                                                                          accumulate):
    pl = pytest.importorskip("lightning.pytorch")
    from tekfac.integrations.lightning import TekfacBackward

    class Classifier(TekfacBackward, pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            out = self.net(xb)
            self.tekfac_outputs(out)
            return F.cross_entropy(out, yb)

        def configure_optimizers(self):
            return tekfac.TEKFAC(self.net, lr=0.1, fisher=fisher, **EVERY_STEP)

    x, y = _classification_data()
    reference, net = _classifier(), _classifier()
    _plain_loop(reference, fisher, x, y, batch=8, accumulate=accumulate, steps=2)
    module = Classifier(net)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accumulate_grad_batches=accumulate)
    loader = torch.utils.data.DataLoader(list(zip(x, y)), batch_size=8 // accumulate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on data-loader workers
        trainer.fit(module, loader)
    torch.testing.assert_close(flat(net), flat(reference), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fisher", ["mc", "empirical"])
def test_lightning_manual_optimisation_takes_the_steps_of_the_plain_loop(fisher):
    pl = pytest.importorskip("lightning.pytorch")
    from tekfac.integrations.lightning import TekfacBackward

    class Classifier(TekfacBackward, pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            xb, yb = batch
            out = self.net(xb)
            self.tekfac_outputs(out)
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(out, yb))
            opt.step()

        def configure_optimizers(self):
            return tekfac.TEKFAC(self.net, lr=0.1, fisher=fisher, **EVERY_STEP)

    x, y = _classification_data()
    reference, net = _classifier(), _classifier()
    _plain_loop(reference, fisher, x, y, batch=8, accumulate=1, steps=2)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on data-loader workers
        trainer.fit(Classifier(net), torch.utils.data.DataLoader(list(zip(x, y)), batch_size=8))
    torch.testing.assert_close(flat(net), flat(reference), rtol=1e-10, atol=1e-12)


def test_lightning_backward_without_named_outputs_says_what_to_do():
    pytest.importorskip("lightning.pytorch")
    from tekfac.integrations.lightning import TekfacBackward

    with pytest.raises(RuntimeError, match=r"self\.tekfac_outputs\(outputs\)"):
        TekfacBackward().backward(torch.tensor(1.0))


# ------------------------------------------------------------------------- the examples
@pytest.mark.parametrize(("script", "argv"), [
    ("huggingface_gpt2", ["--steps", "3"]),
    ("huggingface_gpt2", ["--steps", "3", "--trainer"]),
    ("lightning_digits", ["--max-steps", "4"]),
    ("accelerate_digits", ["--epochs", "1"]),
])
def test_examples_run(script, argv, monkeypatch):
    if script == "huggingface_gpt2":
        try:
            load_fortunes(None)
        except DataError as e:  # the corpus is a system package (scripts/setup.sh)
            pytest.skip(f"no fortunes corpus: {e}")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delitem(sys.modules, script, raising=False)
    losses = __import__(script).main(argv)
    assert len(losses) >= 3 and torch.isfinite(torch.tensor(losses)).all()
