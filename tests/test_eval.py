"""`voiceprint eval` end to end on the shared speech sets."""

from __future__ import annotations

import contextlib
import csv
import json
from collections import Counter
import logging
from pathlib import Path

import pytest

from voiceprint.cli import main
from voiceprint.engine import Engine
from voiceprint.engine.manifests import read_manifest, read_trials
from voiceprint.engine.errors import InvalidInput, VoiceprintError


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("eval-home")
    Engine.init(home=home).close()
    return home


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_on_vctk_with_every_number(home, dev_data, capsys, tmp_path):
    plot = tmp_path / "det.png"
    code, out, _ = run(capsys, "--home", str(home), "--json", "eval", str(dev_data / "vctk-4" / "manifest.csv"), "--plot", str(plot))
    assert code == 0
    report = json.loads(out)
    # 4 speakers x 10 files: 3 enrolled each, 7 probes each, every probe against every speaker.
    assert (report["speakers"], report["probes"]) == (4, 28)
    assert report["trials"] == {"target": 28, "nontarget": 84}
    m = report["metrics"]
    assert m["eer"] == 0.0 and m["top1"] == 1.0 and m["top5"] == 1.0  # studio speech, 4 speakers
    assert m["min_dcf_0.01"] == 0.0 and 0.0 <= m["open_set_false_accept_rate"] <= 1.0
    assert sum(b["probes"] for b in report["by_duration"].values()) == 28
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Engine.open(home=home) as eng:
        assert eng.store.counts()["utterances"] == 0  # evaluation stores nothing


def test_eval_on_speechocean_reports_duration_buckets(home, dev_data, capsys):
    code, out, _ = run(capsys, "--home", str(home), "eval", str(dev_data / "speechocean762-train" / "manifest.csv"))
    assert code == 0
    assert "125 speakers" in out and "minDCF" in out and "speech < 2 s" in out and "speech > 5 s" in out
    assert "note: 5 file(s) refused: less than 1 s of speech" in out  # 5 of 1500 hold under 1 s


def test_eval_on_librispeech_with_a_trial_list(home, dev_data, capsys, tmp_path):
    root = dev_data / "librispeech-test-other"
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    speakers = sorted({r["speaker"] for r in rows})
    lines = []
    probes = [r for i, r in enumerate(rows) if i % 10 >= 5]  # the later files of each speaker
    for r in probes[:20]:
        other = speakers[(speakers.index(r["speaker"]) + 1) % len(speakers)]
        lines += [f"{r['speaker']} {root / r['path']} target", f"{other} {root / r['path']} nontarget"]
    trials = tmp_path / "trials.txt"
    trials.write_text("# enroll-speaker probe target\n" + "\n".join(lines) + "\n")
    code, out, _ = run(capsys, "--home", str(home), "--json", "eval", str(root / "manifest.csv"), "--trials", str(trials))
    assert code == 0, out
    report = json.loads(out)
    assert report["trials"] == {"target": 20, "nontarget": 20}
    assert report["metrics"]["eer"] <= 0.05


def test_fsdd_is_explained_not_crashed(home, dev_data, capsys):
    manifest = str(dev_data / "fsdd" / "manifest.csv")
    code, out, err = run(capsys, "--home", str(home), "eval", manifest)
    assert code == 2 and "--min-speech 0.3" in err and "refused" in err
    code, out, _ = run(capsys, "--home", str(home), "--json", "eval", manifest, "--min-speech", "0.3")
    assert code == 0
    report = json.loads(out)
    assert report["input_sample_rates"] == {"8000": report["used"]}
    assert any("at 8000 Hz resampled to 16000 Hz" in note for note in report["notes"])
    assert report["used"] + sum(report["refused"].values()) == report["files"] == 600
    assert set(report["by_duration"]) == {"< 2 s"}  # digits are all short


def test_noise_is_not_a_speaker_set(home, dev_data, capsys):
    code, _, err = run(capsys, "--home", str(home), "eval", str(dev_data / "esc10-noise" / "manifest.csv"))
    assert code == 2 and "no_speech" in err


def test_eval_of_an_unknown_version_and_bad_files(home, dev_data, capsys, tmp_path):
    manifest = str(dev_data / "vctk-4" / "manifest.csv")
    code, _, err = run(capsys, "--home", str(home), "eval", manifest, "--version", "9")
    assert code == 2 and "version 9" in err
    bad = tmp_path / "bad.csv"
    bad.write_text("file,who\na.wav,x\n")
    with pytest.raises(InvalidInput, match="path and speaker"):
        read_manifest(bad)
    bad_trials = tmp_path / "t.txt"
    bad_trials.write_text("alice a.wav maybe\n")
    with pytest.raises(InvalidInput, match="t.txt:1"):
        read_trials(bad_trials)


