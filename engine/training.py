"""Fine-tuning an encoder: pure tensors-in, encoder-out, no storage.

Speaker-balanced mini-batches of random 1.6 s crops of kept utterances (speech, or kept
features), the configured loss from the registry, and two pulls toward the frozen parent
so that embeddings stay compatible with what it knew: distillation of its embeddings on
replayed crops, and optionally L2-SP on its weights. With ``lora_rank`` only low-rank
updates of the weight matrices learn (:mod:`voiceprint.engine.lowrank`). :func:`interpolate` mixes
parent and tuned weights afterwards (WiSE-FT).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from voiceprint.engine import audio
from voiceprint.engine.config import RefreshConfig
from voiceprint.engine.embedder import pick_device
from voiceprint.engine.errors import InvalidInput
from voiceprint.engine.frontends import create_frontend
from voiceprint.engine.losses import LOSSES, create_loss
from voiceprint.engine.lowrank import LowRankUpdate
from voiceprint.engine.progress import Progress, report
from voiceprint.engine.replay import SpeakerReservoir, herded_sample
from voiceprint.engine.samplers import ClassBatchSampler, SpeakerBalancedSampler

log = logging.getLogger(__name__)

CLIP_NORM = 3.0  # GE2E's paper clips the gradient norm at 3
MIN_NOISE_S = 1.6  # noise recordings with less sound than one training crop are left out


class NothingToTrain(Exception):
    """Nothing worth training on: the refresh is skipped, not failed."""


def choose_training(
    trainable: list, trained_through: int, cfg: RefreshConfig, vector_of: dict | None = None
) -> tuple[list, list]:
    """(new, replayed): every new utterance (newest ``max_new``) and a replay sample of the
    rest; with ``replay_selection = "herding"``, chosen on ``vector_of`` (the parent's
    embeddings by utterance id)."""
    new = [u for u in trainable if u.id > trained_through][-cfg.max_new :]
    if cfg.replay_size == 0:
        return new, []
    if cfg.replay_selection == "herding":
        old = [u for u in trainable if u.id <= trained_through]
        return new, sorted(herded_sample(old, lambda u: u.speaker, vector_of or {}, cfg.replay_size), key=lambda u: u.id)
    reservoir = SpeakerReservoir(cfg.replay_size, seed=cfg.seed)
    for utt in trainable:
        if utt.id <= trained_through:
            reservoir.learn_one(utt.speaker, utt)
    return new, sorted(reservoir.items(), key=lambda u: u.id)


class NoiseBank:
    """Noise recordings mixed into training crops at a random SNR (augmentation, off by default)."""

    def __init__(self, folder: str, snr_db: float, seed: int) -> None:
        self.snr_db = snr_db
        self.rng = np.random.default_rng(seed)
        self.noises = []
        for path in sorted(Path(folder).expanduser().rglob("*")):
            if path.suffix.lower() not in {".wav", ".flac", ".ogg"}:
                continue
            samples, rate = sf.read(path, dtype="float32", always_2d=True)
            wave = torch.from_numpy(samples.mean(axis=1))
            if rate != audio.SAMPLE_RATE:
                wave = torchaudio.functional.resample(wave, rate, audio.SAMPLE_RATE)
            # Clips are often padded with digital silence; mixing a silent stretch would
            # add no noise at all, so only the blocks that carry sound are kept.
            blocks = wave.numpy()[: len(wave) // 400 * 400].reshape(-1, 400)
            audible = blocks[np.sqrt((blocks**2).mean(axis=1)) > 1e-4]
            if audible.size >= MIN_NOISE_S * audio.SAMPLE_RATE:
                self.noises.append(audible.ravel())
        if not self.noises:
            raise InvalidInput(f"refresh.noise_dir {folder!r} holds no wav/flac/ogg noise")

    def mix(self, crop: np.ndarray) -> np.ndarray:
        noise = self.noises[self.rng.integers(len(self.noises))]
        if len(noise) < len(crop):
            noise = np.tile(noise, len(crop) // len(noise) + 1)
        start = self.rng.integers(len(noise) - len(crop) + 1)
        noise = noise[start : start + len(crop)]
        snr = self.snr_db + self.rng.uniform(-5, 5)
        speech_power = float(np.mean(crop**2)) + 1e-10
        noise_power = float(np.mean(noise**2)) + 1e-10
        return crop + noise * np.sqrt(speech_power / (noise_power * 10 ** (snr / 10)))


class Crops:
    """Random fixed-length crops of kept utterances (see :func:`load_stored`), as encoder input frames.

    Speech is cropped to ``window_frames`` frames' worth of samples and goes through the
    frontend; kept features are cropped to ``window_frames`` frames directly.
    """

    def __init__(self, kept: list[np.ndarray], encoder: torch.nn.Module, device: torch.device, seed: int, noise: NoiseBank | None) -> None:
        self.kept = kept
        self.frames = encoder.window_frames
        self.frontend = create_frontend(encoder.frontend).to(device)
        self.samples = self.frames * self.frontend.hop_length
        self.device = device
        self.rng = np.random.default_rng(seed)
        self.noise = noise

    def batch(self, indices: list[int]) -> torch.Tensor:
        crops = [self._crop(self.kept[i]) for i in indices]
        out = [torch.from_numpy(crop).float().to(self.device) if crop.ndim == 2 else None for crop in crops]
        speech = [k for k, crop in enumerate(crops) if crop.ndim == 1]
        if speech:
            with torch.no_grad():
                features = self.frontend(torch.from_numpy(np.stack([crops[k] for k in speech])).float().to(self.device))
            for k, frames in zip(speech, features[:, : self.frames]):
                out[k] = frames
        return torch.stack(out)

    def _crop(self, kept: np.ndarray) -> np.ndarray:
        length = self.samples if kept.ndim == 1 else self.frames
        if len(kept) < length:  # a short utterance is zero-padded, as at inference
            kept = np.pad(kept, [(0, length - len(kept))] + [(0, 0)] * (kept.ndim - 1))
        start = int(self.rng.integers(len(kept) - length + 1))
        crop = kept[start : start + length]
        return self.noise.mix(crop) if self.noise and crop.ndim == 1 else crop


# The training loop is kept whole (about 60 lines) so one step reads top to bottom.
def train(
    parent: torch.nn.Module,
    kept: list[np.ndarray],
    speakers: list[str],
    replayed: np.ndarray,
    init_heads: dict[str, np.ndarray],
    cfg: RefreshConfig,
    device_name: str,
    on_progress: Progress | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Fine-tune a copy of ``parent`` on ``kept`` utterances (decoded kept data, see
    :mod:`voiceprint.engine.kept`); returns the candidate (on CPU, eval mode) and training stats."""
    device = pick_device(device_name)
    torch.manual_seed(cfg.seed)
    teacher = copy.deepcopy(parent).to(device).eval().requires_grad_(False)
    student = copy.deepcopy(parent).to(device).train()
    trainable = _unfrozen_parameters(student, cfg.frozen_layers)
    anchors = [p.detach().clone() for p in trainable]  # the parent's weights, for L2-SP
    adapter = LowRankUpdate(student, trainable, cfg.lora_rank, seed=cfg.seed).to(device) if cfg.lora_rank else None
    learnt = list(adapter.parameters()) if adapter else trainable
    if adapter:
        for parameter in trainable:  # the parent's weights stay; only the factors learn
            parameter.requires_grad_(False)
    encode = (lambda frames: adapter(student, frames)) if adapter else student
    names = sorted(set(speakers))
    labels = np.array([names.index(s) for s in speakers])
    n, m = _batch_shape(labels, cfg)
    loss_fn, batches = _loss_and_batches(cfg, student.embedding_dim, labels, names, init_heads, n, m)
    loss_fn = loss_fn.to(device)
    distill = create_loss("distill", embedding_dim=student.embedding_dim).to(device)
    optimiser = torch.optim.Adam(
        [{"params": learnt, "lr": cfg.lr}, {"params": loss_fn.parameters(), "lr": cfg.loss_lr}]
    )
    crops = Crops(kept, student, device, cfg.seed, _noise_bank(cfg, kept))
    # Mixed precision only where it pays (CUDA); bfloat16 needs no loss scaling.
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    log.info("training: up to %d steps of %dx%d crops on %s (time budget %.0f s)", cfg.steps, n, m, device.type, cfg.time_budget_s)
    started, losses, step = time.perf_counter(), [], 0
    for step in range(1, cfg.steps + 1):
        indices = next(batches)
        frames = crops.batch(indices)
        with autocast:
            embeddings = encode(frames).float()
            if loss_fn.kind == "classification":
                value = loss_fn(embeddings, torch.as_tensor(labels[indices], device=device))
            else:
                value = loss_fn(embeddings.view(n, m, -1))
            mask = torch.as_tensor(replayed[indices], device=device)
            if cfg.distill_weight > 0 and bool(mask.any()):
                target = teacher(frames[mask]).float()
                value = value + cfg.distill_weight * distill(embeddings[mask], target)
            if cfg.l2sp_weight > 0:
                value = value + cfg.l2sp_weight * _squared_distance(_current(student, trainable, adapter), anchors)
        if hasattr(loss_fn, "step"):  # A-Softmax anneals once per optimiser step
            loss_fn.step()
        optimiser.zero_grad()
        value.backward()
        torch.nn.utils.clip_grad_norm_(learnt + list(loss_fn.parameters()), CLIP_NORM)
        optimiser.step()
        losses.append(float(value.detach()))
        report(on_progress, step, _planned_steps(step, time.perf_counter() - started, cfg), "training")
        if time.perf_counter() - started > cfg.time_budget_s:
            log.info("refresh: time budget of %.0f s spent after %d steps", cfg.time_budget_s, step)
            break
    seconds = time.perf_counter() - started
    if adapter:
        adapter.merge_into(student)  # the checkpoint keeps the encoder's usual shape
    stats = {
        "loss": cfg.loss,
        "steps": step,
        "batch": [n, m],
        "frozen_layers": cfg.frozen_layers,
        "l2sp_weight": cfg.l2sp_weight,
        "lora_rank": cfg.lora_rank,
        "distance_from_parent": round(float(torch.sqrt(_squared_distance(trainable, anchors).detach())), 5),
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(step, 1), 3),
        "first_loss": round(losses[0], 4) if losses else None,
        "last_loss": round(losses[-1], 4) if losses else None,
        "device": device.type,
    }
    return student.cpu().eval().requires_grad_(True), stats


