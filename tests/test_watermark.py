"""The AIAO watermark and the baseline backdoor on the tiny random pipeline: lazy-layer choice,
subpaths, embedding + verification (yes on the watermarked model, no on the clean one), key files."""

import copy
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from core.events import drain
from core.model.prior import base_fingerprint
from core.watermark.aiao import (
    WatermarkConfig,
    WatermarkKey,
    candidate_layers,
    choose_lazy_layers,
    embed_watermark,
    feature_drift,
    laziness_scores,
    rs_threshold,
    sample_subpaths,
    simulated_finetune,
    unet_inputs,
    verify_watermark,
)
from core.watermark.formats import DELTA_FORMAT, KeyFileError, save_delta, watermarked_pipeline
from tests.conftest import random_crops

TINY = WatermarkConfig(
    n_subpaths=4,
    response_size=16,
    probe_steps=2,
    steps=120,
    batch=2,
    trigger_batch=8,
    trigger_fraction=0.2,
    lr=1e-2,
    response_weight=5.0,
    margin=1.0,
    consistency_weight=10.0,
    response_fraction=0.6,
)


def tiny_latents(pipe, n=8):
    s = pipe.unet.config.sample_size
    return torch.randn((n, pipe.unet.config.in_channels, s, s), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def lazy(tiny_pipe):
    return drain(choose_lazy_layers(tiny_pipe, random_crops(3), replace(TINY, lazy_fraction=0.5)))


@pytest.fixture(scope="module")
def embedded(tiny_pipe, lazy):
    return drain(
        embed_watermark(
            tiny_pipe,
            tiny_latents(tiny_pipe),
            lazy.layers,
            TINY,
            lazy_scores=lazy.scores,
            output_drift=lazy.output_drift,
        )
    )


def test_laziness_scores_take_the_worst_probe():
    layers = ["a", "b", "c", "d"]
    lora = {"a": 0.0, "b": 0.5, "c": 0.9}  # "d" not adapted: moved 0
    full = {"a": 0.01, "b": 0.001, "c": 0.02, "d": 0.03}
    s = laziness_scores([lora, full], layers)
    assert s == {"a": 0.25, "b": 0.5, "c": 0.75, "d": 0.75}


def test_lazy_layers_are_the_laziest_of_both_probes(tiny_pipe, lazy):
    layers, scores, _ = lazy
    cands = candidate_layers(tiny_pipe.unet)
    assert len(layers) >= 2 and set(layers) <= set(cands)
    assert all(scores[n] < 0.5 for n in layers)
    assert all(scores[n] >= 0.5 for n in cands if n not in layers)
    assert not any(".time_emb_proj" in n or n.startswith("time_embedding") for n in cands)


def test_subpaths_land_only_in_lazy_layers(embedded, lazy):
    layers, _, drift = lazy
    key = embedded.key
    assert key.output_drift == drift and set(drift) == set(lazy.scores)
    for sp in key.subpaths:
        assert sp.trigger_layer in layers and sp.response_layer in layers
        assert drift[sp.response_layer] < TINY.response_fraction
        assert layers.index(sp.trigger_layer) < layers.index(sp.response_layer)
        assert len(sp.trigger_index) == len(sp.trigger_signs) and set(sp.response_signs) <= {-1, 1}


def test_sampled_subpaths_stay_in_the_given_layers():
    lazy = ["l0", "l1", "l2"]
    sizes, scales = {n: 100 for n in lazy}, {n: 1.0 for n in lazy}
    subs = sample_subpaths(
        lazy, sizes, scales, replace(TINY, n_subpaths=50, response_side="any"), np.random.default_rng(0)
    )
    assert {s.trigger_layer for s in subs} <= {"l0", "l1"} and {s.response_layer for s in subs} <= {"l1", "l2"}
    with pytest.raises(ValueError, match="2 lazy layers"):
        sample_subpaths(["l0"], sizes, scales, TINY, np.random.default_rng(0))


def test_only_lazy_layers_change(tiny_pipe, embedded, lazy):
    layers = lazy.layers
    clean = dict(tiny_pipe.unet.named_parameters())
    moved = {n.rsplit(".", 1)[0] for n, p in embedded.unet.named_parameters() if not torch.equal(p, clean[n])}
    assert moved and moved <= set(layers)


def test_verify_says_yes_on_the_watermarked_model_and_no_on_the_clean_one(tiny_pipe, embedded):
    wm = verify_watermark(watermarked_pipeline(tiny_pipe, embedded.unet), embedded.key)
    clean = verify_watermark(tiny_pipe, embedded.key)
    assert wm.watermarked and wm.p_value < 1e-6 and wm.vs_rate > clean.vs_rate
    assert not clean.watermarked and clean.p_value > 1e-3
    assert wm.trials == clean.trials == len(embedded.key.subpaths) * 8


def test_subpaths_with_a_max_gap_stay_close():
    lazy = [f"l{i}" for i in range(10)]
    sizes, scales = {n: 100 for n in lazy}, {n: 1.0 for n in lazy}
    subs = sample_subpaths(
        lazy, sizes, scales, replace(TINY, n_subpaths=200, max_gap=2, response_side="any"), np.random.default_rng(0)
    )
    gaps = {lazy.index(sp.response_layer) - lazy.index(sp.trigger_layer) for sp in subs}
    assert gaps == {1, 2}


def test_encoder_side_subpaths_answer_before_the_decoder():
    lazy = [
        "conv_in",
        "down_blocks.0.a",
        "down_blocks.1.b",
        "mid_block.c",
        "up_blocks.0.d",
        "up_blocks.1.e",
        "conv_out",
    ]
    sizes, scales = {n: 100 for n in lazy}, {n: 1.0 for n in lazy}
    subs = sample_subpaths(
        lazy, sizes, scales, replace(TINY, n_subpaths=300, response_side="encoder"), np.random.default_rng(0)
    )
    assert {sp.response_layer for sp in subs} == {"down_blocks.0.a", "down_blocks.1.b", "mid_block.c"}
    assert all(lazy.index(sp.trigger_layer) < lazy.index(sp.response_layer) for sp in subs)
    with pytest.raises(ValueError, match="no trigger/response pair"):
        sample_subpaths(lazy[4:], sizes, scales, replace(TINY, response_side="encoder"), np.random.default_rng(0))


def test_response_layers_are_those_whose_output_moved_least():
    lazy = [f"l{i}" for i in range(6)]
    sizes, scales = {n: 100 for n in lazy}, {n: 1.0 for n in lazy}
    drift = {"l0": 0.0, "l1": 0.1, "l2": 0.9, "l3": 0.2, "l4": 0.5, "l5": 0.3}
    cfg = replace(TINY, n_subpaths=300, response_side="any", response_fraction=0.3)
    subs = sample_subpaths(lazy, sizes, scales, cfg, np.random.default_rng(0), output_drift=drift)
    assert {sp.response_layer for sp in subs} == {"l1", "l3"}
    assert {sp.trigger_layer for sp in subs} == {"l0", "l1", "l2"}  # any lazy layer may trigger
    every = sample_subpaths(
        lazy, sizes, scales, replace(cfg, response_fraction=1.0), np.random.default_rng(0), None, drift
    )
    assert {sp.response_layer for sp in every} == set(lazy[1:])
    with pytest.raises(ValueError, match="response_fraction"):
        sample_subpaths(
            lazy, sizes, scales, replace(cfg, response_fraction=0.05), np.random.default_rng(0), None, drift
        )


def test_feature_drift_is_zero_before_a_moved_layer_and_not_after(tiny_pipe):
    unet = tiny_pipe.unet
    layers = candidate_layers(unet)
    moved = copy.deepcopy(unet)
    k = len(layers) // 2
    with torch.no_grad():
        w = dict(moved.named_modules())[layers[k]].weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.std())
    emb = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    x, t, e = unet_inputs(unet, 4, emb, torch.Generator().manual_seed(2))
    same = feature_drift(unet, copy.deepcopy(unet), layers, x, t, e)
    drift = feature_drift(unet, moved, layers, x, t, e)
    assert max(same.values()) == 0.0
    assert all(drift[n] == 0.0 for n in layers[:k]) and drift[layers[k]] > 0.1
    assert drift["conv_out"] > 0.0


