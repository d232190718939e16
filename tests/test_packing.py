"""Packing: `data.packing: isolated` (the meaning of `true`) keeps the rows of a pack apart — each row's token
losses in a pack equal the same row's alone — through every path that calls the model (the full and the
chunked loss); `shared` lets them attend to each other; the setting, its old bool spelling, and what resume
compares; models that cannot keep rows apart are refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ds_finetune import data
from ds_finetune.config import load_config
from ds_finetune.data_config import DataConfig
from ds_finetune.fingerprint import changed_exact_keys, config_fingerprint
from ds_finetune.data import IGNORE_INDEX, collate, plan_units
from ds_finetune.errors import UserError
from ds_finetune.loss import ChunkedLoss, full_loss_sum, model_inputs
from ds_finetune.model import check_isolated_packing
from ds_finetune.sampler import epoch_permutation

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    tok = data.load_tokenizer(str(REPO / "assets" / "tiny-tokenizer"))
    return data.prepare_data(DataConfig(path=str(REPO / "data" / "tiny" / "chat.jsonl"), format="chat",
                                        max_length=128, cache_dir=str(tmp_path_factory.mktemp("cache"))), tok)


def tiny_llama(attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM
    inline = dict(load_config(TINY_CONFIG).model.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(inline.pop("model_type"), **inline),
                                             attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def packs_of_several_rows(d, n: int = 3) -> list[np.ndarray]:
    units = plan_units(d, epoch_permutation(d.num_rows, 7, 0), True, 128)
    several = [u for u in units if len(u) >= 3]
    assert len(several) >= n  # the tiny chat rows are short: most packs hold several rows
    return several[:n]


def token_losses(model, batch) -> torch.Tensor:
    """Per-position loss of predicting the next token (0 where the next token is not a target)."""
    with torch.no_grad():
        logits = model(**model_inputs(batch.input_ids, batch.attention_mask, batch.position_ids, batch.facts)).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch.labels[:, 1:], ignore_index=IGNORE_INDEX,
                           reduction="none")


def per_row_alone(model, d, unit) -> list[torch.Tensor]:
    """Each row of `unit` through the model alone (no packing code involved): its token losses."""
    return [token_losses(model, collate(d, [np.array([i])], 2))[0] for i in unit]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_row_of_an_isolated_pack_has_the_losses_it_has_alone(chat, attn):
    model = tiny_llama(attn)
    units = packs_of_several_rows(chat)  # padded: the packs differ in length
    isolated = token_losses(model, collate(chat, units, 2, isolate=True))
    shared = token_losses(model, collate(chat, units, 2))
    crossed = 0
    for j, unit in enumerate(units):
        start = 0
        for k, alone in enumerate(per_row_alone(model, chat, unit)):
            n = len(alone) + 1  # tokens of the row
            # A row's last position predicts the next row's first token, never a target: 0 either way.
            got = isolated[j, start:start + n - 1]
            torch.testing.assert_close(got, alone, rtol=0, atol=1e-5)
            if k > 0:
                crossed += not torch.allclose(shared[j, start:start + n - 1], alone, rtol=0, atol=1e-5)
            start += n
    # Shared packing really does let later rows see earlier ones: the comparison above can tell.
    assert crossed > 0


@pytest.mark.parametrize("loss", ["full", "chunked"])
def test_the_loss_of_an_isolated_pack_is_the_sum_of_its_rows_alone(chat, loss):
    model = tiny_llama("sdpa")
    loss_fn = full_loss_sum if loss == "full" else ChunkedLoss(model, 16)
    units = packs_of_several_rows(chat)
    with torch.no_grad():
        packed = float(loss_fn(model, *collate(chat, units, 2, isolate=True)))
        alone = sum(float(loss_fn(model, *collate(chat, [np.array([i])], 2))) for u in units for i in u)
        shared = float(loss_fn(model, *collate(chat, units, 2)))
    assert packed == pytest.approx(alone, rel=1e-5)
    assert shared != pytest.approx(alone, rel=1e-5)


def test_isolated_collation_restarts_positions_at_every_row_and_passes_no_mask(chat):
    units = packs_of_several_rows(chat, 2)
    batch = collate(chat, units, 2, isolate=True)
    assert batch.attention_mask is None
    plain = collate(chat, units, 2)
    assert plain.position_ids is None
    assert torch.equal(batch.input_ids, plain.input_ids) and torch.equal(batch.labels, plain.labels)
    for j, unit in enumerate(units):
        expected = [p for i in unit for p in range(int(chat.lengths[i]))]
        assert batch.position_ids[j, :len(expected)].tolist() == expected
        pad = batch.input_ids.shape[1] - len(expected)
        assert batch.position_ids[j, len(expected):].tolist() == list(range(pad))


VARLEN = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def transformers_boundaries(position_ids) -> tuple[list[int], int]:
    """What transformers' flash attention reads from position ids in every layer when not given them."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
    (cu_q, cu_k), (longest_q, longest_k) = prepare_fa_kwargs_from_position_ids(position_ids)
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and int(longest_q) == int(longest_k)
    return cu_q.tolist(), int(longest_q)


