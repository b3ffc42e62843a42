"""Adaptation: the domain-centre back-end, the unseen-speaker gate, frozen lower layers and
the default refresh recipe, on real speech (vctk-4, speechocean762-train)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from voiceprint.engine import Engine, audio, gate
from voiceprint.engine.config import RefreshConfig
from voiceprint.engine.embedder import Embedder
from voiceprint.engine.encoders import create_encoder
from voiceprint.engine.errors import ConfigError, InvalidInput, TooShort
from voiceprint.engine.lowrank import LowRankUpdate
from voiceprint.engine.replay import balanced_shares, herding
from voiceprint.engine.metrics import eer
from voiceprint.engine.training import interpolate, train


def write_refresh_config(home: Path, **refresh) -> None:
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[refresh]"] + [f"{key} = {json.dumps(value)}" for key, value in refresh.items()]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def enroll(eng: Engine, files: dict[str, list[Path]]) -> None:
    items = [(speaker, path, None) for speaker, paths in files.items() for path in paths]
    failures = [r for r in eng.enroll_many(items) if isinstance(r, Exception) and not isinstance(r, TooShort)]
    assert not failures, failures


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- the domain centre --------------------------------------------------------------------


def small_population(tmp_path: Path, scoring: str = "") -> Path:
    """A home whose four vctk speakers may be calibrated (the product needs 30), so the
    centre's arithmetic can be checked on a set small enough to embed quickly."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[scoring]\nmin_calibration_speakers = 2\n" + scoring)
    return home


def test_domain_centre_is_exact_under_enrollment_removal_and_erasure(tmp_path, by_speaker):
    vctk, libri = by_speaker("vctk-4"), by_speaker("librispeech-test-other")
    with Engine.init(home=small_population(tmp_path)) as eng:
        enroll(eng, vctk)
        calibration = eng.calibrate()
        assert calibration.settings["centre"] is True
        version, through = eng.active_version().number, calibration.settings["cohort_through"]
        ids, speakers, vectors = eng.store.embeddings.version_embeddings(version)
        speakers, vectors = np.array(speakers), vectors.astype(np.float64)

        def expected(keep: np.ndarray) -> np.ndarray:  # the batch fit, from what was read at the start
            return vectors[keep].mean(axis=0)

        def centre() -> np.ndarray:
            return eng.recognizer.scoring(version).centre

        everyone = ids <= through
        assert np.abs(centre() - expected(everyone)).max() < 1e-9

        # Enrolled after the fit: outside the centre until the next calibration, so the
        # thresholds fitted on centred scores stay valid.
        name = sorted(libri)[0]
        enroll(eng, {name: libri[name][:2]})
        assert np.abs(centre() - expected(everyone)).max() < 1e-9

        # A removed utterance leaves it exactly.
        removed = int(ids[3])
        eng.remove_utterance(removed)
        kept = everyone & (ids != removed)
        assert np.abs(centre() - expected(kept)).max() < 1e-9
        assert np.abs(centre() - expected(everyone)).max() > 1e-6

        # So does an erased speaker, every one of their utterances.
        eng.erase_speaker("p226")
        assert np.abs(centre() - expected(kept & (speakers != "p226"))).max() < 1e-9

        # Another process computes the same centre from the database alone.
        with Engine.open(home=tmp_path / "home") as other:
            assert np.array_equal(other.recognizer.scoring(version).centre, centre())


def test_identify_and_verify_score_centred_cosines(tmp_path, by_speaker):
    vctk = by_speaker("vctk-4")
    probe = vctk["p225"][-1]
    with Engine.init(home=small_population(tmp_path)) as eng:
        enroll(eng, {s: paths[:-1] for s, paths in vctk.items()})
        uncalibrated = eng.identify(probe, top=4)
        eng.calibrate()
        version = eng.active_version()
        centre = eng.recognizer.scoring(version.number).centre
        embedding = eng.embedder(version).embed([audio.load(probe).samples])[0]
        found = eng.identify(probe, top=4)
        for hit in found.candidates:
            profile = eng.store.profiles.centroid(hit.speaker, version.number).mean
            assert hit.score == pytest.approx(float(unit(profile - centre) @ unit(embedding - centre)), abs=1e-5)
        # Before calibration the scores were plain cosines; centring spreads them apart.
        plain = {h.speaker: h.score for h in uncalibrated.candidates}
        assert plain["p225"] == pytest.approx(float(unit(eng.store.profiles.centroid("p225", 1).mean) @ unit(embedding)), abs=1e-5)
        assert found.decision == "p225"
        verified = eng.verify("p225", probe)
        assert verified.score == pytest.approx({h.speaker: h.score for h in found.candidates}["p225"], abs=1e-6)