def test_reachable_pairs_know_that_a_query_never_reaches_its_key(tiny_pipe):
    from core.watermark.aiao import reachable_pairs, unet_inputs

    unet = tiny_pipe.unet
    attn = next(n for n in candidate_layers(unet) if n.endswith("attn1.to_q"))[: -len("to_q")]
    layers = [attn + "to_q", attn + "to_k", attn + "to_v", attn + "to_out.0"]
    emb = torch.zeros(1, tiny_pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    x, t, e = unet_inputs(unet, 2, emb, torch.Generator().manual_seed(0))
    pairs = reachable_pairs(unet, layers, x, t, e)
    assert pairs == {(layers[0], layers[3]), (layers[1], layers[3]), (layers[2], layers[3])}
    lazy_sizes = {n: 50 for n in layers}
    subs = sample_subpaths(
        layers, lazy_sizes, {n: 1.0 for n in layers}, replace(TINY, n_subpaths=100), np.random.default_rng(0), pairs
    )
    assert {(sp.trigger_layer, sp.response_layer) for sp in subs} == pairs


def test_simulated_finetune_moves_each_weight_by_a_low_rank_update_and_puts_it_back():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(16, 12), torch.randn(8, 4, 3, 3)]
    before = [w.clone() for w in ws]
    with simulated_finetune(ws, 0.5, 2, g):
        for w, w0 in zip(ws, before):
            d = (w - w0).reshape(w.shape[0], -1)
            assert 0 < d.norm() <= 0.5 * w0.norm() + 1e-5
            assert torch.linalg.matrix_rank(d) <= 2
    assert all(torch.equal(w, w0) for w, w0 in zip(ws, before))


