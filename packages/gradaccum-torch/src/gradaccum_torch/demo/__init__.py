"""The gradaccum-torch demo: exact accumulation on a character-level language model.

``python -m gradaccum_torch.demo [--out DIR] [--steps N]`` (or ``nox -s demo``) trains a
tiny GRU language model on ``corpus.txt`` (public-domain verse shipped with the package:
Shakespeare's sonnets 18, 29, 30, 55, 66, 73, 116 and 130, and Emily Dickinson's "Hope is the
thing with feathers") three times, from the same initialisation on the same data:

(a) one large batch per optimizer step, loss = mean over the batch's real tokens;
(b) the same batch as microbatches of unequal token counts through
    `Accumulator` with ``normalization="items"``: each loss is a sum
    over tokens, and the window gradient is divided by the window's token count;
(c) the usual hand-written loop, ``(token_mean_loss / k).backward()``: a mean of
    per-microbatch means, which weights a short microbatch's tokens more than a long one's.

Sequences are random spans of 8 to 64 characters; each window's sequences are sorted by
length before being cut into microbatches (length bucketing, which saves padding), so
microbatches hold very different token counts. Everything runs in float64 on the CPU, so
(b) matches (a) to rounding error while (c) drifts away.

The demo prints a table (final loss, largest parameter deviation from (a)), writes
``loss.png`` with the three loss curves and a checkpoint of run (b) taken in the middle of
its last window, checks that a fresh model resumed from that checkpoint ends exactly where
(b) ended, and prints ``gradaccum inspect`` of the checkpoint. It exits with status 1 when
(b) deviates from (a) by more than ``--tolerance`` (1e-9), so it is also a check.
"""

from __future__ import annotations

import argparse
import importlib.resources
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradaccum_torch.accumulator import Accumulator

__all__ = ["DemoResult", "RunResult", "load_corpus", "main", "run_demo"]

PAD = -100  # target index ignored by the loss
DTYPE = torch.float64


def load_corpus() -> str:
    """The text shipped with the package (no download)."""
    return importlib.resources.files(__package__).joinpath("corpus.txt").read_text("utf-8")


class CharModel(nn.Module):
    """Embedding, a one-layer GRU and a linear head: a few thousand parameters."""

    def __init__(self, vocab: int, embed: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(tokens))
        logits: torch.Tensor = self.head(out)
        return logits


@dataclass(frozen=True)
class Batch:
    """Right-padded inputs and targets (padding is ``PAD`` in the targets)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    tokens: int  # real (non-padding) target tokens


def make_batch(seqs: Sequence[list[int]]) -> Batch:
    """Pad token sequences on the right; the target is the input shifted by one."""
    width = max(len(s) for s in seqs) - 1
    inputs = torch.zeros(len(seqs), width, dtype=torch.long)
    targets = torch.full((len(seqs), width), PAD, dtype=torch.long)
    for row, seq in enumerate(seqs):
        inputs[row, : len(seq) - 1] = torch.tensor(seq[:-1])
        targets[row, : len(seq) - 1] = torch.tensor(seq[1:])
    return Batch(inputs, targets, sum(len(seq) - 1 for seq in seqs))


@dataclass(frozen=True)
class Window:
    """One optimizer step's data: the whole batch and the same sequences as microbatches."""

    large: Batch
    micro: list[Batch]


def make_windows(
    text: str, steps: int, batch: int, microbatches: int, seed: int
) -> tuple[list[Window], int]:
    """``steps`` windows of ``batch`` random spans (8..64 characters), each sorted by
    length and cut into ``microbatches`` equal-count microbatches. Returns the windows and
    the vocabulary size."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = [index[c] for c in text]
    rng = random.Random(seed)
    per = batch // microbatches
    windows = []
    for _ in range(steps):
        seqs = []
        for _ in range(batch):
            length = rng.randint(8, 64)
            start = rng.randrange(len(ids) - length)
            seqs.append(ids[start : start + length])
        seqs.sort(key=len)
        micro = [make_batch(seqs[i : i + per]) for i in range(0, batch, per)]
        windows.append(Window(make_batch(seqs), micro))
    return windows, len(chars)


def token_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Sum of per-token cross-entropy over the real tokens of ``batch``."""
    logits = model(batch.inputs)
    return nn.functional.cross_entropy(
        logits.flatten(0, 1), batch.targets.flatten(), ignore_index=PAD, reduction="sum"
    )


@dataclass
class RunResult:
    """One training run: the loss before each step, the final parameters, its duration."""

    name: str
    losses: list[float] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    final_loss: float = float("nan")
    seconds: float = 0.0

    def deviation(self, other: RunResult) -> float:
        """Largest absolute parameter difference from ``other``."""
        return max(float((p - other.params[n]).abs().max()) for n, p in self.params.items())


@dataclass
class DemoResult:
    """Everything the demo measured (returned by `run_demo`)."""

    runs: dict[str, RunResult]
    deviations: dict[str, float]
    resume_deviation: float
    checkpoint: Path
    plot: Path | None