def test_a_calibration_fitted_without_centring_keeps_plain_cosines(tmp_path, by_speaker):
    home = small_population(tmp_path, "centre = false\n")
    vctk = by_speaker("vctk-4")
    with Engine.init(home=home) as eng:
        enroll(eng, vctk)
        assert eng.calibrate().settings["centre"] is False
        assert eng.recognizer.scoring(1).centre is None


# -- the unseen-speaker slice of the gate ---------------------------------------------------


@dataclass(frozen=True)
class Utt:
    id: int
    speaker: str
    content_sha256: str


def test_unseen_speakers_are_chosen_by_name_for_good():
    names = [f"speaker-{i:03d}" for i in range(300)]
    unseen = gate.unseen_speakers(names, 0.1)
    assert 15 <= len(unseen) <= 45  # about a tenth
    assert gate.unseen_speakers(list(reversed(names)) + ["newcomer"], 0.1) >= unseen  # arrivals never reshuffle it
    lone = next(n for n in names if n in unseen)
    # A slice of one speaker measures nothing; a small home trains on everyone.
    assert gate.unseen_speakers([lone] + [n for n in names if n not in unseen][:20], 0.1) == set()
    assert gate.unseen_speakers(names, 0.0) == set()


def test_unseen_speakers_are_probed_but_never_trained_on():
    utts = [Utt(i, f"s{i % 6}", f"{(i * 2654435761) % 2**32:08x}" + "0" * 56) for i in range(60)]
    trainable, held = gate.split(utts, 0.3, unseen={"s0", "s1"})
    assert not {u.speaker for u in trainable} & {"s0", "s1"}
    assert {"s0", "s1"} <= {u.speaker for u in held}
    rest = {u.id for u in utts} - {u.id for u in trainable} - {u.id for u in held}
    assert rest and {u.speaker for u in utts if u.id in rest} == {"s0", "s1"}  # their centroids
    assert gate.split(utts, 0.3) == gate.split(utts, 0.3, unseen=set())


def test_the_gate_rejects_a_candidate_that_hurts_unseen_speakers():
    rng = np.random.default_rng(0)
    names = [f"s{i}" for i in range(8)]
    centres = unit(rng.normal(size=(8, 16)))
    speakers = [n for n in names for _ in range(6)]
    clean = unit(np.repeat(centres, 6, axis=0) + 0.25 * rng.normal(size=(48, 16)))
    held = np.tile([False] * 4 + [True] * 2, 8)
    unseen = {"s6", "s7"}
    parent = gate.gate_metrics(clean, speakers, held, set(), unseen)
    assert parent["unseen"]["speakers"] == 2 and parent["new"]["speakers"] == 6
    # The candidate learns its trained speakers better and smears the unseen ones.
    tighter = clean.copy()
    trained = ~np.isin(speakers, list(unseen))
    tighter[trained] = unit(np.repeat(centres, 6, axis=0)[trained] + 0.05 * rng.normal(size=(int(trained.sum()), 16)))
    tighter[~trained] = unit(tighter[~trained] + 1.5 * rng.normal(size=(12, 16)))
    candidate = gate.gate_metrics(tighter, speakers, held, set(), unseen)
    reasons = gate.decide(parent, candidate, RefreshConfig())
    assert any("on unseen speakers (the 2 held out of training)" in r for r in reasons), reasons


# -- frozen lower layers ------------------------------------------------------------------


def _vctk_training_data(by_speaker) -> tuple:
    """(parent, kept speech, speakers, replayed mask, heads): three vctk-4 files per speaker."""
    files = by_speaker("vctk-4")
    pairs = [(s, p) for s in sorted(files) for p in files[s][:3]]
    kept = [sp.samples for sp in audio.load_many([p for _, p in pairs])]
    speakers = [s for s, _ in pairs]
    parent = create_encoder("ge2e-lstm", pretrained=True)
    vectors = Embedder(parent, device="cpu").embed(kept)
    heads = {s: vectors[np.array(speakers) == s].mean(axis=0) for s in set(speakers)}
    return parent, kept, speakers, np.zeros(len(kept), dtype=bool), heads