def test_eval_reports_progress_before_the_first_file_is_embedded(home, dev_data, caplog):
    files = read_manifest(dev_data / "vctk-4" / "manifest.csv")
    calls = []
    with caplog.at_level(logging.INFO, logger="voiceprint.engine.evaluation"), Engine.open(home=home) as eng:
        eng.evaluate(files, on_progress=lambda done, total, what: calls.append((done, total, what)))
    assert calls[0] == (0, 40, "embedding") and calls[-1] == (40, 40, "embedding")
    assert "eval: loading and embedding 40 files" in caplog.text


def test_the_det_plot_reads_as_the_field_reads_it(home, dev_data):
    """Normal-deviate axes clipped to 0.1-50 % on both sides (not the far corners), the
    EER and the operating point of each current threshold marked where the trials put them."""
    from scipy.stats import norm

    from voiceprint.engine.det import DET_RANGE, det_marks, figure

    files = read_manifest(dev_data / "speechocean762-train" / "manifest.csv")
    speakers = sorted({f.speaker for f in files})[:30]  # enough errors for an EER above 0
    with Engine.open(home=home) as eng:
        report = eng.evaluate([f for f in files if f.speaker in speakers])
    m = report.metrics
    assert 0 < m["eer"] < 0.5
    marks = det_marks(report.det())
    assert marks[f"EER {m['eer']:.2%}"] == pytest.approx((m["eer"], m["eer"]), abs=1e-4)
    verify = marks[f"verify threshold {m['verify_threshold']:.3f}"]
    assert verify == pytest.approx((m["false_accept_rate"], m["miss_rate"]), abs=1e-4)
    fig = figure(report.det())
    det = fig.axes[0]
    assert det.get_xlim() == det.get_ylim() == pytest.approx(tuple(norm.ppf(DET_RANGE)))
    labels = [line.get_label() for line in det.get_lines()]
    assert len(labels) == 4 and all(any(label.startswith(k) for label in labels) for k in marks)
    eer_point = det.get_lines()[1].get_xydata()[0]
    assert eer_point == pytest.approx([norm.ppf(report.det().eer)] * 2)
    assert report.det().eer == pytest.approx(m["eer"], abs=5e-5)  # the report's EER is rounded to 4 places


def test_eval_reports_what_a_calibrated_version_decides_with(tmp_path, dev_data, capsys):
    """On a calibrated version, eval scores each back-end as the engine does (centred
    cosine, AS-norm against the version's cohort, the calibration's LLR) and reports the
    engine's own thresholds for it; ranking stays by cosine, so top-1 does not move; a
    back-end the version cannot give is refused, not quietly replaced."""
    files = read_manifest(dev_data / "speechocean762-train" / "manifest.csv")
    speakers = sorted({f.speaker for f in files})
    enrolled, held_out = speakers[:40], speakers[40:70]
    home = tmp_path / "home"
    taken: Counter = Counter()
    with Engine.init(home=home) as eng:
        for f in files:
            if f.speaker in enrolled and taken[f.speaker] < 4:
                taken[f.speaker] += 1
                with contextlib.suppress(VoiceprintError):  # a short or noisy file: the others are enough
                    eng.enroll(f.speaker, f.path)
        calibration = eng.calibrate()
        probes = [f for f in files if f.speaker in held_out]
        reports = {b: eng.evaluate(probes, scoring=b) for b in ("cosine", "asnorm", "asnorm+calibrated")}
        default = eng.evaluate(probes)
    assert default.backend == "asnorm+calibrated" and default.metrics == reports["asnorm+calibrated"].metrics
    assert len({r.metrics["top1"] for r in reports.values()}) == 1  # ranked by cosine whatever decides
    for backend, report in reports.items():
        assert report.backend == backend
        assert report.metrics["verify_threshold"] == pytest.approx(calibration.thresholds[backend]["verify"])
        assert report.metrics["identify_threshold"] == pytest.approx(calibration.identify_threshold(backend, 29))
    llr = reports["asnorm+calibrated"].scores
    assert llr["target"].mean() > 0 > llr["nontarget"].mean()  # log-likelihood ratios, not cosines
    assert reports["asnorm"].metrics["eer"] != reports["cosine"].metrics["eer"]

    code, out, err = run(capsys, "--home", str(tmp_path / "fresh"), "init")
    code, out, err = run(capsys, "--home", str(tmp_path / "fresh"), "eval", str(dev_data / "vctk-4" / "manifest.csv"),
                         "--scoring", "asnorm")
    assert code == 2 and "eval --scoring asnorm: the version is not calibrated yet" in err
