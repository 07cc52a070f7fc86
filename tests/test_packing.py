"""packing and padding_free keep rows apart: a packed batch, made by TRL's own collator from the job's own
trainer, gives each row the loss it has alone (fp32, CPU, SDPA attention); use_fa2 is refused where it
cannot run."""

from __future__ import annotations

import pytest
import torch

from conftest import make_job, sample_request


def row_losses(model, input_ids, position_ids, labels, cache: bool | None = None):
    """Summed token loss of each row in a packed [1, L] batch: once packed, once for each row alone."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [input_ids.shape[1]]

    def losses(logits, lab):
        return torch.nn.functional.cross_entropy(logits[0, :-1], lab[0, 1:], ignore_index=-100, reduction="sum")

    with torch.no_grad():
        kwargs = {} if cache is None else {"use_cache": cache}
        packed = model(input_ids=input_ids, position_ids=position_ids, **kwargs).logits
        pairs = []
        for a, b in zip(starts, starts[1:]):
            if b - a < 2 or (labels[0, a + 1:b] == -100).all():
                continue
            alone = model(input_ids=input_ids[:, a:b]).logits
            pairs.append((losses(packed[:, a:b], labels[:, a:b]).item(), losses(alone, labels[:, a:b]).item()))
    return pairs


@pytest.mark.parametrize("option", ["packing", "padding_free"])
def test_packed_rows_have_their_own_loss(local_dir, tiny_root, option):
    job = make_job(local_dir, sample_request(tiny_root, hyperparameters={option: True, "batch_size": 8,
                                                                         "max_length": 128}))
    prep = job.preflight()
    trainer = job.build_trainer(job.load_model(prep.tokenizer), prep)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # one row of several rows
    model = trainer.model.eval()
    pairs = row_losses(model, batch["input_ids"], batch["position_ids"], batch["labels"])
    assert len(pairs) >= 4  # several rows were packed together
    for packed, alone in pairs:
        assert packed == pytest.approx(alone, abs=1e-4)
    # Rows stay apart because transformers masks by position ids when no KV cache is passed (the Trainer sets
    # use_cache false for training). The same batch with a cache, Gemma 3's default outside training: the rows
    # after the first see the rows before them, so this test can tell.
    leaked = row_losses(model, batch["input_ids"], batch["position_ids"], batch["labels"], cache=True)
    assert max(abs(p - a) for p, a in leaked[1:]) > 1e-2


def test_use_fa2_is_refused_on_a_cpu(local_dir, tiny_root):
    from runtime.errors import PermanentError

    job = make_job(local_dir, sample_request(tiny_root, hyperparameters={"use_fa2": True, "max_length": 128}))
    with pytest.raises(PermanentError, match=r"use_fa2: FlashAttention 2 needs an NVIDIA GPU"):
        job.preflight()