def test_frozen_layers_keep_the_parents_weights_and_the_rest_learns(by_speaker):
    parent, kept, speakers, replayed, heads = _vctk_training_data(by_speaker)
    cfg = RefreshConfig(frozen_layers=2, steps=3, speakers_per_batch=4, utterances_per_speaker=2)

    candidate, stats = train(parent, kept, speakers, replayed, heads, cfg, "cpu")

    assert stats["frozen_layers"] == 2 and stats["steps"] == 3

    def moved(before, after) -> list[bool]:  # per layer: did any of its weights change?
        return [any(not torch.equal(p, q) for p, q in zip(b, a)) for b, a in zip(before.layer_groups(), after.layer_groups())]

    assert moved(parent, candidate) == [False, False, True, True]
    # The candidate is a plain module again: a later refresh of it with nothing frozen trains it all.
    child, _ = train(candidate, kept, speakers, replayed, heads, RefreshConfig(steps=1, speakers_per_batch=4, utterances_per_speaker=2), "cpu")
    assert moved(candidate, child) == [True, True, True, True]
    with pytest.raises(InvalidInput, match="leaves nothing to train"):
        train(parent, kept, speakers, replayed, heads, RefreshConfig(frozen_layers=4, steps=1), "cpu")


def test_a_refresh_with_too_many_frozen_layers_fails_before_it_trains_and_changes_nothing(tmp_path, by_speaker):
    write_refresh_config(tmp_path, frozen_layers=4, holdout_fraction=0.4)
    with Engine.init(home=tmp_path) as eng:
        enroll(eng, by_speaker("vctk-4"))
        with pytest.raises(InvalidInput, match="frozen_layers=4 leaves nothing to train: the encoder has 4 layers"):
            eng.refresh()
        assert [v.number for v in eng.versions()] == [1] and eng.active_version().number == 1


# -- weights kept near the parent: L2-SP and WiSE-FT --------------------------------------


def test_l2sp_keeps_the_tuned_weights_nearer_the_parent(by_speaker):
    parent, kept, speakers, replayed, heads = _vctk_training_data(by_speaker)
    shape = dict(steps=6, speakers_per_batch=4, utterances_per_speaker=2)
    free, free_stats = train(parent, kept, speakers, replayed, heads, RefreshConfig(**shape), "cpu")
    held, held_stats = train(parent, kept, speakers, replayed, heads, RefreshConfig(l2sp_weight=100.0, **shape), "cpu")

    @torch.no_grad()
    def distance(model) -> float:  # computed here from the weights, not by the code under test
        return float(torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), parent.parameters()))))

    assert held_stats["l2sp_weight"] == 100.0
    assert free_stats["distance_from_parent"] == pytest.approx(distance(free), rel=1e-4)
    assert held_stats["distance_from_parent"] == pytest.approx(distance(held), rel=1e-4)
    assert 0 < distance(held) < 0.5 * distance(free), (distance(held), distance(free))


def test_interpolation_mixes_every_weight_on_the_line_from_parent_to_tuned():
    parent = create_encoder("ge2e-lstm", pretrained=True)
    tuned = create_encoder("ge2e-lstm", pretrained=True)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p))
    for alpha in (0.0, 0.25, 1.0):
        mixed = interpolate(parent, tuned, alpha)
        for a, b, m in zip(parent.parameters(), tuned.parameters(), mixed.parameters()):
            torch.testing.assert_close(m, (1 - alpha) * a + alpha * b)
    assert next(tuned.parameters()) is not next(interpolate(parent, tuned, 1.0).parameters())  # a copy


def test_a_mix_is_chosen_by_the_unseen_speakers_when_there_are_some():
    both = {"overall": {"d_prime": 5.0}, "unseen": {"d_prime": 2.0}}
    assert gate.mixing_score(both) == 2.0
    assert gate.mixing_score({"overall": {"d_prime": 5.0}}) == 5.0
    assert gate.mixing_score({"overall": {"d_prime": None}}) == float("-inf")


def test_an_interpolating_refresh_promotes_the_best_scoring_mix(tmp_path, by_speaker):
    write_refresh_config(tmp_path, interpolate=True, steps=3, holdout_fraction=0.4, gate=False, speakers_per_batch=4, utterances_per_speaker=2)
    with Engine.init(home=tmp_path) as eng:
        enroll(eng, by_speaker("vctk-4"))
        report = eng.refresh()
        assert report.status == "promoted", report.reasons
        mixing = report.metrics["interpolation"]
        tried = mixing["mixing_score_by_alpha"]
        assert set(tried) == {"1", "0.75", "0.5", "0.25"}
        assert tried[f"{mixing['alpha']:g}"] == max(tried.values())
        assert gate.mixing_score(report.metrics["candidate"]) == max(tried.values())
        # The stored checkpoint is the chosen mix: it reproduces the embeddings stored with it.
        active = eng.active_version()
        ids, _, stored = eng.store.embeddings.version_embeddings(active.number)
        again = eng.refresher.embed_utterances(eng.embedder(active), [int(ids[0]), int(ids[-1])], what="check")
        np.testing.assert_allclose(np.stack(list(again.values())), stored[[0, -1]], atol=1e-5)
        assert report.metrics["candidate"]["overall"]["probes"] == report.metrics["parent"]["overall"]["probes"]


