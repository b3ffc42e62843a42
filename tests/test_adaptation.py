"""Adaptation: the domain-centre back-end, the unseen-speaker gate, frozen lower layers and
the default refresh recipe, on real speech (vctk-4, speechocean762-train)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Engine, audio, gate
from engine.config import RefreshConfig
from engine.embedder import Embedder
from engine.encoders import create_encoder
from engine.errors import InvalidInput, TooShort
from engine.metrics import eer
from engine.training import train


def write_refresh_config(home: Path, **refresh) -> None:
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[refresh]"] + [f"{key} = {value!r}".replace("'", '"') for key, value in refresh.items()]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def enroll(eng: Engine, files: dict[str, list[Path]]) -> None:
    items = [(speaker, path, None) for speaker, paths in files.items() for path in paths]
    failures = [r for r in eng.enroll_many(items) if isinstance(r, Exception) and not isinstance(r, TooShort)]
    assert not failures, failures


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# -- the domain centre --------------------------------------------------------------------


def test_domain_centre_is_exact_under_enrollment_removal_and_erasure(tmp_path, by_speaker):
    vctk, libri = by_speaker("vctk-4"), by_speaker("librispeech-test-other")
    with Engine.init(home=tmp_path / "home") as eng:
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
    with Engine.init(home=tmp_path / "home") as eng:
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
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[scoring]\ncentre = false\n")
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


def test_frozen_layers_keep_the_parents_weights_and_the_rest_learns(by_speaker):
    files = by_speaker("vctk-4")
    pairs = [(s, p) for s in sorted(files) for p in files[s][:3]]
    loaded = audio.load_many([p for _, p in pairs])
    kept = [sp.samples for sp in loaded]
    speakers = [s for s, _ in pairs]
    parent = create_encoder("ge2e-lstm", pretrained=True)
    vectors = Embedder(parent, device="cpu").embed(kept)
    heads = {s: vectors[np.array(speakers) == s].mean(axis=0) for s in set(speakers)}
    replayed = np.zeros(len(kept), dtype=bool)
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
