"""xmodal's VaeTask vs a plain-PyTorch VAE on binarised MNIST-5k, side by side in one process.

    python benchmarks/vae_mnist.py [--steps 2000] [--threads 1] [--iwae-k 64] [--paired-steps 300] [--rounds 0]

Both sides use the same nets (``xmodal.nn.vae`` ConvEncoder/ConvDecoder from the ``mnist_vae``
experiment's config), the same data (the built-in ``data=mnist`` shards: 4,000 train digits,
dynamic binarisation; the 500 held-out test digits with xmodal's fixed per-key binarisation),
the same optimizer (AdamW, ``model.lr``, warm-up + cosine to 10 %, gradient-norm clip 1.0), batch
size and step budget. xmodal trains through Lightning and its streaming data module; the plain
loop holds the decoded digits in one tensor and shuffles them itself.

Printed: test NLL of each model from one shared IWAE-k evaluator written here from
``torch.distributions`` (nats; goal: xmodal within 1 nat), xmodal's own ``test/nll``, and
training throughput in images/s over the steps after a warm-up (goal: xmodal ≥ 0.97× plain).
On a shared machine the load drifts over minutes, so throughput is measured twice more:
``--paired-steps``, where a plain step runs after every xmodal step in the same trainer (see
``PlainStepsBetween``: both sides of each pair see the same load), and ``--rounds``
short alternating runs (xmodal in-memory, i.e. fed the plain loop's decoded tensors; xmodal on
the shard stream with ``data.num_workers`` 0 and 1; then plain) and the median ratio of each
round is printed; ``--steps 0`` runs only those.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import distributions as D

from xmodal.codecs.pixels import decode_image
from xmodal.config import compose_config
from xmodal.data.datamodule import iter_split
from xmodal.data.tokenizer import WordTokenizer
from xmodal.factory import build_datamodule, build_task, prepare_data
from xmodal.nn.vae import ConvDecoder, ConvEncoder
from xmodal.tasks.schedule import warmup_cosine
from xmodal.tasks.vae.task import keyed_noise

WARMUP_STEPS = 20  # steps excluded from throughput (allocator, first-batch costs)


def load_split(shards: object, split: str, size: int) -> tuple[torch.Tensor, list[str]]:
    """Decoded digits of a split as intensities in [0, 1] ``[N, 1, H, W]`` and their keys."""
    images, keys = [], []
    for raw in iter_split(shards, split):
        images.append(decode_image(raw["png"], size, channels=1))
        keys.append(raw["__key__"])
    return torch.stack(images).float() / 255.0, keys


class StepTimer(L.Callback):
    """Wall time of training steps after the warm-up (data loading included, validation excluded)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP_STEPS and self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.elapsed = time.perf_counter() - self.start
        self.steps = trainer.global_step - WARMUP_STEPS


def bare_trainer(cfg, steps: int, *callbacks: L.Callback) -> L.Trainer:
    """The Lightning side of both xmodal rows: CPU, no validation, logging or checkpoints."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )


def run_xmodal(
    cfg, steps: int, test: bool = True, *callbacks: L.Callback
) -> tuple[torch.nn.Module, float, float]:
    """Train VaeTask with Lightning on the shard stream; (task, images/s, its own test/nll)."""
    L.seed_everything(cfg.seed)
    datamodule = build_datamodule(cfg, prepare_data(cfg))
    task = build_task(cfg, datamodule.build_tokenizer())
    timer = StepTimer()
    trainer = bare_trainer(cfg, steps, timer, *callbacks)
    trainer.fit(task, datamodule=datamodule)
    rate = timer.steps * cfg.data.batch_size / timer.elapsed
    if not test:
        return task, rate, float("nan")
    metrics = trainer.test(task, datamodule=datamodule, verbose=False)[0]
    return task, rate, metrics["test/nll"]


class InMemoryBatches(torch.utils.data.IterableDataset):
    """The plain loop's batches (decoded digits, reshuffled per pass) as dict batches for VaeTask."""

    def __init__(self, images: torch.Tensor, batch: int, seed: int):
        self.images, self.batch, self.seed = images * 2 - 1, batch, seed  # [N, 1, H, W] in [-1, 1]

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        while True:
            order = torch.randperm(len(self.images), generator=g)
            for start in range(0, len(order) - self.batch + 1, self.batch):
                rows = order[start : start + self.batch]
                yield {"image": self.images[rows], "valid": torch.ones(len(rows), dtype=torch.bool)}