# -- low-rank updates (LoRA) and herded replay --------------------------------------------


def test_a_low_rank_update_starts_at_the_parent_and_merges_into_what_it_trained():
    encoder = create_encoder("ge2e-lstm", pretrained=True).eval()
    frames = torch.randn(3, encoder.window_frames, 40)
    adapter = LowRankUpdate(encoder, list(encoder.parameters()), rank=4)
    # Every matrix of the LSTM (input and recurrent, per layer) and the projection; no bias.
    assert sorted(adapter.names) == sorted(n for n, p in encoder.named_parameters() if p.ndim == 2) and len(adapter.names) == 7
    with torch.no_grad():
        torch.testing.assert_close(adapter(encoder, frames), encoder(frames))  # B = 0: the parent exactly
        for b in adapter.b:
            b.normal_(std=0.05)
        adapted = adapter(encoder, frames)
        assert (adapted - encoder(frames)).abs().max() > 1e-3
        before = {n: p.clone() for n, p in encoder.named_parameters()}
        adapter.merge_into(encoder)
        torch.testing.assert_close(encoder(frames), adapted)
        for (name, p), a, b in zip(((n, dict(encoder.named_parameters())[n]) for n in adapter.names), adapter.a, adapter.b):
            torch.testing.assert_close(p - before[name], b @ a)  # the change of each matrix has rank <= 4
            assert torch.linalg.matrix_rank(p - before[name]) <= 4


def test_lora_training_moves_only_low_rank_directions_of_the_unfrozen_matrices(by_speaker):
    parent, kept, speakers, replayed, heads = _vctk_training_data(by_speaker)
    cfg = RefreshConfig(lora_rank=2, lr=1e-3, frozen_layers=2, steps=3, speakers_per_batch=4, utterances_per_speaker=2)
    candidate, stats = train(parent, kept, speakers, replayed, heads, cfg, "cpu")
    assert stats["lora_rank"] == 2 and stats["steps"] == 3
    before, after = dict(parent.named_parameters()), dict(candidate.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # Layer 3's two matrices and the projection's weight moved; biases and the two frozen layers did not.
    assert changed == {"lstm.weight_ih_l2", "lstm.weight_hh_l2", "linear.weight"}
    for name in changed:  # rank 2, up to float32 rounding of the merged weights
        singular = torch.linalg.svdvals((after[name] - before[name]).detach().double())
        assert singular[2] < 1e-2 * singular[0], (name, singular[:4])
    with torch.no_grad():
        distance = float(torch.sqrt(sum(((after[n] - before[n]) ** 2).sum() for n in changed)))
    assert stats["distance_from_parent"] == pytest.approx(distance, rel=1e-4)


def test_herding_keeps_the_utterances_whose_mean_stays_at_the_speakers_mean():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 8))
    chosen = herding(vectors, 4)
    assert len(set(chosen)) == 4
    gap = np.linalg.norm(vectors[chosen].mean(axis=0) - vectors.mean(axis=0))
    # Better than nearly every random choice of four.
    random_gaps = [np.linalg.norm(vectors[rng.choice(40, 4, replace=False)].mean(axis=0) - vectors.mean(axis=0)) for _ in range(200)]
    assert gap < np.quantile(random_gaps, 0.02)
    assert sorted(herding(vectors[:3], 10)) == [0, 1, 2]  # asked for more than there are: each once


def test_balanced_shares_fill_the_capacity_fairly():
    assert balanced_shares({"a": 1, "b": 10, "c": 10}, 9) == {"a": 1, "b": 4, "c": 4}
    assert balanced_shares({"a": 2, "b": 3}, 100) == {"a": 2, "b": 3}
    shares = balanced_shares({s: 9 for s in "abcdefg"}, 20)
    assert sum(shares.values()) <= 20 and max(shares.values()) - min(shares.values()) <= 1