def _planned_steps(step: int, elapsed_s: float, cfg: RefreshConfig) -> int:
    """The steps this training will take: ``cfg.steps``, or fewer when the time budget
    runs out first at the pace so far (so a progress bar ends where training does)."""
    if elapsed_s <= 0:
        return cfg.steps
    return max(step, min(cfg.steps, int(cfg.time_budget_s * step / elapsed_s) + 1))


def interpolate(parent: torch.nn.Module, tuned: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """WiSE-FT: a copy of ``tuned`` whose every weight is ``(1 - alpha) * parent + alpha * tuned``.

    Fine-tuning from a shared start keeps the two in one basin, where the straight line
    between them stays good; the mix keeps part of the in-domain gain and part of the
    parent's robustness (Wortsman et al., "Robust fine-tuning of zero-shot models", 2022).
    """
    mixed = copy.deepcopy(tuned)
    start = parent.state_dict()
    mixed.load_state_dict({k: torch.lerp(start[k].float(), v.float(), alpha).to(v.dtype) if v.is_floating_point() else v
                           for k, v in tuned.state_dict().items()})
    return mixed


def _current(student: torch.nn.Module, trainable: list, adapter: LowRankUpdate | None) -> list[torch.Tensor]:
    """The weights in ``trainable`` as the forward pass sees them (with the low-rank update added)."""
    if adapter is None:
        return trainable
    weights, name_of = adapter.weights(student), {id(p): name for name, p in student.named_parameters()}
    return [weights[name_of[id(p)]] for p in trainable]  # in the order of the anchors


def _squared_distance(weights: list[torch.Tensor], anchors: list[torch.Tensor]) -> torch.Tensor:
    """The squared L2 distance between two lists of weights (L2-SP's penalty before its weight)."""
    return sum(((w - a) ** 2).sum() for w, a in zip(weights, anchors))


def check_frozen_layers(encoder: torch.nn.Module, frozen_layers: int) -> None:
    """A frozen-layer count that leaves something to train, checked before any data is loaded."""
    layers = len(encoder.layer_groups())
    if frozen_layers >= layers:
        raise InvalidInput(f"refresh.frozen_layers={frozen_layers} leaves nothing to train: the encoder has {layers} layers")


def _unfrozen_parameters(student: torch.nn.Module, frozen_layers: int) -> list[torch.nn.Parameter]:
    """Freeze the lowest ``frozen_layers`` layers of ``student``; return the parameters left to train."""
    check_frozen_layers(student, frozen_layers)
    groups = student.layer_groups()
    for k, group in enumerate(groups):
        for parameter in group:  # set both ways: a parent kept in memory may carry older flags
            parameter.requires_grad_(k >= frozen_layers)
    return [p for group in groups[frozen_layers:] for p in group]


def _loss_and_batches(cfg: RefreshConfig, dim: int, labels: np.ndarray, names: list[str], init_heads: dict, n: int, m: int):
    """The loss and an endless stream of batch indices shaped for it."""
    loss_cls = LOSSES.get(cfg.loss)
    if loss_cls.kind == "classification":
        loss_fn = create_loss(cfg.loss, embedding_dim=dim, num_classes=0)
        # Heads start at each speaker's centroid under the parent (weight imprinting), so
        # the first steps refine a good classifier instead of fighting a random one.
        loss_fn.grow(len(names), init=torch.from_numpy(np.stack([init_heads[s] for s in names])).float())
        return loss_fn, _forever(ClassBatchSampler(labels.tolist(), n * m, seed=cfg.seed))
    if loss_cls.kind == "metric":
        loss_fn = create_loss(cfg.loss, embedding_dim=dim)
        return loss_fn, _forever(SpeakerBalancedSampler(labels.tolist(), n, m, seed=cfg.seed))
    raise InvalidInput(f"refresh.loss {cfg.loss!r} is a {loss_cls.kind} loss; pick a classification or metric loss")


def _noise_bank(cfg: RefreshConfig, kept: list[np.ndarray]) -> NoiseBank | None:
    noise = NoiseBank(cfg.noise_dir, cfg.noise_snr_db, cfg.seed) if cfg.noise_dir else None
    features_only = sum(k.ndim == 2 for k in kept)
    if noise and features_only:
        # Noise is mixed into speech before the frontend; kept features have no speech left.
        log.warning(
            "refresh: %d of %d training utterances were kept as features only (privacy.keep); "
            "they are trained on without noise augmentation",
            features_only,
            len(kept),
        )
    return noise


def _batch_shape(labels: np.ndarray, cfg: RefreshConfig) -> tuple[int, int]:
    """(N speakers, M utterances) per batch, shrunk to what the data allows."""
    counts = np.bincount(labels)
    m = cfg.utterances_per_speaker
    while m > 2 and (counts >= m).sum() < 2:
        m -= 1
    n = min(cfg.speakers_per_batch, int((counts >= m).sum()))
    if n < 2 or counts.max() < 2:
        raise NothingToTrain(
            f"training needs at least 2 speakers with 2 trainable utterances each; have {int((counts >= 2).sum())}"
        )
    return n, m


def _forever(sampler):
    while True:  # each pass over a sampler is a new, differently shuffled epoch
        yield from sampler
