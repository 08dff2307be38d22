"""Models and stages the tests build: small, trained here for real where accuracy matters."""

import dataclasses
import typing

import numpy as np
import torch
from torch import nn

from toolchain.core.artifact import Kind
from toolchain.core.stage import STAGES, Stage, StageResult, register_stage
from toolchain.inputs.examples import digits_cnn, train


class TwoHeads(nn.Module):
    """Digits classifier (10 logits) and a regression head (the image's
    standardized ink), sharing features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.hidden = nn.Linear(32 * 4 * 4, 80)  # channels 0-63 feed the classifier, 64-79 the regression
        self.classify = nn.Linear(64, 10)
        self.regress = nn.Linear(16, 1)

    def forward(self, x):
        h = torch.relu(self.hidden(self.features(x)))
        return self.classify(h[:, :64]), self.regress(h[:, 64:])


def ink(x: np.ndarray) -> np.ndarray:
    t = x.reshape(len(x), -1).mean(1)
    return ((t - t.mean()) / t.std()).astype(np.float32)[:, None]


def two_heads_with_outlier_channels(x: np.ndarray, y: np.ndarray, epochs: int = 15) -> TwoHeads:
    """Train both heads, then rescale the regression channels of `hidden` by 1e-3 and the
    regression head by 1e3: the same function in FP32 (ReLU is positively homogeneous), but
    those channels now sit three orders of magnitude below the classifier's in one tensor,
    as outlier channels do in real networks, and one INT8 scale for that tensor rounds them to 0."""
    torch.manual_seed(0)
    yt, rt = torch.from_numpy(y), torch.from_numpy(ink(x))

    def loss(out, idx):
        logits, value = out
        return nn.functional.cross_entropy(logits, yt[idx]) + nn.functional.mse_loss(value, rt[idx])

    model = train(TwoHeads(), x, None, epochs=epochs, loss=loss)
    model.eval()
    with torch.no_grad():
        model.hidden.weight[64:] *= 1e-3
        model.hidden.bias[64:] *= 1e-3
        model.regress.weight *= 1e3
    return model


class OutlierClassifier(nn.Module):
    """Digits CNN whose last hidden layer feeds the classifier through one tensor."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.hidden = nn.Linear(32 * 4 * 4, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(self.features(x))))


def outlier_classifier(x: np.ndarray, y: np.ndarray, epochs: int = 15) -> OutlierClassifier:
    """Trained on digits, then half of `hidden`'s channels scaled by 1e-3 and the head's
    weights on them by 1e3: the same function in FP32, but the head's input now spans three
    orders of magnitude, and one INT8 scale for it (per-tensor activations, on every backend)
    rounds the small half to zero: the classifier loses half its features."""
    torch.manual_seed(0)
    model = train(OutlierClassifier(), x, y, epochs=epochs)
    with torch.no_grad():
        model.hidden.weight[32:] *= 1e-3
        model.hidden.bias[32:] *= 1e-3
        model.head.weight[:, 32:] *= 1e3
    return model


def export(model: nn.Module, x: np.ndarray, path) -> None:
    torch.export.save(
        torch.export.export(
            model,
            (torch.from_numpy(x[:2]),),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
        ),
        str(path),
    )


class PoisonOnnx(Stage):
    """Multiplies the model's first output by NaN: an artifact that runs and is wrong everywhere."""

    name = "poison_onnx"
    transitions = {Kind.ONNX: Kind.ONNX}

    def apply(self, artifact, ctx):
        import onnx
        from onnx import helper

        model = onnx.load(str(artifact.path))
        out = model.graph.output[0]
        model.graph.initializer.append(
            helper.make_tensor("nan_scale", onnx.TensorProto.FLOAT, [], [float("nan")])
        )
        model.graph.node.append(helper.make_node("Mul", [out.name, "nan_scale"], ["poisoned"]))
        out.name = "poisoned"
        path = ctx.workdir / "poisoned.onnx"
        onnx.save(model, str(path))
        return StageResult(dataclasses.replace(artifact, path=path))


class CrashOnnx(Stage):
    """Fails the way a library bug would: not a StageError, a plain AttributeError."""

    name = "crash_onnx"
    transitions = {Kind.ONNX: Kind.ONNX}

    def apply(self, artifact, ctx):
        return (3).numel()


