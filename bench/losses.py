"""Fine-tune the pretrained GE2E encoder with every registered loss under one budget.

    .venv/bin/python bench/losses.py [--steps 100] [--lr 1e-4] [--losses ge2e-softmax,aam-softmax]

Speakers of speechocean762-train are split in manifest order: the first 100 train, the
last 25 are held out and never seen in training. Each loss starts from version 1 (the
weights Resemblyzer ships) and gets the same budget: ``--steps`` Adam steps on batches
of 64 random 1.6 s crops of VAD-trimmed speech, 16 speakers x 4 crops (metric losses) or
64 class-labelled crops (classification losses). ``distill`` pulls toward the frozen
version 1 on the same crops; on its own it is a regulariser and should change little.

Held-out evaluation, before and after: each speaker is enrolled from 3 utterances, the
other utterances are probes scored against all 25 centroids (cosine). Reported: EER over
every (probe, speaker) trial, top-1 identification, seconds per training step.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import read_manifest, split_per_speaker, write_result  # noqa: E402

from voiceprint.engine import audio  # noqa: E402
from voiceprint.engine.embedder import Embedder  # noqa: E402
from voiceprint.engine.encoders import create_encoder  # noqa: E402
from voiceprint.engine.frontends import create_frontend  # noqa: E402
from voiceprint.engine.losses import LOSSES, create_loss  # noqa: E402
from voiceprint.engine.metrics import eer, top_k_accuracy  # noqa: E402
from voiceprint.engine.samplers import ClassBatchSampler, SpeakerBalancedSampler  # noqa: E402

TRAIN_SPEAKERS = 100
SPEAKERS_PER_BATCH, CROPS_PER_SPEAKER = 16, 4
BATCH = SPEAKERS_PER_BATCH * CROPS_PER_SPEAKER
LOSS_LR = 1e-2  # heads and scales learn fast; the encoder's rate is --lr
CLIP_NORM = 3.0  # GE2E's paper clips the gradient norm at 3


def load_speech(items) -> tuple[list[np.ndarray], list[str]]:
    waves, speakers = [], []
    for start in range(0, len(items), 64):
        chunk = items[start : start + 64]
        for item, speech in zip(chunk, audio.load_many([it.path for it in chunk])):
            if isinstance(speech, audio.Speech):
                waves.append(speech.samples)
                speakers.append(item.speaker)
    return waves, speakers


def evaluate(encoder, enroll, probes) -> dict:
    embedder = Embedder(copy.deepcopy(encoder).cpu())
    names = sorted(set(enroll[1]))
    index = {name: i for i, name in enumerate(names)}
    e_emb = embedder.embed(enroll[0])
    centroids = np.stack([e_emb[[s == n for s in enroll[1]]].mean(axis=0) for n in names])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    scores = embedder.embed(probes[0]) @ centroids.T
    truth = np.array([index[s] for s in probes[1]])
    is_target = np.zeros_like(scores, dtype=bool)
    is_target[np.arange(len(truth)), truth] = True
    rate, _ = eer(scores[is_target], scores[~is_target])
    return {"eer": round(rate, 4), "top1": round(top_k_accuracy(scores, truth), 4)}


class Crops:
    """Random 160-frame windows of each training utterance's mel features."""

    def __init__(self, waves: list[np.ndarray], frames: int, seed: int) -> None:
        frontend = create_frontend(create_encoder("ge2e-lstm").frontend)
        with torch.inference_mode():
            self.features = [frontend(torch.from_numpy(w)) for w in waves]
        self.frames = frames
        self.rng = np.random.default_rng(seed)

    def batch(self, indices) -> torch.Tensor:
        out = []
        for i in indices:
            feats = self.features[i]
            if len(feats) < self.frames:  # short speech is zero-padded, as at inference
                feats = torch.nn.functional.pad(feats, (0, 0, 0, self.frames - len(feats)))
            start = int(self.rng.integers(0, len(feats) - self.frames + 1))
            out.append(feats[start : start + self.frames])
        return torch.stack(out)