def run_xmodal_in_memory(cfg, train_x: torch.Tensor, steps: int, *callbacks: L.Callback) -> float:
    """VaeTask under Lightning fed the plain loop's in-memory tensors: images/s without the shard
    stream (isolates the task + Lightning overhead from PNG decoding)."""
    L.seed_everything(cfg.seed)
    task = build_task(cfg, WordTokenizer(["<pad>", "<bos>", "<eos>", "<unk>"]))
    timer = StepTimer()
    trainer = bare_trainer(cfg, steps, timer, *callbacks)
    loader = torch.utils.data.DataLoader(
        InMemoryBatches(train_x, cfg.data.batch_size, cfg.seed), batch_size=None
    )
    trainer.fit(task, train_dataloaders=loader)
    return timer.steps * cfg.data.batch_size / timer.elapsed


def run_plain(cfg, train_x: torch.Tensor, steps: int) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """The same VAE in a hand-written loop; (encoder, decoder, images/s)."""
    step, encoder, decoder = plain_stepper(cfg, train_x, steps)
    start = None
    for i in range(steps):
        if i == WARMUP_STEPS:
            start = time.perf_counter()
        step()
    rate = (steps - WARMUP_STEPS) * cfg.data.batch_size / (time.perf_counter() - start)
    return encoder, decoder, rate