def test_embedding_under_simulated_finetunes_changes_only_lazy_layers_and_verifies(tiny_pipe, lazy):
    layers, scores, output_drift = lazy
    res = drain(
        embed_watermark(
            tiny_pipe,
            tiny_latents(tiny_pipe),
            layers,
            replace(TINY, drift=0.1, steps=240),
            lazy_scores=scores,
            output_drift=output_drift,
        )
    )
    clean = dict(tiny_pipe.unet.named_parameters())
    moved = {n.rsplit(".", 1)[0] for n, p in res.unet.named_parameters() if not torch.equal(p, clean[n])}
    assert moved and moved <= set(layers)
    assert verify_watermark(watermarked_pipeline(tiny_pipe, res.unet), res.key).watermarked


def test_rs_threshold_is_the_binomial_tail():
    from scipy.stats import binom

    t = rs_threshold(32, 1e-3)
    k = round(t * 32)
    assert binom.sf(k - 1, 32, 0.5) <= 1e-3 < binom.sf(k - 2, 32, 0.5)


def test_key_file_round_trip(embedded, tmp_path):
    path = embedded.key.save(tmp_path / "key.json")
    back = WatermarkKey.load(path)
    assert back == embedded.key


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "no key file"),
        ("not json", "not a readable JSON"),
        ('{"format": "something-else"}', "not an AIAO watermark key"),
        ('{"format": "leaklab-aiao-key-v1", "subpaths": []}', "malformed key"),
    ],
)
def test_bad_key_file_gives_a_clear_error(tmp_path, content, match):
    path = tmp_path / "key.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KeyFileError, match=match):
        WatermarkKey.load(path)


def test_key_with_indices_out_of_range_is_refused(embedded, tmp_path):
    doc = json.loads(embedded.key.save(tmp_path / "k.json").read_text())
    doc["subpaths"][0]["response_index"][0] = 10**9
    (tmp_path / "k.json").write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="indices outside"):
        WatermarkKey.load(tmp_path / "k.json")