class _Progress:
    """A tqdm bar counting optimizer steps, or nothing."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="step", leave=True, file=sys.stderr)

    def step(self, loss: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _fresh(vocab: int, seed: int, lr: float) -> tuple[CharModel, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = CharModel(vocab).to(DTYPE)
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _corpus_loss(model: nn.Module, windows: Sequence[Window]) -> float:
    """Token-mean loss of ``model`` over every window's data (the same for every run)."""
    with torch.no_grad():
        total = sum(float(token_sum(model, w.large)) for w in windows)
    return total / sum(w.large.tokens for w in windows)


def _run_large(
    windows: Sequence[Window], vocab: int, seed: int, lr: float, progress: bool
) -> RunResult:
    result = RunResult("(a) one large batch")
    model, opt = _fresh(vocab, seed, lr)
    bar = _Progress(progress, len(windows), "(a) large batch ")
    start = time.perf_counter()
    for window in windows:
        loss = token_sum(model, window.large) / window.large.tokens
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        bar.step(result.losses[-1])
    bar.close()
    result.seconds = time.perf_counter() - start
    result.params = _snapshot(model)
    result.final_loss = _corpus_loss(model, windows)
    return result


def _microbatches(windows: Sequence[Window]) -> Iterator[Batch]:
    for window in windows:
        yield from window.micro


def _run_items(
    windows: Sequence[Window],
    vocab: int,
    seed: int,
    lr: float,
    progress: bool,
    checkpoint: Path,
) -> RunResult:
    """Run (b), saving a checkpoint after the first half of the last window."""
    result = RunResult("(b) gradaccum, items")
    model, opt = _fresh(vocab, seed, lr)
    k = len(windows[0].micro)
    acc = Accumulator(model, opt, steps=k, normalization="items")
    bar = _Progress(progress, len(windows), "(b) gradaccum   ")
    save_at = (len(windows) - 1) * k + k // 2  # microbatches done when the checkpoint is taken
    window_sum = 0.0
    window_tokens = 0
    saving = 0.0
    start = time.perf_counter()
    for done, micro in enumerate(acc.iterate(list(_microbatches(windows))), start=1):
        with acc.microbatch(items=micro.tokens):
            loss = token_sum(model, micro)
            stepped = acc.backward(loss)
        window_sum += loss.item()
        window_tokens += micro.tokens
        if stepped:
            result.losses.append(window_sum / window_tokens)
            bar.step(result.losses[-1])
            window_sum, window_tokens = 0.0, 0
        if done == save_at:
            began = time.perf_counter()
            acc.save(checkpoint)  # mid-window: in-flight gradients and all
            saving = time.perf_counter() - began
    bar.close()
    result.seconds = time.perf_counter() - start - saving  # training time only
    result.params = _snapshot(model)
    result.final_loss = _corpus_loss(model, windows)
    return result


def _resume(
    windows: Sequence[Window], vocab: int, seed: int, lr: float, checkpoint: Path
) -> dict[str, torch.Tensor]:
    """A fresh model, optimizer and accumulator loaded from the mid-window checkpoint,
    finishing the last window: returns the final parameters."""
    model, opt = _fresh(vocab, seed + 1, lr)  # a different init: the checkpoint must restore it
    k = len(windows[0].micro)
    acc = Accumulator(model, opt, steps=k, normalization="items")
    acc.load(checkpoint)
    position = acc.stats.position
    for micro in acc.iterate(windows[-1].micro[position:]):
        with acc.microbatch(items=micro.tokens):
            acc.backward(token_sum(model, micro))
    return _snapshot(model)


def _run_naive(
    windows: Sequence[Window], vocab: int, seed: int, lr: float, progress: bool
) -> RunResult:
    result = RunResult("(c) naive mean of means")
    model, opt = _fresh(vocab, seed, lr)
    bar = _Progress(progress, len(windows), "(c) naive       ")
    start = time.perf_counter()
    for window in windows:
        k = len(window.micro)
        window_sum = 0.0
        for micro in window.micro:
            summed = token_sum(model, micro)
            (summed / micro.tokens / k).backward()  # type: ignore[no-untyped-call]
            window_sum += summed.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        result.losses.append(window_sum / window.large.tokens)
        bar.step(result.losses[-1])
    bar.close()
    result.seconds = time.perf_counter() - start
    result.params = _snapshot(model)
    result.final_loss = _corpus_loss(model, windows)
    return result