class UnknownOpOnnx(Stage):
    """Writes a valid ONNX file with an operator ONNX Runtime does not have: the file builds, its
    runtime refuses it with its own exception type (not a RuntimeError)."""

    name = "unknown_op_onnx"
    transitions = {Kind.ONNX: Kind.ONNX}

    def apply(self, artifact, ctx):
        import onnx
        from onnx import helper

        model = onnx.load(str(artifact.path))
        out = model.graph.output[0]
        model.graph.node.append(
            helper.make_node("NoSuchOp", [out.name], ["refused"], domain="toolchain.test")
        )
        model.opset_import.append(helper.make_opsetid("toolchain.test", 1))
        out.name = "refused"
        path = ctx.workdir / "refused.onnx"
        onnx.save(model, str(path))
        return StageResult(dataclasses.replace(artifact, path=path))


def register_test_stages() -> None:
    for cls in (PoisonOnnx, CrashOnnx, UnknownOpOnnx):
        if cls.name not in STAGES:
            register_stage(cls)


BINS = 40


def bins_of(x: np.ndarray) -> np.ndarray:
    """The true bin (0..BINS-1) of each digit's standardized ink: an ordered quantity, like pitch."""
    t = ink(x)[:, 0]
    return np.clip(np.round((t + 2.5) / 5.0 * (BINS - 1)), 0, BINS - 1).astype(np.int64)


def bin_estimator(x: np.ndarray, epochs: int = 20) -> nn.Module:
    """A CNN with one logit per bin, trained on soft labels (a Gaussian two bins wide around the true
    bin), so neighbouring bins' logits are close and INT8 noise moves the arg-max to a neighbour."""
    torch.manual_seed(0)
    model = digits_cnn(BINS)
    centers = torch.arange(BINS, dtype=torch.float32)
    target = torch.softmax(
        -((centers[None] - torch.from_numpy(bins_of(x)).float()[:, None]) ** 2) / (2 * 2.0**2) * 4, 1
    )
    return train(
        model,
        x,
        None,
        epochs=epochs,
        loss=lambda out, idx: -(target[idx] * torch.log_softmax(out, 1)).sum(1).mean(),
    )


def depthwise_hardswish() -> nn.Sequential:
    """MobileNet-style: depthwise 3x3 + pointwise 1x1 blocks with BatchNorm and HardSwish."""

    def block(c_in, c_out, stride):
        return [
            nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in),
            nn.BatchNorm2d(c_in),
            nn.Hardswish(),
            nn.Conv2d(c_in, c_out, 1),
            nn.BatchNorm2d(c_out),
            nn.Hardswish(),
        ]

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, 2, 1),
        nn.BatchNorm2d(16),
        nn.Hardswish(),
        *block(16, 32, 1),
        *block(32, 64, 2),
        *block(64, 96, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(96, 10),
    )