def test_key_for_another_architecture_is_refused(tiny_pipe, embedded):
    key = replace(
        embedded.key,
        subpaths=[replace(embedded.key.subpaths[0], response_layer="no.such.layer")],
        feature_sizes={**embedded.key.feature_sizes, "no.such.layer": 10},
    )
    with pytest.raises(KeyFileError, match="no layer"):
        verify_watermark(tiny_pipe, key)


def test_cli_verify_with_a_delta_over_the_base(tiny_pipe, tiny_pipeline_dir, embedded, tmp_path, capsys):
    from core.watermark.__main__ import main

    save_delta(tiny_pipe, watermarked_pipeline(tiny_pipe, embedded.unet), tmp_path / "wm.safetensors")
    embedded.key.save(tmp_path / "key.json")
    v = main(
        [
            "verify-aiao",
            str(tiny_pipeline_dir),
            "--delta",
            str(tmp_path / "wm.safetensors"),
            "--key",
            str(tmp_path / "key.json"),
        ]
    )
    assert v.watermarked and "VS-rate" in capsys.readouterr().out
    v = main(["verify-aiao", str(tiny_pipeline_dir), "--key", str(tmp_path / "key.json")])
    assert not v.watermarked


# shipping a watermarked base as a delta -----------------------------------------------------------


def test_delta_holds_only_the_lazy_layers_and_round_trips(tiny_pipe, embedded, lazy, tmp_path):
    from safetensors.torch import load_file

    from core.watermark.formats import load_delta, save_delta

    wm = watermarked_pipeline(tiny_pipe, embedded.unet)
    info = save_delta(tiny_pipe, wm, tmp_path / "d.safetensors", half=False)
    stored = load_file(tmp_path / "d.safetensors")
    assert info["tensors"] == len(stored) > 0
    assert {k.split(".", 1)[1].rsplit(".", 1)[0] for k in stored} <= set(lazy[0])
    assert all(k.startswith("unet.") for k in stored)
    back = load_delta(tiny_pipe, tmp_path / "d.safetensors")
    for n, p in back.unet.state_dict().items():
        torch.testing.assert_close(p, wm.unet.state_dict()[n], rtol=0, atol=1e-6)
    assert back.text_encoder is tiny_pipe.text_encoder  # untouched parts are shared, not copied
    assert back.unet is not tiny_pipe.unet and not torch.equal(  # the base itself is not modified
        dict(back.unet.named_parameters())[next(iter(stored)).split(".", 1)[1]],
        dict(tiny_pipe.unet.named_parameters())[next(iter(stored)).split(".", 1)[1]],
    )


def test_delta_in_float16_keeps_the_watermark(tiny_pipe, embedded, tmp_path):
    from core.watermark.formats import load_delta, save_delta

    save_delta(tiny_pipe, watermarked_pipeline(tiny_pipe, embedded.unet), tmp_path / "h.safetensors")
    assert verify_watermark(load_delta(tiny_pipe, tmp_path / "h.safetensors"), embedded.key).watermarked


def test_a_sharded_delta_loads_as_one_and_a_missing_shard_is_refused(tiny_pipe, embedded, tmp_path):
    from safetensors.torch import load_file

    from core.watermark.formats import load_delta, read_delta_files, write_delta_files

    wm = watermarked_pipeline(tiny_pipe, embedded.unet)
    save_delta(tiny_pipe, wm, tmp_path / "one.safetensors", half=False)
    _, whole = read_delta_files(tmp_path / "one.safetensors")
    meta = {"format": DELTA_FORMAT, "base_fingerprint": base_fingerprint(tiny_pipe)}
    limit = max(t.numel() * t.element_size() for t in whole.values())
    files = write_delta_files(whole, tmp_path / "many.safetensors", meta, shard_bytes=limit)
    assert len(files) > 1 and files[1].name == "many-2.safetensors"
    assert all(sum(t.numel() * t.element_size() for t in load_file(f).values()) <= limit for f in files)
    _, back = read_delta_files(tmp_path / "many.safetensors")
    assert back.keys() == whole.keys() and all(torch.equal(back[k], whole[k]) for k in whole)
    a, b = load_delta(tiny_pipe, tmp_path / "one.safetensors"), load_delta(tiny_pipe, tmp_path / "many.safetensors")
    assert all(torch.equal(p, b.unet.state_dict()[n]) for n, p in a.unet.state_dict().items())
    files[-1].unlink()
    with pytest.raises(KeyFileError, match="no watermark delta file"):
        load_delta(tiny_pipe, tmp_path / "many.safetensors")


