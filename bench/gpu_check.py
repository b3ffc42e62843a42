"""The GPU path, proven on a machine with CUDA: one short run (under 5 minutes on one GPU).

    .venv/bin/python bench/gpu_check.py                      # on a CUDA machine
    .venv/bin/python bench/gpu_check.py --device cpu --files 200 --steps 5   # the script itself, on a CPU

1. Parity: ge2e-lstm on the device against the Resemblyzer package (on the CPU) on the same
   preprocessed LibriSpeech waveforms, one per speaker: cosine >= 0.999 for every one.
2. Embedding speed: the embedder's real-time factor on 1, 3 and 10 s cuts, one at a time
   and batched (bench/speed.py's measure).
3. Enrollment of speechocean762-train files into a fresh SQLite home on the device.
4. A refresh of ``--steps`` steps (mixed precision, bfloat16, on CUDA): the loss and every
   gate metric finite, the candidate's embeddings L2-normalised, and the re-embedding of
   every stored utterance under the candidate timed.

Writes bench/results/<--out>.json and prints a summary; exits 1 when a check fails and 2
when the device is not there (it never falls back to the CPU unasked).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, read_manifest, write_result  # noqa: E402
from speed import rtf  # noqa: E402

from voiceprint.engine.embedder import Embedder  # noqa: E402
from voiceprint.engine.encoders import create_encoder  # noqa: E402


def parity(device: str) -> dict:
    from resemblyzer import VoiceEncoder, preprocess_wav

    per_speaker: dict[str, Path] = {}
    for path in sorted((data_dir() / "librispeech-test-other").rglob("*.flac")):
        per_speaker.setdefault(path.parent.name, path)
    waves = [preprocess_wav(p) for p in per_speaker.values()]
    ours = Embedder(create_encoder("ge2e-lstm", pretrained=True), device=device).embed(waves)
    theirs = VoiceEncoder("cpu", verbose=False)
    cosines = [float(np.dot(theirs.embed_utterance(w), mine)) for w, mine in zip(waves, ours)]
    return {"files": len(waves), "min_cosine": round(min(cosines), 5), "ok": min(cosines) >= 0.999}


def enroll_and_refresh(device: str, files: int, steps: int) -> dict:
    from voiceprint.engine import Engine
    from voiceprint.engine.errors import AudioError

    items = read_manifest("speechocean762-train")[:files]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "config.toml").write_text(f'[encoder]\ndevice = "{device}"\n[refresh]\nsteps = {steps}\n')
        with Engine.init(home=home) as eng:
            start = time.perf_counter()
            enrolled = 0
            for item in items:
                try:
                    eng.enroll(item.speaker, item.path)
                    enrolled += 1
                except AudioError:  # too little speech: not an enrollment
                    pass
            enroll_s = time.perf_counter() - start
            report = eng.refresh(reason="gpu check")
            training = report.metrics.get("training", {})
            gate = {k: report.metrics.get(k) for k in ("parent", "candidate")}
            numbers = [v for group in gate.values() for metrics in (group or {}).values()
                       for v in metrics.values() if isinstance(v, (int, float)) and v is not None]
            norms = np.zeros(0)
            if report.version:  # promoted or rejected, the candidate is stored: embed real speech with it
                speech = [sf.read(p, dtype="float32")[0] for p in sorted((data_dir() / "librispeech-test-other").rglob("*.flac"))[:8]]
                norms = np.linalg.norm(eng.embedder(eng.version(report.version)).embed(speech), axis=1)
    checks = {
        "trained_on_device": training.get("device") == torch.device(device).type,
        "loss_finite": all(isinstance(training.get(k), float) and math.isfinite(training[k]) for k in ("first_loss", "last_loss")),
        "gate_metrics_finite": bool(numbers) and all(math.isfinite(v) for v in numbers),
        "candidate_l2_normalised": bool(len(norms)) and bool(np.allclose(norms, 1.0, atol=1e-4)),
    }
    return {
        "enrolled": enrolled,
        "enroll_utterances_per_s": round(enrolled / enroll_s, 1),
        "refresh_status": report.status,
        "steps": training.get("steps"),
        "seconds_per_step": training.get("seconds_per_step"),
        "reembed_utterances_per_s": report.timings.get("embed_utterances_per_s"),
        "reembed_s": report.timings.get("embed_s"),
        "checks": checks,
        "ok": all(checks.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu to check the script itself")
    parser.add_argument("--files", type=int, default=1500, help="speechocean762-train files to enroll (default: all 1500)")
    parser.add_argument("--steps", type=int, default=50, help="training steps of the refresh (default 50)")
    parser.add_argument("--out", default="gpu-check", help="result name under bench/results/")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device here (torch {torch.__version__}); pass --device cpu to check the script itself", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = {"device": args.device, "parity": parity(args.device)}
    librispeech = [p for p in sorted((data_dir() / "librispeech-test-other").rglob("*.flac"))][:20]
    result["embed_rtf"] = rtf(librispeech, device=args.device)
    result["refresh"] = enroll_and_refresh(args.device, args.files, args.steps)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["ok"] = result["parity"]["ok"] and result["refresh"]["ok"]
    path = write_result(args.out, result)
    r = result["refresh"]
    print(f"device {args.device}: parity min cosine {result['parity']['min_cosine']} ({'ok' if result['parity']['ok'] else 'FAILED'})")
    print(f"  embedding RTF: {result['embed_rtf']}")
    print(f"  enrolled {r['enrolled']} utterances at {r['enroll_utterances_per_s']}/s; refresh {r['refresh_status']}, "
          f"{r['steps']} steps at {r['seconds_per_step']} s/step, re-embedding {r['reembed_utterances_per_s']} utterances/s")
    print(f"  checks: {r['checks']}")
    print(f"  {result['wall_s']} s in all; {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
