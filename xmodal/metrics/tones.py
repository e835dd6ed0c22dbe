"""Which shapes tones a waveform carries, and whether they are the ones its caption asked for.

The shapes clips (``xmodal/data/shapes.py``) play shape ``i`` of a scene in time slot ``i`` as one
tone per attribute, from disjoint bands (``KIND_HZ``, ``COLOUR_HZ``, ``POSITION_HZ``). The detector
takes a plain FFT of each slot and, per attribute, names the candidate whose band (± half the
spacing of its set) holds the most power: no training, so it judges any waveform alike, real clips
through the vocoder (an upper bound: what the vocoder keeps) and generated ones.

Slots: a caption naming ``n`` shapes is cut into ``n`` equal slots over the clip's real length.
That is the generator's layout whenever ``n`` is the data's ``max_shapes``, and still right for
one shape of two (the empty second slot is silence), i.e. for every ``max_shapes`` configs allow
(1 or 2).
"""

from __future__ import annotations

import math

import torch
from torchmetrics import MeanMetric

from xmodal.codecs.audio import SAMPLE_RATE
from xmodal.codecs.vocoder import real_lengths, vocode
from xmodal.data.shapes import COLOUR_HZ, COLOURS, KIND_HZ, KINDS, POSITION_HZ, POSITION_PHRASES

ATTRIBUTES: dict[str, dict[str, float]] = {"kind": KIND_HZ, "colour": COLOUR_HZ, "position": POSITION_HZ}
TONE_METRIC_ITERS = 8
"""Griffin-Lim iterations of the metric's vocoder: the bands' power is in the magnitudes, which
more iterations barely change (real clips score 1.0 with 0, 8 or 32 on 64 val clips), at a quarter
of the cost of the samples' 32."""
_PHRASES = sorted(((phrase, pos) for pos, phrase in POSITION_PHRASES.items()), key=lambda p: -len(p[0]))


def caption_shapes(caption: str) -> list[dict[str, str]]:
    """The attributes an English shapes caption names, one dict per shape in its order (``kind``,
    ``colour``, ``position`` where named): every template of the generator, and short ones such
    as ``"a red circle"``. [] when it names no shape (another language, free text)."""
    shapes = []
    for part in " ".join(caption.lower().split()).split(" and "):
        words = part.replace(",", " ").split()
        named = {}
        kinds = [w for w in words if w in KINDS]
        colours = [w for w in words if w in COLOURS]
        if kinds:
            named["kind"] = kinds[0]
        if colours:
            named["colour"] = colours[0]
        padded = f" {' '.join(words)} "
        for phrase, position in _PHRASES:  # longest first: "in the top left" before "on the left"
            if f" {phrase} " in padded:
                named["position"] = position
                break
        if not named:
            return []
        shapes.append(named)
    return shapes


def band_powers(wave: torch.Tensor, freqs: dict[str, float], sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Power of a waveform ``[S]`` in each candidate's band ``[len(freqs)]`` (± half the spacing)."""
    centres = torch.tensor(list(freqs.values()), dtype=torch.float64)  # [K]
    half = float((centres[1:] - centres[:-1]).min()) / 2 if len(centres) > 1 else 100.0
    spectrum = torch.fft.rfft(wave.double() * torch.hann_window(wave.numel(), dtype=torch.float64)).abs() ** 2
    hz = torch.fft.rfftfreq(wave.numel(), 1.0 / sample_rate, dtype=torch.float64)  # [S // 2 + 1]
    inside = (hz[None] - centres[:, None]).abs() < half  # [K, S // 2 + 1]
    return (inside * spectrum[None]).sum(1)  # [K]


def detect_tones(wave: torch.Tensor, slots: int, sample_rate: int = SAMPLE_RATE) -> list[dict[str, str]]:
    """Per time slot of a waveform ``[S]`` (``slots`` equal ones): the strongest kind, colour and
    position tone."""
    size = wave.numel() // max(slots, 1)
    found = []
    for i in range(slots):
        piece = wave[i * size : (i + 1) * size]  # [size]
        found.append(
            {
                name: list(freqs)[int(band_powers(piece, freqs, sample_rate).argmax())]
                for name, freqs in ATTRIBUTES.items()
            }
        )
    return found


def tone_hits(wave: torch.Tensor, caption: str, sample_rate: int = SAMPLE_RATE) -> dict[str, list[float]]:
    """1.0 / 0.0 per attribute the caption names, for each of its shapes: whether the waveform ``[S]``
    carries that tone in the shape's slot (empty lists for a caption that names no shape)."""
    asked = caption_shapes(caption)
    hits: dict[str, list[float]] = {name: [] for name in ATTRIBUTES}
    for want, got in zip(asked, detect_tones(wave, len(asked), sample_rate), strict=True):
        for name, value in want.items():
            hits[name].append(float(got[name] == value))
    return hits


class ToneAccuracy(torch.nn.Module):
    """``<stage>/tone_<attribute>_acc``: the share of named attributes whose tone a vocoded log-mel
    carries. Means of 0/1 hits in ``MeanMetric`` objects (synced as sums: any rank count gives the
    same figure); an attribute no caption named is not logged."""

    def __init__(self, n_iter: int = TONE_METRIC_ITERS):
        super().__init__()
        self.n_iter = n_iter
        self.means = torch.nn.ModuleDict({name: MeanMetric() for name in ATTRIBUTES})

    @torch.no_grad()
    def update(self, units: torch.Tensor, mask: torch.Tensor | None, captions: list[str]) -> None:
        """Log-mels ``[B, 1, M, T]`` in model units, real frames ``[B, T]`` (None: all), a caption each."""
        if units.shape[0] == 0:  # a rank holding only padding rows: nothing to vocode
            return
        waves = vocode(units.float(), n_iter=self.n_iter).cpu()  # [B, S]
        lengths = [waves.shape[1]] * len(captions) if mask is None else real_lengths(mask)
        for wave, length, caption in zip(waves, lengths, captions, strict=True):
            for name, hits in tone_hits(wave[:length], caption).items():
                if hits:
                    self.means[name].update(torch.tensor(hits, device=self.means[name].device))

    def results(self) -> dict[str, float]:
        """Every attribute some caption named on some rank → its accuracy over all ranks, then reset.
        Called on every rank at a pass's end: each metric is reduced on every rank, whatever its
        own rows named, so the logged set is the same everywhere (a rank-dependent set would pair
        one rank's reduction with another's next collective)."""
        out: dict[str, float] = {}
        for name, metric in self.means.items():
            metric.update(torch.empty(0, device=metric.device))  # a no-op that marks it updated
            value = float(metric.compute())
            if not math.isnan(value):  # no caption on any rank named it
                out[name] = value
            metric.reset()
        return out