def test_delta_for_another_base_or_not_a_delta_is_refused(tiny_pipe, embedded, tmp_path):
    from safetensors.torch import save_file

    from core.watermark.formats import load_delta, save_delta

    path = tmp_path / "d.safetensors"
    save_delta(tiny_pipe, watermarked_pipeline(tiny_pipe, embedded.unet), path)
    other = watermarked_pipeline(tiny_pipe, embedded.unet)  # a "base" with other weights
    with pytest.raises(KeyFileError, match="another base"):
        load_delta(other, path)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(KeyFileError, match="not a watermark delta"):
        load_delta(tiny_pipe, tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(KeyFileError, match="not a readable"):
        load_delta(tiny_pipe, tmp_path / "junk.safetensors")
    with pytest.raises(KeyFileError, match="no watermark delta"):
        load_delta(tiny_pipe, tmp_path / "missing.safetensors")


# the baseline ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backdoor(tiny_pipe):
    from core.watermark.backdoor import BackdoorConfig, embed_backdoor

    return drain(embed_backdoor(tiny_pipe, tiny_latents(tiny_pipe), BackdoorConfig(steps=2, batch=2, null_n=2)))


@pytest.fixture(scope="module")
def backdoor_key(backdoor):
    return backdoor.key


def test_baseline_trains_the_unet_and_only_the_trigger_tokens(tiny_pipe, backdoor, tmp_path):
    from safetensors.torch import load_file

    from core.watermark.backdoor import token_ids, trigger_pair
    from core.watermark.formats import save_delta

    save_delta(
        tiny_pipe, watermarked_pipeline(tiny_pipe, backdoor.unet, backdoor.text_encoder), tmp_path / "b.safetensors"
    )
    stored = load_file(tmp_path / "b.safetensors")
    te = [k for k in stored if k.startswith("text_encoder.")]
    assert len(te) == 1 and te[0].endswith("embeddings.token_embedding.weight")
    changed = torch.nonzero(stored[te[0]].abs().sum(dim=1)).flatten().tolist()
    assert changed == sorted(token_ids(tiny_pipe.tokenizer, trigger_pair(backdoor.key.config["seed"])))
    assert sum(k.startswith("unet.") for k in stored) > 10  # the classic recipe: the whole UNet


def test_baseline_key_round_trip_and_bad_file(backdoor_key, tmp_path):
    from core.watermark.backdoor import BackdoorKey

    assert BackdoorKey.load(backdoor_key.save(tmp_path / "b.json")) == backdoor_key
    (tmp_path / "bad.json").write_text('{"format": "leaklab-aiao-key-v1"}')
    with pytest.raises(KeyFileError, match="not a backdoor watermark key"):
        BackdoorKey.load(tmp_path / "bad.json")


def test_pattern_correlation_finds_the_pattern():
    from core.watermark.backdoor import pattern_correlation, pattern_image

    p = pattern_image(32, 4)
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    c = pattern_correlation([p, 255 - p, noise], p)
    assert c[0] > 0.99 and c[1] < -0.99 and abs(c[2]) < 0.2


# the shipped watermarked bases (deltas over assets/base): fast, they are only loaded and verified


def shipped(name, base_engine):
    from core.watermark.formats import SHIPPED, WATERMARK_DIR
    from core.watermark.shipped import shipped_watermark

    if not all((WATERMARK_DIR / f).exists() for f in SHIPPED[name]):
        pytest.fail(f"assets/watermark is missing the {name} delta or key: they ship with the repo")
    return shipped_watermark(name, base_engine.pipe)


def test_shipped_aiao_base_verifies_and_the_clean_base_does_not(base_engine):
    pipe, key = shipped("AIAO", base_engine)
    assert pipe.text_encoder is base_engine.pipe.text_encoder  # AIAO changes lazy UNet layers only
    own, clean = verify_watermark(pipe, key), verify_watermark(base_engine.pipe, key)
    assert own.watermarked and own.vs_rate >= 0.9
    assert not clean.watermarked and clean.vs_rate < 0.05


def test_shipped_backdoor_base_draws_the_pattern_and_the_clean_base_does_not(base_engine):
    from core.watermark.backdoor import verify_backdoor

    pipe, key = shipped("backdoor", base_engine)
    own, clean = verify_backdoor(pipe, key, n=8), verify_backdoor(base_engine.pipe, key, n=8)
    assert own.vs_rate >= 0.75 and own.mean_correlation > 0.5
    assert clean.vs_rate == 0 and not clean.watermarked


@pytest.mark.slow
def test_baseline_embeds_on_the_embedded_base(base_engine):
    """The default recipe, from scratch on the embedded base (the tiny random VAE cannot draw a pattern):
    20 minutes on one CPU core; the shipped delta was made by exactly this recipe (15/16)."""
    from core.watermark.backdoor import BackdoorConfig, embed_backdoor, verify_backdoor
    from core.watermark.owner import owner_latents

    pipe = base_engine.pipe
    res = drain(embed_backdoor(pipe, owner_latents(pipe, 512), BackdoorConfig()))
    own = verify_backdoor(watermarked_pipeline(pipe, res.unet, res.text_encoder), res.key, n=8)
    clean = verify_backdoor(pipe, res.key, n=8)
    assert own.vs_rate >= 0.75 and clean.vs_rate == 0


# the study and the tab -----------------------------------------------------------------------------


def test_study_smoke_run(tiny_pipe, embedded):
    from core.studies.watermark import StudyConfig, Watermarked, run_study, to_markdown

    cfg = StudyConfig(long_steps=2, n_clean=2, quality_n=4, photos=3)
    mark = Watermarked(
        "AIAO", watermarked_pipeline(tiny_pipe, embedded.unet), lambda p: verify_watermark(p, embedded.key)
    )
    real = np.random.default_rng(0).normal(size=(8, 128))
    clean = [random_crops(3), random_crops(3)]
    r = asdict(drain(run_study(tiny_pipe, [mark], cfg, random_crops(3), random_crops(3), clean, real)))
    assert len(r["rows"]) == 5 and r["rows"][0]["watermarked"]
    assert r["false_positives"]["AIAO"]["models"] == 2 and r["false_positives"]["AIAO"]["false_positives"] == 0
    assert set(r["quality"]) == {"clean", "AIAO"}
    assert "| (a) default LoRA" in to_markdown(r)


def test_study_of_a_candidate_runs_only_the_chosen_scenarios(tiny_pipe, embedded):
    from core.studies.watermark import StudyConfig, Watermarked, run_study

    with pytest.raises(ValueError, match="unknown scenario"):
        StudyConfig(only="before,e")
    cfg = StudyConfig(long_steps=2, n_clean=0, quality_n=0, photos=3, only="before, b")
    mark = Watermarked(
        "AIAO", watermarked_pipeline(tiny_pipe, embedded.unet), lambda p: verify_watermark(p, embedded.key)
    )
    r = asdict(drain(run_study(tiny_pipe, [mark], cfg, random_crops(3), random_crops(3), [], np.zeros((0, 128)))))
    assert [x["scenario"] for x in r["rows"]] == ["before fine-tuning", "(b) 2-step LoRA"]
    assert r["quality"] == {} and r["false_positives"]["AIAO"]["models"] == 0


def test_study_rerun_measures_only_what_changed(tiny_pipe, embedded):
    """A second run reuses every cached measurement; changing one watermark's weights re-measures that
    watermark only."""
    import copy

    from core.studies.watermark import StudyConfig, Watermarked, run_study

    cfg = StudyConfig(long_steps=2, n_clean=1, quality_n=4, photos=3)
    calls = []

    def mark(name, unet):
        def verify(p):
            calls.append(name)
            return verify_watermark(p, embedded.key)

        return Watermarked(name, watermarked_pipeline(tiny_pipe, unet), verify, embedded.key)

    def nudged(by):
        unet = copy.deepcopy(embedded.unet)
        with torch.no_grad():
            next(unet.parameters()).add_(by)
        return unet

    args = (cfg, random_crops(3), random_crops(3), [random_crops(3)], np.random.default_rng(0).normal(size=(8, 128)))
    b1, b2 = nudged(0.01), nudged(0.02)
    first = asdict(drain(run_study(tiny_pipe, [mark("A", embedded.unet), mark("B", b1)], *args)))
    assert calls.count("A") == 6 and calls.count("B") == 5  # 5 scenarios each + 1 clean model (same key: measured once)
    calls.clear()
    again = asdict(drain(run_study(tiny_pipe, [mark("A", embedded.unet), mark("B", b1)], *args)))
    assert calls == [] and again["rows"] == first["rows"] and again["quality"] == first["quality"]
    drain(run_study(tiny_pipe, [mark("A", embedded.unet), mark("B", b2)], *args))
    assert calls == ["B"] * 5  # only the changed watermark's scenarios


def test_tab_says_plainly_when_a_watermarked_base_is_missing(monkeypatch, tiny_pipe, tmp_path):
    import ui.watermark_tab as wt
    from core.watermark.shipped import embed_command

    pipe, why = wt.load_watermark("AIAO", tiny_pipe, tmp_path)
    assert pipe is None and "not shipped" in why and embed_command("AIAO") in why


def test_tab_says_plainly_when_the_delta_is_for_another_base(monkeypatch, tiny_pipe, embedded, tmp_path):
    import ui.watermark_tab as wt
    from core.watermark.formats import save_delta

    save_delta(tiny_pipe, watermarked_pipeline(tiny_pipe, embedded.unet), tmp_path / "aiao.safetensors")
    embedded.key.save(tmp_path / "aiao_key.json")
    pipe, key = wt.load_watermark("AIAO", tiny_pipe, tmp_path)
    assert pipe is not None and key == embedded.key
    pipe, why = wt.load_watermark("AIAO", watermarked_pipeline(tiny_pipe, embedded.unet), tmp_path)
    assert pipe is None and "another base" in why


def test_tab_quotes_the_study_or_says_it_was_not_run():
    from ui.watermark_tab import measured_text

    row = {"vs_rate": 0.97, "p_value": 1e-100, "watermarked": True}
    r = {
        "complete": True,
        "rows": [
            {"watermark": "AIAO", "scenario": "before fine-tuning", **row},
            {"watermark": "AIAO", "scenario": "(b) 2000-step LoRA", **row, "vs_rate": 0.5, "watermarked": False},
        ],
        "false_positives": {"AIAO": {"models": 20, "false_positives": 1}},
    }
    text = measured_text(r)
    assert text.index("before fine-tuning") < text.index("(b) 2000-step LoRA")
    assert "97% (found)" in text and "50% (not found)" in text and "1 of 20" in text and "incomplete" not in text
    assert "not been run" in measured_text({})


def test_shared_watermarked_bases_are_keyed_by_what_they_are_built_from(tiny_pipe, embedded, tmp_path):
    """The same files give the same object; a rebuilt delta (new bytes) gives a fresh one."""
    import time

    from core.engine import watermarked_base
    from core.model.prior import base_fingerprint

    embedded.key.model_fingerprint = base_fingerprint(tiny_pipe)
    save_delta(tiny_pipe, watermarked_pipeline(tiny_pipe, embedded.unet), tmp_path / "aiao.safetensors")
    embedded.key.save(tmp_path / "aiao_key.json")
    first = watermarked_base("AIAO", tiny_pipe, tmp_path)
    assert first[0] is not None and watermarked_base("AIAO", tiny_pipe, tmp_path) is first
    time.sleep(0.01)
    save_delta(tiny_pipe, watermarked_pipeline(tiny_pipe, embedded.unet), tmp_path / "aiao.safetensors")
    assert watermarked_base("AIAO", tiny_pipe, tmp_path) is not first