def finetune(
    name: str, crops: Crops, labels: np.ndarray, steps: int, lr: float, init_heads: torch.Tensor, seed: int
) -> tuple:
    torch.manual_seed(seed)
    teacher = create_encoder("ge2e-lstm", pretrained=True).eval()
    encoder = create_encoder("ge2e-lstm", pretrained=True).train()
    num_classes = int(labels.max()) + 1
    if LOSSES.get(name).kind == "classification":
        # Heads start from each training speaker's mean pretrained embedding, not at random.
        loss_fn = create_loss(name, embedding_dim=encoder.embedding_dim, num_classes=0)
        loss_fn.grow(num_classes, init=init_heads)
        sampler = _forever(ClassBatchSampler(labels.tolist(), BATCH, seed=seed))
    else:
        loss_fn = create_loss(name, embedding_dim=encoder.embedding_dim)
        sampler = _forever(SpeakerBalancedSampler(labels.tolist(), SPEAKERS_PER_BATCH, CROPS_PER_SPEAKER, seed=seed))
    optimiser = torch.optim.Adam(
        [{"params": encoder.parameters(), "lr": lr}, {"params": loss_fn.parameters(), "lr": LOSS_LR}]
    )
    step_times, losses = [], []
    for _ in tqdm(range(steps), desc=name, file=sys.stderr, leave=False):
        indices = next(sampler)
        if hasattr(loss_fn, "step"):  # A-Softmax anneals its softmax blend once per optimiser step
            loss_fn.step()
        frames = crops.batch(indices)
        start = time.perf_counter()
        embeddings = encoder(frames)
        if loss_fn.kind == "classification":
            value = loss_fn(embeddings, torch.as_tensor(labels[indices]))
        elif loss_fn.kind == "distillation":
            with torch.no_grad():
                target = teacher(frames)
            value = loss_fn(embeddings, target)
        else:
            value = loss_fn(embeddings.view(SPEAKERS_PER_BATCH, CROPS_PER_SPEAKER, -1))
        optimiser.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(list(encoder.parameters()) + list(loss_fn.parameters()), CLIP_NORM)
        optimiser.step()
        step_times.append(time.perf_counter() - start)
        losses.append(float(value))
    return encoder.eval(), float(np.mean(step_times[1:] or step_times)), losses


def _forever(sampler):
    while True:  # each pass over a sampler is a new, differently shuffled epoch
        yield from sampler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--losses", default=",".join(LOSSES.names()), help="comma-separated (default: all registered)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the encoder (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    for name in names:
        LOSSES.get(name)  # fail before any work on a typo

    items = read_manifest("speechocean762-train")
    speakers = list(dict.fromkeys(it.speaker for it in items))
    train_items = [it for it in items if it.speaker in set(speakers[:TRAIN_SPEAKERS])]
    held_out = [it for it in items if it.speaker in set(speakers[TRAIN_SPEAKERS:])]
    print(f"loading speech: {len(train_items)} training and {len(held_out)} held-out files", file=sys.stderr)
    train_waves, train_speakers = load_speech(train_items)
    enroll_items, probe_items = split_per_speaker(held_out, 3)
    enroll, probes = load_speech(enroll_items), load_speech(probe_items)

    label_of = {s: i for i, s in enumerate(dict.fromkeys(train_speakers))}
    labels = np.array([label_of[s] for s in train_speakers])
    pretrained = create_encoder("ge2e-lstm", pretrained=True).eval()
    train_emb = torch.from_numpy(Embedder(pretrained).embed(train_waves))
    init_heads = torch.stack([train_emb[labels == k].mean(0) for k in range(len(label_of))])
    crops = Crops(train_waves, pretrained.window_frames, args.seed)

    before = evaluate(pretrained, enroll, probes)
    rows = []
    for name in names:
        encoder, step_s, losses = finetune(name, crops, labels, args.steps, args.lr, init_heads, args.seed)
        after = evaluate(encoder, enroll, probes)
        rows.append({"loss": name, "kind": LOSSES.get(name).kind, "before": before, "after": after,
                     "seconds_per_step": round(step_s, 3), "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)})
        print(f"{name:<15} EER {before['eer']:.3f} -> {after['eer']:.3f}  top-1 {before['top1']:.3f} -> {after['top1']:.3f}  "
              f"{step_s:.2f} s/step", file=sys.stderr)
    result = {
        "set": "speechocean762-train",
        "train_speakers": len(label_of),
        "train_utterances": len(train_waves),
        "held_out_speakers": len(set(enroll[1])),
        "held_out_probes": len(probes[0]),
        "steps": args.steps,
        "batch": BATCH,
        "encoder_lr": args.lr,
        "loss_lr": LOSS_LR,
        "results": rows,
    }
    path = write_result(f"losses-lr{args.lr:g}", result)
    print(json.dumps(result, indent=2))
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