@torch.no_grad()
def iwae_nll(encoder, decoder, x: torch.Tensor, k: int, seed: int = 1) -> float:
    """Mean −log p(x) bound over binary test images ``x [N, 1, H, W]``: logsumexp of k importance
    weights from torch.distributions, independent of xmodal's likelihood code."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for chunk in x.split(50):
        mu, logvar = encoder(chunk * 2 - 1)
        q = D.Normal(mu, torch.exp(0.5 * logvar))
        z = mu + q.scale * torch.randn((k, *mu.shape), generator=g)  # [k, B, Z]
        logits, _ = decoder(z.flatten(0, 1))
        log_px = D.Bernoulli(logits=logits.view(k, *chunk.shape)).log_prob(chunk).flatten(2).sum(2)
        log_w = log_px + D.Normal(0.0, 1.0).log_prob(z).sum(2) - q.log_prob(z).sum(2)  # [k, B]
        total += (math.log(k) - torch.logsumexp(log_w, 0)).sum().item()
    return total / len(x)


class PlainStepsBetween(L.Callback):
    """Pairs every xmodal step with one plain-PyTorch step in the same process: after each
    Lightning batch ends, one step of the hand-written loop runs. Wall time from the end of one
    plain step to the end of the next Lightning batch is xmodal's step (its batch fetch, hooks,
    forward, backward, clipping and optimizer step); the plain step is timed on its own. Machine
    load then touches both sides of each pair alike, which separate runs minutes apart cannot
    promise on a shared VM (their ratio moved ±5 % from round to round)."""

    def __init__(self, plain_step) -> None:
        self.plain_step = plain_step
        self.mark: float | None = None
        self.xmodal: list[float] = []
        self.plain: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.mark is not None and trainer.global_step > WARMUP_STEPS:
            self.xmodal.append(now - self.mark)
        self.plain_step()
        plain_end = time.perf_counter()
        if trainer.global_step > WARMUP_STEPS:
            self.plain.append(plain_end - now)
        self.mark = plain_end


def plain_stepper(cfg, train_x: torch.Tensor, steps: int):
    """The hand-written loop as (one-step function, encoder, decoder): the same nets, optimizer,
    schedule and clipping as the task, data held in memory and shuffled here."""
    torch.manual_seed(cfg.seed)
    m, v = cfg.model, cfg.model.vae
    shape = (1, cfg.data.image_size, cfg.data.image_size)
    encoder = ConvEncoder(*shape, v.width, v.z_dim)
    decoder = ConvDecoder(*shape, v.width, v.z_dim, likelihood="bernoulli")
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=m.lr, weight_decay=m.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, m.warmup_steps))
    batch, n = cfg.data.batch_size, len(train_x)
    state = {"order": torch.randperm(n), "position": 0}

    def step() -> None:
        if state["position"] + batch > n:
            state["order"], state["position"] = torch.randperm(n), 0
        rows = state["order"][state["position"] : state["position"] + batch]
        state["position"] += batch
        x = torch.bernoulli(train_x[rows])  # [B, 1, H, W] dynamic
        mu, logvar = encoder(x * 2 - 1)
        logvar = logvar.clamp(-v.logvar_clamp, v.logvar_clamp)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits, _ = decoder(z)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        loss = (recon + kl).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()

    return step, encoder, decoder


def throughput_paired(cfg, train_x: torch.Tensor, steps: int) -> None:
    """xmodal (in-memory, shard stream with 0 and 1 workers) with a plain step after each of its
    steps; images/s of each side and the ratio of their summed step times."""
    from omegaconf import open_dict

    print(f"throughput, paired steps ({steps} steps, {WARMUP_STEPS} warm-up excluded; images/s):")
    batch = cfg.data.batch_size
    for name in ("in-memory", "0 workers", "1 worker"):
        pairing = PlainStepsBetween(plain_stepper(cfg, train_x, steps)[0])
        if name == "in-memory":
            run_xmodal_in_memory(cfg, train_x, steps, pairing)
        else:
            with open_dict(cfg):
                cfg.data.num_workers = int(name[0])
            run_xmodal(cfg, steps, False, pairing)
        x_time, p_time = sum(pairing.xmodal), sum(pairing.plain[: len(pairing.xmodal)])
        n = len(pairing.xmodal)
        print(
            f"  xmodal, {name:10}{n * batch / x_time:8.0f}   plain {n * batch / p_time:6.0f}"
            f"   ratio {p_time / x_time:.3f}"
        )


def throughput_rounds(cfg, train_x: torch.Tensor, rounds: int, steps: int) -> None:
    """Alternate short xmodal (0 and 1 loader workers) and plain runs; median images/s and ratios."""
    from omegaconf import open_dict

    rates: dict[str, list[float]] = {
        "xmodal, 0 workers": [],
        "xmodal, 1 worker": [],
        "xmodal, in-memory": [],
        "plain": [],
    }
    for _ in range(rounds):
        rates["xmodal, in-memory"].append(run_xmodal_in_memory(cfg, train_x, steps))
        for workers in (0, 1):
            with open_dict(cfg):
                cfg.data.num_workers = workers
            rates[f"xmodal, {workers} worker{'s' if workers == 0 else ''}"].append(
                run_xmodal(cfg, steps, test=False)[1]
            )
        rates["plain"].append(run_plain(cfg, train_x, steps)[2])
    print(
        f"throughput, {rounds} alternating rounds of {steps} steps (median images/s, ratio to plain per round):"
    )
    for name, values in rates.items():
        ratios = [v / p for v, p in zip(values, rates["plain"], strict=True)]
        print(
            f"  {name:20}{statistics.median(values):8.0f}   ratio {statistics.median(ratios):.3f}  {[round(r, 3) for r in ratios]}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iwae-k", type=int, default=64)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--paired-steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--round-steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose_config(
        [
            "experiment=mnist_vae",
            f"paths.data_dir={args.data_dir}",
            f"trainer.max_steps={max(args.steps, 1)}",
            f"model.vae.iwae_k={args.iwae_k}",
            "logger=none",
        ]
    )
    shards = prepare_data(cfg)
    train_x, _ = load_split(shards, "train", cfg.data.image_size)
    test_x, test_keys = load_split(shards, "test", cfg.data.image_size)
    # xmodal's fixed evaluation binarisation (seeded per sample key), shared by both sides.
    uniform, _ = keyed_noise(test_keys, tuple(test_x.shape[1:]), (1, 1))
    test_bin = (uniform < test_x).float()

    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}"
    )
    if args.paired_steps > 0:
        throughput_paired(cfg, train_x, args.paired_steps)
    if args.rounds > 0:
        throughput_rounds(cfg, train_x, args.rounds, args.round_steps)
    if args.steps <= 0:
        return
    task, x_rate, x_own = run_xmodal(cfg, args.steps)
    encoder, decoder, p_rate = run_plain(cfg, train_x, args.steps)
    task.eval()
    x_nll = iwae_nll(task.encoder, task.decoder, test_bin, args.iwae_k)
    p_nll = iwae_nll(encoder.eval(), decoder.eval(), test_bin, args.iwae_k)

    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}"
    )
    print(
        f"steps {args.steps} × batch {cfg.data.batch_size}; test: {len(test_x)} held-out digits, IWAE k={args.iwae_k}"
    )
    print(f"{'':24}{'test NLL (nats)':>16}{'images/s':>12}")
    print(f"{'xmodal VaeTask':24}{x_nll:16.2f}{x_rate:12.0f}")
    print(f"{'plain PyTorch':24}{p_nll:16.2f}{p_rate:12.0f}")
    print(f"NLL difference xmodal − plain: {x_nll - p_nll:+.2f} nats (goal ≤ +1)")
    print(f"throughput ratio xmodal / plain: {x_rate / p_rate:.3f} (goal ≥ 0.97)")
    print(f"xmodal's own test/nll (its evaluator, IWAE-{args.iwae_k}): {x_own:.2f}")


if __name__ == "__main__":
    main()
