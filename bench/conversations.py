"""Diarization on simulated conversations (there is no real multi-speaker corpus here).

SIMULATED, and said so wherever the numbers appear: each conversation strings together
real single-speaker utterances of 2-6 speakers of one set, turn by turn, with a new
speaker at every turn. Pauses between turns are exponential (mean ``--pause`` s); with
probability ``--overlap`` a turn starts before the previous one ends, by up to 1 s (never
more than half of either turn). Every utterance is brought to -26 dBFS RMS. With
``--noise`` an ESC-10 clip (looped; one drawn per conversation) is mixed under the whole
conversation at ``--snr`` dB.
The reference "who spoke when" comes from silero-vad run on each utterance alone (so the
reference and the system share a VAD: missed speech and false alarms are flattering, the
speaker confusion is not).

Each speaker's first ``ENROLL_FILES`` files are kept out of the conversations; they are
what "with profiles" enrolls (for the first ``speakers - 1`` speakers: one speaker stays
unknown). Reported per set and number of speakers, mean ± std over ``--seeds``
conversations: DER (missed, false alarm, confusion), the error in the number of speakers,
and the real-time factor of ``Engine.diarize`` on this CPU.

    .venv/bin/python bench/conversations.py                      # the table in the README
    .venv/bin/python bench/conversations.py --sweep 0.2,0.25,0.3,0.35,0.4,0.45,0.5 --sets speechocean762-train,librispeech-test-other
    .venv/bin/python bench/conversations.py --report bench/results/conversations.json   # the markdown table
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_manifest, write_result  # noqa: E402

from voiceprint.engine import Engine, audio, diarization  # noqa: E402
from voiceprint.engine.config import AudioConfig  # noqa: E402
from voiceprint.engine.errors import VoiceprintError  # noqa: E402
from voiceprint.engine.metrics import diarization_error  # noqa: E402

ENROLL_FILES = 3
LEVEL_DBFS = -26.0


@dataclass
class Conversation:
    samples: np.ndarray  # 16 kHz float32
    reference: list[tuple[float, float, str]]
    speakers: list[str]  # in order of first turn


def _read(path: Path) -> np.ndarray:
    samples, rate = sf.read(path, dtype="float32", always_2d=True)
    return audio.resample(samples.mean(axis=1).astype(np.float32), rate)


def _speech(samples: np.ndarray) -> list[tuple[float, float]]:
    probs = audio.speech_probabilities([samples])[0]
    return [(s["start"] / audio.SAMPLE_RATE, s["end"] / audio.SAMPLE_RATE) for s in audio.speech_segments(probs, len(samples), AudioConfig())]


def simulate(
    pool: dict[str, list[Path]],
    *,
    turns: int,
    rng: np.random.Generator,
    pause_s: float = 0.4,
    overlap: float = 0.1,
    noise: np.ndarray | None = None,
    snr_db: float = 15.0,
) -> Conversation:
    """One conversation among the speakers of ``pool`` (speaker -> files to draw turns from)."""
    names = list(pool)
    order = {s: list(rng.permutation(len(pool[s]))) for s in names}
    placed: list[tuple[float, np.ndarray, str]] = []
    previous, cursor = None, 0.0
    # Every speaker gets a turn: the first len(names) turns go round them in a random order.
    first = list(rng.permutation(names))
    for k in range(max(turns, len(names))):
        speaker = first[k] if k < len(first) else rng.choice([s for s in names if s != previous] or names)
        if not order[speaker]:
            order[speaker] = list(rng.permutation(len(pool[speaker])))
        clip = _read(pool[speaker][order[speaker].pop()])
        rms = float(np.sqrt(np.mean(np.square(clip, dtype=np.float64)))) or 1.0
        clip = clip * np.float32(10 ** (LEVEL_DBFS / 20) / rms)
        length = len(clip) / audio.SAMPLE_RATE
        if placed and rng.random() < overlap:
            last = len(placed[-1][1]) / audio.SAMPLE_RATE
            start = cursor - rng.uniform(0.2, min(1.0, length / 2, last / 2))
        else:
            start = cursor + (rng.exponential(pause_s) if placed else 0.5)
        placed.append((start, clip, speaker))
        cursor = max(cursor, start + length)
        previous = speaker
    total = round((cursor + 0.5) * audio.SAMPLE_RATE)
    mix = np.zeros(total, dtype=np.float32)
    reference = []
    for start, clip, speaker in placed:
        at = round(start * audio.SAMPLE_RATE)
        mix[at : at + len(clip)] += clip
        reference += [(start + a, start + b, speaker) for a, b in _speech(clip)]
    if noise is not None:
        bed = np.resize(noise, total)
        gain = np.sqrt(np.mean(np.square(mix)) / max(np.mean(np.square(bed)), 1e-12) / 10 ** (snr_db / 10))
        mix = mix + np.float32(gain) * bed
    mix = mix / max(1.0, float(np.max(np.abs(mix))) / 0.99)
    return Conversation(mix.astype(np.float32), sorted(reference), [s for s in dict.fromkeys(p[2] for p in placed)])


def wav_bytes(samples: np.ndarray) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, audio.SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _pools(set_name: str) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Per speaker: the files kept for enrollment, and the files conversations draw from."""
    files: dict[str, list[Path]] = defaultdict(list)
    for item in read_manifest(set_name):
        files[item.speaker].append(item.path)
    enroll = {s: f[:ENROLL_FILES] for s, f in files.items() if len(f) > ENROLL_FILES + 2}
    talk = {s: files[s][ENROLL_FILES:] for s in enroll}
    return enroll, talk