@pytest.mark.parametrize("rows", [1, 3])
def test_the_flash_boundaries_built_on_the_host_are_those_transformers_reads_from_the_positions(chat, rows):
    """The padding is a segment of its own where a row is shorter than the batch; several rows flatten."""
    batch = collate(chat, packs_of_several_rows(chat, rows), 2, isolate=True)
    inputs = model_inputs(batch.input_ids, None, batch.position_ids, batch.facts)
    cu, longest = transformers_boundaries(batch.position_ids)
    assert inputs["cu_seq_lens_q"] is inputs["cu_seq_lens_k"] and inputs["cu_seq_lens_q"].dtype == torch.int32
    assert inputs["cu_seq_lens_q"].tolist() == cu and inputs["max_length_q"] == inputs["max_length_k"] == longest
    assert type(longest) is int and len(cu) > rows + 1  # the packs hold several rows each
    assert not set(VARLEN) & set(model_inputs(*collate(chat, packs_of_several_rows(chat, rows), 2)[:3]))


def test_the_flash_boundaries_reach_every_attention_layer(chat):
    """Through the model's forward (both loss paths) into the attention function of every layer, which
    flash attention would take instead of reading the positions; sdpa, eager and flex take and ignore them."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        seen.append({k: kwargs.get(k) for k in VARLEN})
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("recording_sdpa", recording_sdpa)
    model = tiny_llama("recording_sdpa")
    batch = collate(chat, packs_of_several_rows(chat, 1), 2, isolate=True)
    cu, longest = transformers_boundaries(batch.position_ids)
    with torch.no_grad():
        full_loss_sum(model, *batch), ChunkedLoss(model, 16)(model, *batch)
    assert len(seen) == 2 * model.config.num_hidden_layers
    for kwargs in seen:
        assert kwargs["cu_seq_lens_q"].tolist() == kwargs["cu_seq_lens_k"].tolist() == cu
        assert kwargs["max_length_q"] == kwargs["max_length_k"] == longest


# ------------------------------------------------------------------------------------------- settings

@pytest.mark.parametrize("value, meaning", [(True, "isolated"), (False, "none"), ("isolated", "isolated"),
                                            ("shared", "shared"), ("none", "none")])
def test_packing_takes_the_old_bools_and_the_three_kinds(value, meaning):
    cfg = DataConfig(path="x.jsonl", packing=value)
    assert cfg.packing == meaning and cfg.packs == (meaning != "none")


def test_a_packing_kind_that_does_not_exist_is_one_line_naming_the_choices():
    with pytest.raises(UserError) as info:
        load_config(TINY_CONFIG, ["data.packing=separate"])
    assert "data.packing" in info.value.message and "'shared'" in info.value.message
    assert "\n" not in info.value.message


def fingerprint(packing):
    return config_fingerprint(load_config(TINY_CONFIG, [f"data.packing={packing}"]), 8, "a" * 64)


def saved_before_isolation(packing: bool) -> dict:
    """A fingerprint as the version without isolated packing saved it: `data.packing` was a bool."""
    saved = fingerprint("false")
    saved["exact"]["data"]["packing"] = packing
    return saved


def test_resuming_an_old_packed_checkpoint_with_isolated_packing_is_refused():
    assert changed_exact_keys(saved_before_isolation(True), fingerprint("true")) == ["data.packing"]
    assert changed_exact_keys(saved_before_isolation(True), fingerprint("isolated")) == ["data.packing"]


def test_what_computes_as_before_resumes_old_checkpoints():
    assert changed_exact_keys(saved_before_isolation(True), fingerprint("shared")) == []
    assert changed_exact_keys(saved_before_isolation(False), fingerprint("false")) == []


def test_models_that_cannot_keep_packed_rows_apart_are_refused():
    from transformers import AutoConfig, AutoModelForCausalLM
    check_isolated_packing(tiny_llama("sdpa"), 4)
    mamba = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mamba", vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(UserError, match="MambaForCausalLM .*masking_utils.*data.packing: shared"):
        check_isolated_packing(mamba, 1)
    flash = tiny_llama("eager")
    flash.config._attn_implementation = "flash_attention_2"
    check_isolated_packing(flash, 1)
    with pytest.raises(UserError, match="flash_attention_2.*train.micro_batch_size=1"):
        check_isolated_packing(flash, 2)