def _plot(runs: Sequence[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(7, 6), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    styles = [("-", 3.0, 0.45, "C0"), ("--", 1.5, 1.0, "C1"), (":", 1.8, 1.0, "C2")]
    reference = runs[0].losses
    for run, (style, width, alpha, color) in zip(runs, styles, strict=False):
        steps = range(1, len(run.losses) + 1)
        look = {"linewidth": width, "alpha": alpha, "color": color, "label": run.name}
        top.plot(steps, run.losses, style, **look)
        if run is not runs[0]:
            # exact zeros cannot be drawn on a log scale: floor them at 1e-17
            gaps = [max(abs(x - r), 1e-17) for x, r in zip(run.losses, reference, strict=True)]
            bottom.semilogy(steps, gaps, style, **look)
    top.set_ylabel("training loss (token mean, nats)")
    top.set_title("Char-level LM: one large batch vs accumulated microbatches")
    top.grid(alpha=0.3)
    top.legend()
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("|loss - loss of (a)|")
    bottom.grid(alpha=0.3, which="both")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(
    out: str | Path = "demo-out",
    *,
    steps: int = 60,
    batch: int = 32,
    microbatches: int = 4,
    lr: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    plot: bool = True,
) -> DemoResult:
    """Train the three runs and write ``out/loss.png`` and ``out/checkpoint``.

    Pure measurement: prints nothing (except the progress bars on stderr); see `main`.
    """
    if steps < 1 or microbatches < 2 or batch % microbatches:
        raise ValueError(
            f"need steps >= 1 and a batch ({batch}) divisible by microbatches ({microbatches}) >= 2"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint"
    windows, vocab = make_windows(load_corpus(), steps, batch, microbatches, seed)
    large = _run_large(windows, vocab, seed, lr, progress)
    items = _run_items(windows, vocab, seed, lr, progress, checkpoint)
    naive = _run_naive(windows, vocab, seed, lr, progress)
    resumed = _resume(windows, vocab, seed, lr, checkpoint)
    resume_deviation = max(float((p - items.params[n]).abs().max()) for n, p in resumed.items())
    png = None
    if plot:
        png = out / "loss.png"
        _plot([large, items, naive], png)
    runs = {"a": large, "b": items, "c": naive}
    deviations = {key: run.deviation(large) for key, run in runs.items()}
    return DemoResult(runs, deviations, resume_deviation, checkpoint, png)


def format_table(result: DemoResult) -> str:
    """The summary table as Markdown."""
    lines = [
        "| run | final loss | max abs(param - param_a) | training time |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, run in result.runs.items():
        lines.append(
            f"| {run.name} | {run.final_loss:.6f} | {result.deviations[key]:.1e} | "
            f"{run.seconds:.1f} s |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo from the command line; 0 when (b) matches (a), 1 when it does not."""
    parser = argparse.ArgumentParser(
        prog="python -m gradaccum_torch.demo",
        description="Exact gradient accumulation on a tiny character-level language model.",
    )
    parser.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default: 60)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step (default: 32)")
    parser.add_argument(
        "--microbatches", type=int, default=4, help="microbatches per step (default: 4)"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-9,
        help="largest deviation of (b) from (a) that passes (default: 1e-9)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and steady on a busy machine
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> int:
    from gradaccum.cli import main as gradaccum_cli

    per = args.batch // max(args.microbatches, 1)
    size = sum(p.numel() for p in CharModel(len(set(load_corpus()))).parameters())
    print(
        f"gradaccum-torch demo: a {size}-parameter char-level GRU language model (float64), "
        f"{args.steps} AdamW steps of {args.batch} "
        f"sequences (8-64 chars), as 1 batch (a) or {args.microbatches} length-bucketed "
        f"microbatches of {per} (b, c)",
        flush=True,
    )
    result = run_demo(
        args.out,
        steps=args.steps,
        batch=args.batch,
        microbatches=args.microbatches,
        progress=not args.no_progress,
    )
    sys.stderr.flush()
    print()
    print(format_table(result))
    print()
    ok = result.deviations["b"] <= args.tolerance
    verdict = "<= {0:.0e}: exact" if ok else "> {0:.0e}: NOT EXACT"
    print(
        f"(b) vs (a): max deviation {result.deviations['b']:.1e} " + verdict.format(args.tolerance)
    )
    print(f"(c) vs (a): max deviation {result.deviations['c']:.1e}: mean of means is biased")
    print(
        f"resumed from the mid-window checkpoint: max deviation from (b) "
        f"{result.resume_deviation:.1e}"
    )
    if result.plot is not None:
        print(f"loss curves: {result.plot}")
    print(f"checkpoint:  {result.checkpoint} (run (b), taken mid-window)")
    print()
    print(f"$ gradaccum inspect {result.checkpoint}")
    sys.stdout.flush()
    status = gradaccum_cli(["inspect", str(result.checkpoint)])
    if status != 0:
        return status
    if not ok:
        print(
            f"error: (b) deviates from (a) by {result.deviations['b']:.3e} > {args.tolerance:.0e}",
            file=sys.stderr,
        )
        return 1
    if result.resume_deviation > args.tolerance:
        print(
            f"error: the run resumed from the checkpoint deviates from (b) by "
            f"{result.resume_deviation:.3e} > {args.tolerance:.0e}",
            file=sys.stderr,
        )
        return 1
    return 0