def bn_after_relu() -> nn.Sequential:
    """Conv -> ReLU -> BatchNorm blocks: the BatchNorm cannot be folded into the convolution before it,
    and its output (shifted, both signs) gets an INT8 range of its own."""

    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(c_out)]

    return nn.Sequential(
        *block(1, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


# 20-cent bins from 110 Hz: two octaves, as pitch trackers use
PITCH_RATE, PITCH_FRAME, PITCH_BINS = (8000, 1024, 120)


def pitch_frames(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Audio frames (n, 1, 1024) of a harmonic tone with noise, and the 20-cent bin of its pitch."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, PITCH_BINS, n)
    f0 = 110 * 2 ** ((label * 20 + rng.uniform(-5, 5, n)) / 1200)
    t = np.arange(PITCH_FRAME) / PITCH_RATE
    x = np.zeros((n, PITCH_FRAME))
    for h in range(1, 5):
        x += (
            rng.uniform(0.2, 1.0, (n, 1))
            / h
            * np.sin(2 * np.pi * h * f0[:, None] * t + rng.uniform(0, 2 * np.pi, (n, 1)))
        )
    x += rng.normal(0, 0.1, x.shape)
    x /= np.abs(x).max(1, keepdims=True)
    return x[:, None, :].astype(np.float32), label.astype(np.int64)


class Pitch(nn.Module):
    """A pitch tracker in the CREPE mould: a 511-tap first convolution over raw audio, Conv -> ReLU ->
    BatchNorm -> MaxPool blocks, one sigmoid per 20-cent bin."""

    def __init__(self):
        super().__init__()

        def block(c_in, c_out, kernel, stride):
            return [
                nn.Conv1d(c_in, c_out, kernel, stride, kernel // 2),
                nn.ReLU(),
                nn.BatchNorm1d(c_out),
                nn.MaxPool1d(2),
            ]

        self.features = nn.Sequential(
            *block(1, 32, 511, 4),
            *block(32, 16, 64, 1),
            *block(16, 16, 32, 1),
            *block(16, 32, 16, 1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32 * 16, PITCH_BINS)

    def forward(self, x):
        return torch.sigmoid(self.head(self.features(x)))


def pitch_tracker(x: np.ndarray, y: np.ndarray, epochs: int = 6) -> Pitch:
    """Trained on soft targets (a Gaussian 1.25 bins wide around the true bin), as CREPE is."""
    bins = np.arange(PITCH_BINS)
    target = torch.from_numpy(np.exp(-((bins[None] - y[:, None]) ** 2) / (2 * 1.25**2)).astype(np.float32))
    torch.manual_seed(0)
    return train(
        Pitch(),
        x,
        None,
        epochs=epochs,
        loss=lambda out, idx: nn.functional.binary_cross_entropy(out, target[idx]),
    )


SPECTRUM_BINS, SPECTRAL_PITCHES = 99, 48  # 3 bins a semitone; 16 semitones of pitch


def pitch_spectra(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-frequency spectra (n, 1, 99) of harmonic tones, as a constant-Q transform gives them: the
    h-th harmonic 36 * log2(h) bins above the fundamental, weaker with h, over noise; and the
    fundamental's bin."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, SPECTRAL_PITCHES, n)
    bins = np.arange(SPECTRUM_BINS)
    x = rng.normal(0, 0.05, (n, SPECTRUM_BINS))
    for h in range(1, 6):
        centre = label + 36 * np.log2(h) + rng.normal(0, 0.3, n)
        x += rng.uniform(0.5, 1.0, (n, 1)) / h * np.exp(-((bins[None] - centre[:, None]) ** 2) / 2)
    return x[:, None, :].astype(np.float32), label.astype(np.int64)


class SpectralPitch(nn.Module):
    """A pitch estimator in the PESTO mould: LayerNorm over (channels, frequency), a Toeplitz layer
    (a Conv1d whose kernel spans the whole spectrum twice, zero-padded: one weight per pitch
    offset, so a transposed input gives a shifted output) and a softmax over the pitch bins."""

    def __init__(self, channels: int = 8):
        super().__init__()
        f = SPECTRUM_BINS
        self.norm_in = nn.LayerNorm([1, f])
        self.conv = nn.Conv1d(1, channels, 15, padding=7)
        self.norm = nn.LayerNorm([channels, f])
        self.toeplitz = nn.Conv1d(channels, 1, 2 * f - 1, padding=f - 1)
        self.head = nn.Linear(f, SPECTRAL_PITCHES)

    def forward(self, x):
        h = torch.relu(self.conv(self.norm_in(x)))
        h = torch.relu(self.toeplitz(self.norm(h)))
        return torch.softmax(self.head(h.flatten(1)), -1)


def spectral_pitch(x: np.ndarray, y: np.ndarray, epochs: int = 15) -> SpectralPitch:
    torch.manual_seed(0)
    target = torch.from_numpy(y)
    return train(
        SpectralPitch(),
        x,
        None,
        epochs=epochs,
        loss=lambda out, idx: nn.functional.nll_loss(torch.log(out + 1e-9), target[idx]),
    )


class Segfaults(nn.Module):
    """Crashes its process the way a native runtime does (SIGSEGV) when it runs: a cell that must
    be recorded as crashed, not take the matrix down. Pickled, and loaded with --trust-pickle."""

    def forward(self, x):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)
        return x


class TinyViT(nn.Module):
    """A vision transformer for 8x8 digits: 2x2 patches (16 tokens), pre-norm encoder layers with
    multi-head attention, LayerNorm and GELU, mean-pooled into a linear head."""

    def __init__(self, dim: int = 32, heads: int = 2, layers: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim * 2, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(tokens)).mean(1))


def tiny_vit(x: np.ndarray, y: np.ndarray, epochs: int = 25) -> TinyViT:
    torch.manual_seed(0)
    return train(TinyViT(), x, y, epochs=epochs)


class PerformerDigits(nn.Module):
    """A linear-attention (Performer-style) transformer for 8x8 digits, with what opset 17 lacks
    or spells differently once exported by torch.export: q, k, v from one projection by
    ``chunk`` (Split-18's ``num_outputs``), a positive exp feature map, LayerNorm and GELU."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.embed = nn.Linear(8, dim)  # a row of pixels per token
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x.reshape(-1, 8, 8)) + self.pos
        q, k, v = self.qkv(self.norm1(t)).chunk(3, dim=-1)
        q = torch.exp(q - q.amax(-1, keepdim=True))  # the softmax kernel's positive features
        k = torch.exp(k - k.amax(-1, keepdim=True))
        context = k.transpose(1, 2) @ v
        t = t + self.proj((q @ context) / (q @ k.sum(1, keepdim=True).transpose(1, 2)))
        t = t + self.ff(self.norm2(t))
        return self.head(t.mean(1))


def performer_digits(x: np.ndarray, y: np.ndarray, epochs: int = 30) -> PerformerDigits:
    torch.manual_seed(0)
    return train(PerformerDigits(), x, y, epochs=epochs)


def mish_cnn(x: np.ndarray, y: np.ndarray, epochs: int = 10) -> nn.Sequential:
    """A digits CNN with Mish activations (YOLOv4's): exported by torch.export it is the Mish
    operator, new in opset 18 with no older form for onnx's converter to take it down to."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Mish(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.Mish(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    return train(model, x, y, epochs=epochs)


def with_outlier_norms(vit: TinyViT, k: float = 50.0) -> TinyViT:
    """The same function with the outliers of real transformers: in every encoder LayerNorm two
    channels' gain and bias are ``k`` times larger and the Linear reading them divides those
    input columns by ``k`` (exact in real arithmetic; FP32 differs by rounding)."""
    import copy

    vit = copy.deepcopy(vit)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for layer in vit.encoder.layers:
            for norm, weight in (
                (layer.norm1, layer.self_attn.in_proj_weight),
                (layer.norm2, layer.linear1.weight),
            ):
                channels = rng.choice(norm.weight.shape[0], 2, replace=False)
                norm.weight[channels] *= k
                norm.bias[channels] *= k
                weight[:, channels] /= k
    return vit


def sequences(
    n: int, seed: int, steps: int = 12, features: int = 6, classes: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy multichannel sequences (n, steps, features) whose class is the frequency of an
    oscillation on two channels, at a random phase: it has to be integrated over time."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    t = np.arange(steps)
    freq = (y + 1) * np.pi / 12
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    x = rng.normal(0, 0.5, (n, steps, features))
    x[:, :, 0] += np.sin(freq[:, None] * t + phase)
    x[:, :, 1] += np.cos(freq[:, None] * t + phase)
    return x.astype(np.float32), y.astype(np.int64)


def speaker_frames(n: int, seed: int, speakers: int = 16, steps: int = 20, bins: int = 40):
    """Utterances (n, steps, bins) of synthetic speakers: each speaker a pitch (a comb of harmonics
    over log-mel-like bins) and a formant envelope (two bumps), an utterance that voice at a
    random loudness with frame noise; and the speaker."""
    rng = np.random.default_rng(seed)
    template = np.random.default_rng(1234)  # the same voices in every split
    b = np.arange(bins)
    pitch = template.uniform(2.0, 6.0, speakers)
    formants = template.uniform(5, 35, (speakers, 2))
    voices = np.stack(
        [
            sum(np.exp(-((b - pitch[s] * h) ** 2) / 2.0) / h for h in range(1, 7))
            * (np.exp(-((b - formants[s, 0]) ** 2) / 40.0) + np.exp(-((b - formants[s, 1]) ** 2) / 40.0))
            for s in range(speakers)
        ]
    )
    who = rng.integers(0, speakers, n)
    x = voices[who][:, None, :] * rng.uniform(0.5, 1.5, (n, 1, 1)) + rng.normal(0, 0.05, (n, steps, bins))
    return np.log1p(np.maximum(x, 0) * 10).astype(np.float32), who.astype(np.int64)


class SpeakerEmbedder(nn.Module):
    """A speaker-verification embedder's shape: LSTM layers over the frames, the last step's state
    through Linear -> ReLU, L2-normalised: a unit-norm embedding, whose arg-max means nothing."""

    def __init__(self, bins: int = 40, hidden: int = 64, dim: int = 32):
        super().__init__()
        self.lstm = nn.LSTM(bins, hidden, 2, batch_first=True)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x):
        h, _ = self.lstm(x)
        e = torch.relu(self.proj(h[:, -1]))
        return e / e.norm(dim=1, keepdim=True).clamp_min(1e-6)


def speaker_embedder(x: np.ndarray, y: np.ndarray, epochs: int = 12) -> SpeakerEmbedder:
    """Trained as classification-then-embed: a cosine classifier over the speakers on the embedding
    (the GE2E / AM-softmax family), which is dropped afterwards."""
    torch.manual_seed(0)
    model = SpeakerEmbedder()
    speakers = nn.Parameter(torch.randn(int(y.max()) + 1, 32))
    model.register_parameter("_speakers", speakers)  # trained with the model, removed below
    target = torch.from_numpy(y)

    def loss(e, idx):
        logits = 10 * e @ nn.functional.normalize(speakers, dim=1).T
        return nn.functional.cross_entropy(logits, target[idx])

    train(model, x, None, epochs=epochs, loss=loss)
    del model._speakers
    return model


class SequenceClassifier(nn.Module):
    """An LSTM (or GRU) over the time steps, the last step's hidden state into a linear head."""

    def __init__(
        self, cell: type = nn.LSTM, features: int = 6, hidden: int = 32, layers: int = 1, classes: int = 4
    ):
        super().__init__()
        self.rnn = cell(features, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def sequence_classifier(
    x: np.ndarray, y: np.ndarray, cell: type = nn.LSTM, epochs: int = 15
) -> SequenceClassifier:
    torch.manual_seed(0)
    return train(SequenceClassifier(cell), x, y, epochs=epochs)


VOCAB, SEQ, TOPICS = 40, 16, 4  # ids 1-16: four topics' keywords (4 each); 17-39: filler; 0: padding


def token_sentences(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids (n, 16) int64, attention masks (n, 16) int64 and topics: a sentence of 6-16 tokens,
    padded with id 0 (mask 0). Three keywords of its topic and one of another, among filler words:
    the topic is the one whose keywords it holds most; padding must be ignored to count them."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, SEQ + 1, n)
    y = rng.integers(0, TOPICS, n)
    ids = rng.integers(1 + 4 * TOPICS, VOCAB, (n, SEQ))
    for i in range(n):
        other = (y[i] + rng.integers(1, TOPICS)) % TOPICS
        words = [1 + 4 * y[i] + rng.integers(0, 4) for _ in range(3)] + [1 + 4 * other + rng.integers(0, 4)]
        ids[i, rng.choice(lengths[i], 4, replace=False)] = words
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)
    ids[mask == 0] = 0
    return ids.astype(np.int64), mask, y.astype(np.int64)


class TextClassifier(nn.Module):
    """A tiny BERT-style encoder: token and position embeddings, pre-norm attention with the padding
    masked out (an additive bias from the integer mask), LayerNorm, GELU, masked mean pooling."""

    def __init__(self, dim: int = 32, heads: int = 2, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.zeros(1, SEQ, dim))
        self.heads = heads
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(dim),
                    "qkv": nn.Linear(dim, 3 * dim),
                    "proj": nn.Linear(dim, dim),
                    "norm2": nn.LayerNorm(dim),
                    "fc1": nn.Linear(dim, 2 * dim),
                    "fc2": nn.Linear(2 * dim, dim),
                }
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, TOPICS)

    def forward(self, ids, mask):
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]  # any length up to SEQ
        b, t, d = x.shape
        keep = mask.to(x.dtype)
        bias = (1.0 - keep)[:, None, None, :] * -1e4  # (batch, 1, 1, tokens): padding gets no attention
        for blk in self.blocks:
            q, k, v = (
                blk["qkv"](blk["norm1"](x))
                .reshape(b, t, 3, self.heads, d // self.heads)
                .permute(2, 0, 3, 1, 4)
            )
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5 + bias, dim=-1)
            x = x + blk["proj"]((att @ v).transpose(1, 2).reshape(b, t, d))
            x = x + blk["fc2"](nn.functional.gelu(blk["fc1"](blk["norm2"](x))))
        pooled = (self.norm(x) * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        return self.head(pooled)


def text_classifier(ids: np.ndarray, mask: np.ndarray, y: np.ndarray, epochs: int = 30) -> TextClassifier:
    torch.manual_seed(0)
    return train(TextClassifier(), (ids, mask), y, epochs=epochs)


class ImageAndMeta(nn.Module):
    """Two float inputs: a digit image and a side vector (its 8 row and 8 column ink sums, as a
    camera pipeline would send beside the frame), fused before the head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        # not `meta`: torch.fx.GraphModule has that attribute
        self.side = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, image, meta):
        return self.head(torch.cat([self.conv(image), self.side(meta)], dim=1))


def ink_sums(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x[:, 0].sum(2), x[:, 0].sum(1)], axis=1).astype(np.float32) / 8.0


def export_inputs(model: nn.Module, xs: tuple[np.ndarray, ...], path, dynamic: dict | None = None) -> None:
    """torch.export with a dynamic batch shared by every input (and ``dynamic``:
    {input index: {axis: Dim}})."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = tuple({0: batch, **(dynamic or {}).get(i, {})} for i in range(len(xs)))
    torch.export.save(
        torch.export.export(model, tuple(torch.from_numpy(a[:2]) for a in xs), dynamic_shapes=shapes),
        str(path),
    )


RATE, FRAME = 16000, 512  # a voice-activity detector's frames: 32 ms at 16 kHz


def audio_frames(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames (n, 512) at 16 kHz and whether a voice is in them: voiced frames hold a harmonic series
    (f0 90-300 Hz, falling harmonics, a slow tremolo) under noise; the others noise alone, or noise
    and a steady whistle (2-5 kHz), at random levels."""
    rng = np.random.default_rng(seed)
    t = np.arange(FRAME) / RATE
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, FRAME)) * rng.uniform(0.02, 0.5, (n, 1))
    for i in range(n):
        if y[i]:
            f0 = rng.uniform(90, 300)
            voice = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 9))
            x[i] += rng.uniform(0.05, 1.0) * voice * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(3, 8) * t))
        elif rng.random() < 0.5:
            x[i] += rng.uniform(0.05, 1.0) * np.sin(2 * np.pi * rng.uniform(2000, 5000) * t)
    return x.astype(np.float32), y.astype(np.int64)


class VoiceActivity(nn.Module):
    """A voice-activity detector as such models ship (TorchScript, ``forward(x, sr: int)``): the
    sample rate says how far to decimate the frame to the 8 kHz its convolutions were trained at."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(1, 16, 15, stride=2, padding=7),
            nn.ReLU(),
            nn.BatchNorm1d(16),
            nn.Conv1d(16, 32, 9, stride=2, padding=4),
            nn.ReLU(),
            nn.BatchNorm1d(32),
            nn.Conv1d(32, 32, 9, stride=2, padding=4),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        return self.detect(x, sr)

    def detect(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        if sr % 8000 != 0:
            raise ValueError("sr must be a multiple of 8000")
        return self.head(self.body(x[:, None, :: sr // 8000]))


class VoiceActivityAt16k(VoiceActivity):
    """The same detector with a default sample rate."""

    def forward(self, x: torch.Tensor, sr: int = 16000) -> torch.Tensor:
        return self.detect(x, sr)


class _At(nn.Module):
    def __init__(self, model: nn.Module, sr: int):
        super().__init__()
        self.model, self.sr = model, sr

    def forward(self, x):
        return self.model(x, self.sr)


def voice_activity(x: np.ndarray, y: np.ndarray, epochs: int = 8) -> VoiceActivity:
    torch.manual_seed(0)
    model = VoiceActivity()
    train(_At(model, RATE), x, y, epochs=epochs)
    return model.eval()


class Tempered(nn.Module):
    """The detector's logits over a temperature given at run time: a 0-d tensor input beside the
    batched frames (exported with ``torch.tensor(1.5)``), the same for the whole batch."""

    def __init__(self, detector: VoiceActivity):
        super().__init__()
        self.body, self.head = detector.body, detector.head

    def forward(self, x, temperature):
        return self.head(self.body(x[:, None, ::2])) / temperature


class Gained(VoiceActivity):
    """The detector as an eager module with a Python-number argument (pickled, --trust-pickle)."""

    def forward(self, x, gain: float = 1.0):
        return self.detect(x * gain, RATE)


class Masked(VoiceActivity):
    """TorchScript with an optional tensor argument: a per-sample mask over the frame, or None."""

    def forward(self, x: torch.Tensor, mask: typing.Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is not None:
            x = x * mask
        return self.detect(x, 16000)


class Rated(VoiceActivity):
    """A .pt2 exported with ``sr`` a Python int: torch.export fixes it at the example's value."""

    def forward(self, x, sr: int):
        return self.detect(x, sr)


class _Spectrum(nn.Module):
    """A magnitude STFT as streaming detectors compute it: a Conv1d over a fixed cos/sin basis."""

    def __init__(self, n_fft: int = 128, hop: int = 64):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        k, n = np.arange(n_fft // 2 + 1)[:, None], np.arange(n_fft)[None]
        window = np.hanning(n_fft + 1)[:-1]
        angle = 2 * np.pi * k * n / n_fft
        basis = np.concatenate([np.cos(angle), -np.sin(angle)]) * window
        self.register_buffer("forward_basis_buffer", torch.tensor(basis, dtype=torch.float32)[:, None, :])

    def forward(self, x):
        x = nn.functional.pad(x.unsqueeze(1), (self.hop, self.hop), mode="reflect")
        t = nn.functional.conv1d(x, self.forward_basis_buffer, stride=self.hop)
        cut = self.n_fft // 2 + 1
        return torch.sqrt(t[:, :cut] ** 2 + t[:, cut:] ** 2 + 1e-9)


class _StreamingNet(nn.Module):
    """Spectrum, strided Conv1d encoder, an LSTMCell decoder over the chunk whose state the caller keeps."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.stft = _Spectrum()
        self.encoder = nn.Sequential(
            *(
                m
                for cin, s in ((65, 1), (hidden, 2), (hidden, 2))
                for m in (nn.Conv1d(cin, hidden, 3, s, 1), nn.ReLU())
            )
        )
        self.rnn = nn.LSTMCell(hidden, hidden)
        self.decoder = nn.Sequential(nn.Dropout(0.1), nn.ReLU(), nn.Conv1d(hidden, 1, 1), nn.Sigmoid())

    def forward(self, x, state: torch.Tensor):
        x = self.encoder(self.stft(x)).mean(-1)
        if len(state):
            h, c = self.rnn(x, (state[0], state[1]))
        else:
            h, c = self.rnn(x)
        return self.decoder(h.unsqueeze(-1)).squeeze(-1), torch.stack([h, c])


class StreamingVoiceActivity(nn.Module):
    """A streaming voice-activity detector as published ones ship (scripted TorchScript,
    ``forward(x, sr: int)``): input checks on Python ints, ``not`` on an int (which the TorchScript
    exporter refuses without help), a model per sample rate chosen by ``if``, and state kept on the
    module between calls (the LSTM state, the previous chunk's last 64 samples, the last batch size
    and rate), reset when the batch size or the rate changes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self._model, self._model_8k = net, _StreamingNet()
        self.sample_rates = [8000, 16000]
        self._state = torch.zeros(0)
        self._context = torch.zeros(0)
        self._last_sr = 0
        self._last_batch_size = 0

    def reset_states(self):
        self._state = torch.zeros(0)
        self._context = torch.zeros(0)
        self._last_sr = 0
        self._last_batch_size = 0

    def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
        if x.dim() == 1:
            x = x.unsqueeze(0)
        if sr != 16000 and sr % 16000 == 0:
            x, sr = x[:, :: sr // 16000], 16000
        if sr not in self.sample_rates:
            raise ValueError(f"Supported sampling rates: {self.sample_rates}")
        if x.shape[-1] != (512 if sr == 16000 else 256):
            raise ValueError(f"Provided number of samples is {x.shape[-1]}")
        batch_size, context_size = x.shape[0], 64 if sr == 16000 else 32
        if not self._last_batch_size:
            self.reset_states()
        if self._last_sr and self._last_sr != sr:
            self.reset_states()
        if self._last_batch_size and self._last_batch_size != batch_size:
            self.reset_states()
        if not len(self._context):
            self._context = torch.zeros(batch_size, context_size)
        x = torch.cat([self._context, x], dim=1)
        if sr == 16000:
            out, self._state = self._model(x, self._state)
        else:
            out, self._state = self._model_8k(x, self._state)
        self._context = x[..., -context_size:]
        self._last_sr, self._last_batch_size = sr, batch_size
        return out


def streaming_voice_activity(x: np.ndarray, y: np.ndarray, epochs: int = 6) -> StreamingVoiceActivity:
    """Trained on single chunks, another chunk's tail as the context and no LSTM state: what the
    detector sees on the first chunk of a stream."""
    torch.manual_seed(0)
    net = _StreamingNet()
    yt = torch.from_numpy(y).float()

    def loss(out, idx):
        return nn.functional.binary_cross_entropy(out[0][:, 0], yt[idx])

    class Chunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, chunk, context):
            return self.net(torch.cat([context, chunk], 1), torch.zeros(0))

    train(Chunk(), (x, np.roll(x, 1, axis=0)[:, -64:].copy()), None, epochs=epochs, loss=loss)
    return StreamingVoiceActivity(net.eval()).eval()


class OverflowingPerformer(PerformerDigits):
    """The Performer without the max subtraction its features usually get: exp(6 tanh(q) + 5), as
    a softmax kernel's features on unnormalised projections are. Each feature stays below FP16's
    largest value (e^11 = 59874 < 65504), their sum over the 8 tokens does not (~3.8e5): FP32 holds
    the model, FP16 turns the normaliser into inf and every output into NaN."""

    def forward(self, x):
        t = self.embed(x.reshape(-1, 8, 8)) + self.pos
        q, k, v = self.qkv(self.norm1(t)).chunk(3, dim=-1)
        q, k = torch.exp(6 * torch.tanh(q) + 5), torch.exp(6 * torch.tanh(k) + 5)
        context = k.transpose(1, 2) @ v
        t = t + self.proj((q @ context) / (q @ k.sum(1, keepdim=True).transpose(1, 2)))
        t = t + self.ff(self.norm2(t))
        return self.head(t.mean(1))


def overflowing_performer(x: np.ndarray, y: np.ndarray, epochs: int = 30) -> OverflowingPerformer:
    torch.manual_seed(0)
    return train(OverflowingPerformer(), x, y, epochs=epochs)


def dead_channel_outliers(trained: nn.Sequential, k: float = 100.0) -> nn.Sequential:
    """A copy of the trained digits CNN (toolchain.inputs.examples.digits_cnn) with one convolution
    channel silenced (zero weights, bias -1: it never fires) and the Linear's weights on that channel's
    16 inputs set to ``k`` times its largest real weight. The same function in FP32 (those inputs are
    always 0), but each output row's INT8 weight scale (per channel, symmetric) is now set by the
    outlier, and the row's real weights round to a few levels. Calibration acts on activations,
    equalization has nothing to scale on a channel that is always zero, bias correction removes only
    the mean error: post-training INT8 misses parity (about 10 dB against 15, 12 after recovery, on
    x86 torch_int8 and Snapdragon ptl_int8 and pte_int8). Fine-tuned on that grid, the real weights
    learn to work with it (QAT: about 22 dB)."""
    model = digits_cnn()
    model.load_state_dict(trained.state_dict())
    with torch.no_grad():
        model[3].weight[0] = 0
        model[3].bias[0] = -1.0
        model[8].weight[:, 0:16] = k * model[8].weight.abs().max()
    return model.eval()