def run(args: argparse.Namespace) -> dict:
    noise_files = [i.path for i in read_manifest("esc10-noise")] if args.noise else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for set_name in args.sets:
            enroll_pool, talk_pool = _pools(set_name)
            for n in args.speakers:
                if n > len(talk_pool):
                    continue
                for seed in range(args.seeds):
                    rng = np.random.default_rng(1000 * n + seed)
                    chosen = sorted(rng.choice(sorted(talk_pool), size=n, replace=False))
                    # A noise clip of its own per conversation, drawn apart from the speech.
                    noise = _read(noise_files[np.random.default_rng([n, seed, 7]).integers(len(noise_files))]) if noise_files else None
                    conv = simulate({s: talk_pool[s] for s in chosen}, turns=args.turns, rng=rng, pause_s=args.pause,
                                    overlap=args.overlap, noise=noise, snr_db=args.snr)
                    data = wav_bytes(conv.samples)
                    duration = len(conv.samples) / audio.SAMPLE_RATE
                    home = Path(tmp) / f"{set_name}-{n}-{seed}"
                    with Engine.init(home=home) as eng:
                        enrolled = conv.speakers[: n - 1]  # the last to speak first stays unknown
                        for s in enrolled:
                            for result in eng.enroll_many([(s, path, None) for path in enroll_pool[s]], force=True):
                                if isinstance(result, VoiceprintError):  # too short, say: the speaker has the others
                                    print(f"  not enrolled: {result}", flush=True)
                        version = eng.active_version()
                        began = time.perf_counter()
                        info, windows, x = eng.diarizer.embed_windows(data, version, name="conversation.wav")
                        embed_s = time.perf_counter() - began
                        for method, threshold in args.configs:
                            for known in (False, True):
                                began = time.perf_counter()
                                labels = diarization.cluster(
                                    x, threshold=threshold, speakers=n if known else None, method=method,
                                    durations=np.array([w.own_end - w.own_start for w in windows]),
                                    min_speaker_s=eng.config.diarization.min_speaker_s,
                                )
                                named = eng.diarizer.name_clusters(info, version, windows, x, labels, n if known else None)
                                seconds = embed_s + time.perf_counter() - began
                                # Without profiles nothing can join two clusters: the clusters
                                # themselves are the speakers, as in a home with no one enrolled.
                                clusters = diarization.turns(windows, labels, join_gap_s=eng.config.diarization.join_gap_s)
                                anonymous = [(c.start, c.end, f"cluster-{c.cluster}") for c in clusters]
                                found = {"with": len(named.speakers), "without": int(labels.max()) + 1}
                                for profiles, hypothesis in (("with", [(s.start, s.end, s.speaker) for s in named.segments]),
                                                             ("without", anonymous)):
                                    rows.append({
                                        "set": set_name, "speakers": n, "seed": seed, "method": method, "threshold": threshold,
                                        "count_given": known, "profiles": profiles, "duration_s": duration,
                                        "rtf": seconds / duration, **diarization_error(conv.reference, hypothesis),
                                        "speakers_found": found[profiles], "speakers_true": n,
                                        "named_correctly": _named_correctly(named, conv, enrolled) if profiles == "with" else None,
                                    })
                    print(f"{set_name} n={n} seed={seed}: {duration:.0f} s", flush=True)
    return {"rows": rows, "summary": summarise(rows)}


