"""A Hugging Face GPT-2 (random weights from a small config) trained with tekfac on the
fortunes corpus, characters as tokens, in a plain loop or with the HF ``Trainer``.

    python examples/huggingface_gpt2.py --steps 100
    python examples/huggingface_gpt2.py --steps 100 --trainer

What a GPT-2 needs (README, "Use with"):

* its ``Conv1D`` projections get Kronecker blocks (``optimizer.describe()`` shows them);
* ``position_ids`` expanded to the batch (``batch_position_ids``, or the Trainer's
  ``expand_position_ids=True``): the default ``(1, T)`` positions are broadcast over the
  batch, which the position embedding's block cannot see;
* the MC Fisher's labels in the loss's layout: ``causal_lm_outputs`` gives the flattened
  logits and the mask of the positions with a next token (``-100`` labels are left out).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
from transformers.utils import logging

import tekfac
from tekfac.bench.data import CHARACTERS, load_fortunes
from tekfac.integrations.huggingface import (
    TekfacTrainer,
    batch_position_ids,
    causal_lm_outputs,
)


def model(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 of width 64 over the fortunes characters."""
    torch.manual_seed(seed)
    vocab = len(CHARACTERS)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(config)


def optimizer(net: GPT2LMHeadModel) -> tekfac.TEKFAC:
    return tekfac.TEKFAC(net, lr=0.02, damping=1e-3, kl_clip=1e-3, cov_update_freq=5,
                         eigen_update_freq=20, seed=0)


class Windows(Dataset):
    """Character windows as the ``{"input_ids", "labels"}`` a causal LM takes (the model
    shifts the labels itself)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def train_loop(net: GPT2LMHeadModel, opt: tekfac.TEKFAC, windows: torch.Tensor, steps: int,
               batch: int = 16) -> list[float]:
    """A plain loop; the losses of its steps."""
    losses = []
    for step in range(steps):
        ids = windows[(step * batch) % (len(windows) - batch):][:batch]
        out = net(input_ids=ids, labels=ids, position_ids=batch_position_ids(ids))
        outputs, mask = causal_lm_outputs(out.logits, ids)
        opt.zero_grad()
        opt.backward(out.loss, outputs, mask=mask)
        opt.step()
        losses.append(out.loss.item())
    return losses


def train_trainer(net: GPT2LMHeadModel, opt: tekfac.TEKFAC, windows: torch.Tensor, steps: int,
                  batch: int = 16) -> list[float]:
    """The same with ``TekfacTrainer``; the losses it logged."""
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                                 logging_steps=1, save_strategy="no", report_to=[],
                                 max_grad_norm=0.0, use_cpu=True, disable_tqdm=True,
                                 lr_scheduler_type="constant")
        trainer = TekfacTrainer(model=net, args=args, train_dataset=Windows(windows),
                                optimizers=(opt, None), expand_position_ids=True)
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--trainer", action="store_true", help="train with TekfacTrainer")
    parser.add_argument("--data-dir", default=None, help="a folder with the fortunes files")
    args = parser.parse_args(argv)
    logging.set_verbosity_error()
    windows = load_fortunes(args.data_dir).train_x
    net = model()
    opt = optimizer(net)
    print(opt.describe())
    losses = (train_trainer if args.trainer else train_loop)(net, opt, windows, args.steps)
    print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f} after {len(losses)} steps")
    return losses


if __name__ == "__main__":
    main()