def test_a_herding_refresh_replays_a_balanced_sample_and_promotes(tmp_path, by_speaker):
    files = by_speaker("vctk-4")
    write_refresh_config(tmp_path, replay_selection="herding", replay_size=4, steps=2, holdout_fraction=0.4, gate=False,
                         speakers_per_batch=4, utterances_per_speaker=2)
    with Engine.init(home=tmp_path) as eng:
        enroll(eng, {s: paths[:5] for s, paths in files.items()})
        first = eng.refresh()
        assert first.status == "promoted", first.reasons
        enroll(eng, {s: paths[5:7] for s, paths in files.items()})
        second = eng.refresh()
        assert second.status == "promoted", second.reasons
        assert second.metrics["data"]["replayed"] == 4  # one herded utterance for each of the 4 speakers
        assert second.metrics["data"]["new"] > 0


def test_an_unknown_replay_selection_is_a_config_error():
    with pytest.raises(ConfigError, match="replay_selection='newest'"):
        RefreshConfig(replay_selection="newest")


# -- the default recipe on real speech ----------------------------------------------------

ENROLLED, NEVER = 60, 20  # speechocean762 speakers in the database / never enrolled
PROBES = 3


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, by_speaker):
    """60 speakers enrolled (all but 3 files each) and refreshed with the default recipe;
    then 10 more arrive and an overfitting refresh (lr 1e-2) is attempted. 20 other
    speakers are never enrolled."""
    files = by_speaker("speechocean762-train")
    names = list(files)
    enrolled, never = names[:ENROLLED], names[ENROLLED : ENROLLED + NEVER]
    home = tmp_path_factory.mktemp("adapted")
    out: dict = {}
    with Engine.init(home=home) as eng:
        enroll(eng, {s: files[s][:-PROBES] for s in enrolled})
        eng.calibrate()
        probes = [(s, p) for s in enrolled for p in files[s][-PROBES:] if not isinstance(audio.load_many([p])[0], TooShort)]
        never_items = [(s, p) for s in never for p in files[s]]
        out["v1"] = _measure(eng, probes, never_items)
        out["refresh"] = eng.refresh()
        out["v2"] = _measure(eng, probes, never_items)
    write_refresh_config(home, lr=1e-2, steps=40)
    with Engine.open(home=home) as eng:
        arrivals = names[ENROLLED + NEVER : ENROLLED + NEVER + 10]  # something new to train on
        enroll(eng, {s: files[s] for s in arrivals})
        out["overfit"] = eng.refresh()
        out["active_after_overfit"] = eng.active_version().number
    return out


def _measure(eng: Engine, probes: list, never: list) -> dict:
    """Top-1 of the probes through identify, and the never-enrolled speakers' EER (each
    enrolled from 3 files outside the database, scored on the version's centred scale)."""
    right = [eng.identify(path, top=1).candidates[0].speaker == speaker for speaker, path in probes]
    version = eng.active_version()
    centre = eng.recognizer.scoring(version.number).centre
    loaded = audio.load_many([p for _, p in never])
    kept = [(s, sp.samples) for (s, _), sp in zip(never, loaded) if isinstance(sp, audio.Speech)]
    vectors = eng.embedder(version).embed([w for _, w in kept]) - centre
    speakers = np.array([s for s, _ in kept])
    first = np.zeros(len(kept), dtype=bool)
    for s in set(speakers):
        first[np.flatnonzero(speakers == s)[:3]] = True
    names = sorted(set(speakers))
    centroids = unit(np.stack([vectors[first & (speakers == s)].mean(axis=0) for s in names]))
    scores = unit(vectors[~first]) @ centroids.T
    target = speakers[~first][:, None] == np.array(names)[None, :]
    return {"top1": float(np.mean(right)), "never_eer": eer(scores[target], scores[~target])[0]}


def test_the_default_recipe_identifies_better_and_spares_strangers(adapted):
    report = adapted["refresh"]
    assert report.status == "promoted", report.reasons
    training = report.metrics["training"]
    assert training["loss"] == "aam-softmax" and report.metrics["data"]["unseen_speakers"] >= 2
    assert adapted["v2"]["top1"] > adapted["v1"]["top1"], (adapted["v1"], adapted["v2"])
    tolerance = RefreshConfig().eer_tolerance
    assert adapted["v2"]["never_eer"] <= adapted["v1"]["never_eer"] + tolerance, (adapted["v1"], adapted["v2"])


def test_the_gate_rejects_an_overfit_candidate_for_what_it_does_to_unseen_speakers(adapted):
    report = adapted["overfit"]
    assert report.status == "rejected", report.metrics
    assert any("on unseen speakers" in r for r in report.reasons), report.reasons
    assert adapted["active_after_overfit"] == adapted["refresh"].version