def _named_correctly(result, conversation: Conversation, enrolled: list[str]) -> float:
    """Share of the reference speech of enrolled speakers given their own name."""
    own = [(a, b, s) for a, b, s in conversation.reference if s in enrolled]
    total = sum(b - a for a, b, _ in own)
    hits = 0.0
    for a, b, s in own:
        for seg in result.segments:
            if seg.speaker == s:
                hits += max(0.0, min(b, seg.end) - max(a, seg.start))
    return hits / total if total else float("nan")


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["set"], r["speakers"], r["method"], r["threshold"], r["count_given"], r["profiles"])].append(r)
    out = []
    for (set_name, n, method, threshold, known, profiles), group in sorted(groups.items()):
        def stat(key):
            values = np.array([g[key] for g in group if g[key] is not None], dtype=float)
            return [round(float(values.mean()), 4), round(float(values.std()), 4)] if len(values) else None
        out.append({
            "set": set_name, "speakers": n, "method": method, "threshold": threshold, "count_given": known,
            "profiles": profiles, "runs": len(group), "der": stat("der"),
            "missed": stat("missed"), "false_alarm": stat("false_alarm"), "confusion": stat("confusion"),
            "total": stat("total"),
            "speaker_count_error": stat_abs(group), "rtf": stat("rtf"), "named_correctly": stat("named_correctly"),
        })
    return out


def stat_abs(group: list[dict]) -> list[float]:
    values = np.array([abs(g["speakers_found"] - g["speakers_true"]) for g in group], dtype=float)
    return [round(float(values.mean()), 3), round(float(values.std()), 3)]


def markdown(summary: list[dict]) -> str:
    """The README's table: agglomerative clustering at the configured threshold, the number
    of speakers not given; DER without / with profiles (mean ± std), its parts with
    profiles (as shares of the reference speech), and the rest."""
    def pm(pair, scale=100.0, digits=1):
        return "-" if pair is None else f"{pair[0] * scale:.{digits}f} ± {pair[1] * scale:.{digits}f}"

    rows = {(s["set"], s["speakers"], s["profiles"]): s for s in summary if s["method"] == "ahc" and not s["count_given"]}
    given = {(s["set"], s["speakers"], s["method"]): s for s in summary if s["count_given"] and s["profiles"] == "with"}
    free = {(s["set"], s["speakers"]): s for s in summary if s["method"] == "spectral" and not s["count_given"] and s["profiles"] == "with"}
    lines = [
        "| set | speakers | DER %, no profiles | DER %, with profiles | missed / false alarm / confusion % | speaker-count error | enrolled speech named right % | DER %, count given | spectral, DER % | RTF |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (set_name, n, profiles), s in sorted(rows.items()):
        if profiles != "with":
            continue
        total = s["total"][0]
        parts = " / ".join(f"{s[k][0] / total * 100:.1f}" for k in ("missed", "false_alarm", "confusion"))
        lines.append(
            f"| {set_name} | {n} | {pm(rows[(set_name, n, 'without')]['der'])} | {pm(s['der'])} | {parts} | "
            f"{s['speaker_count_error'][0]:.2f} | {pm(s['named_correctly'])} | {pm(given[(set_name, n, 'ahc')]['der'])} | "
            f"{pm(free[(set_name, n)]['der'])} | {s['rtf'][0]:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", type=lambda s: s.split(","), default=["speechocean762-train", "librispeech-test-other", "vctk-4"])
    parser.add_argument("--speakers", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3, 4, 6])
    parser.add_argument("--seeds", type=int, default=3, help="conversations per set and speaker count")
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--pause", type=float, default=0.4, help="mean pause between turns, s")
    parser.add_argument("--overlap", type=float, default=0.1, help="probability that a turn overlaps the previous one")
    parser.add_argument("--noise", action="store_true", help="mix ESC-10 noise under each conversation")
    parser.add_argument("--snr", type=float, default=15.0)
    parser.add_argument("--sweep", type=lambda s: [float(x) for x in s.split(",")], default=None,
                        help="AHC thresholds to compare (default: the configured one, and spectral)")
    parser.add_argument("--out", default=None, help="result name under bench/results (default conversations)")
    parser.add_argument("--report", metavar="RESULT", help="print the markdown table of a stored result (a path) and stop")
    args = parser.parse_args()
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())["summary"]))
        return
    from voiceprint.engine.config import DiarizationConfig

    default = DiarizationConfig().threshold
    args.configs = [("ahc", t) for t in args.sweep] if args.sweep else [("ahc", default), ("spectral", default)]
    result = run(args)
    result["simulated"] = True
    result["settings"] = {k: v for k, v in vars(args).items() if k != "configs"}
    path = write_result(args.out or ("conversations-sweep" if args.sweep else "conversations"), result)
    for s in result["summary"]:
        print(s["set"], s["speakers"], s["method"], s["threshold"], "count" if s["count_given"] else "-", s["profiles"],
              "DER", s["der"], "spk-err", s["speaker_count_error"], "rtf", s["rtf"], "named", s["named_correctly"])
    print(path)


if __name__ == "__main__":
    main()
