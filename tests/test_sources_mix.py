"""Several datasets in one run (``data.sources``): two sources written as outside tools write them
(webdataset's ShardWriter, a plain tarfile), mixed by weight in resampled and exact mode, per-source
counts, and the config refusals' exact lines."""

from __future__ import annotations

import collections
import io
import tarfile
from pathlib import Path

import pytest
from rich.console import Console

from xmodal.config import ConfigError, compose_config, validate
from xmodal.data.cli import main
from xmodal.data.epoch_plan import Topology, plan_epoch
from xmodal.data.mix import SourceSpec, resolve_mix, source_draws, source_names
from xmodal.data.plan import plan_report, print_plan
from xmodal.data.splits import SplitSettings, iter_split_records

NO_CARVE = SplitSettings(val_fraction=0, test_fraction=0)


def shardwriter_source(root: Path, shards: int, per_shard: int) -> Path:
    """Source A as a user's script writes it with webdataset's ShardWriter: no index."""
    from webdataset import ShardWriter

    root.mkdir(parents=True)
    with ShardWriter(str(root / "a-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(shards * per_shard):
            sink.write({"__key__": f"a{i:05d}", "txt": f"photo {i}".encode(), "cls": str(i % 3).encode()})
    return root


def tarfile_source(root: Path, shards: int, per_shard: int) -> Path:
    """Source B as a plain ``tarfile`` script writes it: ``key.txt`` members, no index."""
    root.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(root / f"b-{s:04d}.tar", "w") as tar:
            for j in range(per_shard):
                data = f"web caption {s} {j}".encode()
                info = tarfile.TarInfo(f"b{s:04d}{j:04d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """A: 2 shards x 8 samples (small, own photos); B: 6 shards x 16 (a larger web set)."""
    root = tmp_path_factory.mktemp("mix")
    return shardwriter_source(root / "photos", 2, 8), tarfile_source(root / "web", 6, 16)


def test_resampled_weights_3_to_1_draw_three_quarters_from_the_small_source(two_sources):
    photos, web = two_sources
    mix = resolve_mix([SourceSpec(str(photos), 3, "photos"), SourceSpec(str(web), 1, "web")], NO_CARVE)
    train = mix.train("resampled")
    # Per shard w / N (N: the source's samples): a size-blind weight of 3 per shard of A would give A
    # only 3*16 / (3*16 + 96) = 1/3 of the samples.
    assert train.weights == (3 / 16,) * 2 + (1 / 96,) * 6
    plan = plan_epoch(
        train.shards, "resampled", 0, 0, Topology(0, 2, 2), 8, samples_per_epoch=32000, weights=train.weights
    )
    drawn = source_draws(plan, train)
    assert sum(drawn.values()) == plan.samples_per_rank * 2 == 32000
    assert drawn["photos"] / 32000 == pytest.approx(0.75, abs=0.03)  # ~3500 shard draws: SD ~0.01
    # The count is the plan's own: walking every slot's rows gives the same per-source numbers.
    by_url = {sh.url: name for sh, name in zip(train.shards, ("photos",) * 2 + ("web",) * 6, strict=True)}
    walked = collections.Counter(
        by_url[url] for r in range(2) for w in range(2) for url, _, ok in plan.slot(r, w).entries() if ok
    )
    assert dict(walked) == drawn


def test_exact_weights_2_and_1_repeat_every_key_of_a_twice_and_of_b_once(two_sources, tmp_path):
    photos, web = two_sources
    specs = [SourceSpec(str(photos), 2, "photos"), SourceSpec(str(web), 1, "web")]
    settings = SplitSettings(index_dir=str(tmp_path / "index"))  # carved val/test, as a run does
    dump = tmp_path / "keys.txt"
    report = plan_report(
        photos,
        2,
        2,
        mode="exact",
        batch_size=4,
        seed=3,
        epoch=1,
        dump_keys=dump,
        settings=settings,
        sources=specs,
    )
    seen = collections.Counter(
        line.split()[3] for line in dump.read_text().splitlines() if line.endswith(" 1")
    )
    mix = resolve_mix(specs, settings)
    keys_a = {r["__key__"] for r in iter_split_records(mix.parts[0], "train")}
    keys_b = {r["__key__"] for r in iter_split_records(mix.parts[1], "train")}
    assert 0 < len(keys_a) < 16 and 0 < len(keys_b) < 96  # carving took val/test keys out of train
    assert seen == {**dict.fromkeys(keys_a, 2), **dict.fromkeys(keys_b, 1)}
    assert report["duplicates"] == 0 and report["missing"] == 0 and report["batches_equal"]
    planned = {s["name"]: (s["planned"], s["yielded"]) for s in report["sources"]}
    assert planned == {"photos": (2 * len(keys_a),) * 2, "web": (len(keys_b),) * 2}
    # Validation is every source's own carved val, concatenated.
    val = {r["__key__"] for r in iter_split_records(mix.data, "val")}
    assert val == {r["__key__"] for part in mix.parts for r in iter_split_records(part, "val")}
    assert (
        val & keys_a == set() and any(k.startswith("a") for k in val) and any(k.startswith("b") for k in val)
    )
    console = Console(file=io.StringIO(), width=200)
    print_plan(report, console)
    assert "each sample of a source appears weight times per epoch" in console.file.getvalue()


def test_plan_cli_prints_each_sources_share(two_sources, tmp_path, capsys):
    photos, web = two_sources
    args = ["plan", str(photos), str(web), "--weights", "3", "1", "--mode", "resampled"]
    args += [
        "--samples-per-epoch",
        "4000",
        "--world-size",
        "1",
        "--val-fraction",
        "0",
        "--test-fraction",
        "0",
    ]
    assert main([*args, "--cache-dir", str(tmp_path)]) == 0
    rows = {line.split("│")[1].strip(): line for line in capsys.readouterr().out.splitlines() if "│" in line}
    assert "75.0%" in rows["photos"] and "25.0%" in rows["web"]  # the share the weights ask for
    bad = ["plan", str(photos), str(web), "--weights", "1.5", "1", "--world-size", "1"]
    assert main(bad) == 2
    assert capsys.readouterr().err == (
        "xmodal-shards plan: error: --weights: 1.5 is not a whole number; in exact mode a weight is how "
        "many times each sample of its source appears per epoch (use --mode resampled for fractions)\n"
    )


def test_default_names_are_folder_names_told_apart(tmp_path):
    folders = [tmp_path / "x" / "train", tmp_path / "y" / "train", tmp_path / "web"]
    for folder in folders:
        folder.mkdir(parents=True)
    assert source_names([str(f) for f in folders], [None, None, "train"]) == [
        "train_2",
        "train_3",
        "train",
    ]


def refusals(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate(compose_config(overrides))
    return str(caught.value).splitlines()[1:]


def test_refusals_name_the_key_in_one_line(two_sources, tmp_path):
    photos, web = two_sources
    both = f"data.sources=[{{shards: {photos}, weight: 2.5}}, {{shards: {web}, name: web}}]"
    paths = f"paths.data_dir={tmp_path}"
    assert refusals([both, paths]) == [
        "  data.sources[0].weight: must be a whole number >= 1 in exact mode (each sample of the source "
        "appears weight times per epoch); use data.mode=resampled for fractional weights (got 2.5)"
    ]
    assert refusals([both, paths, f"data.shards={web}"]) == [
        "  data.sources: cannot be combined with data.shards (give one dataset as data.shards, several as "
        "data.sources)"
    ]
    names = f"data.sources=[{{shards: {photos}, weight: 0}}, {{shards: {web}, name: x}}, {{name: x}}]"
    assert refusals([names, paths, "data.mode=resampled", "data.samples_per_epoch=64"]) == [
        "  data.sources[0].weight: must be a finite number > 0 (got 0.0)",
        "  data.sources[2].shards: must be set (any form data.shards takes)",
        "  data.sources[2].name: 'x' already names data.sources[1]",
    ]
    no_val = f"data.sources=[{{shards: {photos}}}, {{shards: {web}}}]"
    lines = refusals([no_val, paths, "data.val_fraction=0"])
    assert lines[0].startswith("  data.sources[0] (photos): split 'val' not in ")
    assert lines[1].startswith("  data.sources[1] (web): split 'val' not in ")
    # Resampled fractional weights pass, and the experiment follows the sources' names.
    ok = compose_config(
        [f"data.sources=[{{shards: {photos}, weight: 0.7}}, {{shards: {web}, weight: 0.3}}]", paths]
        + ["data.mode=resampled", "data.samples_per_epoch=64"]
    )
    validate(ok)
    assert ok.experiment_name == "caption_photos-web"


def test_an_index_made_for_a_relative_path_serves_the_absolute_one(two_sources, monkeypatch):
    # Validation resolves data.sources as typed (relative); the run, after prepare_data, absolute.
    from xmodal.data.splits import resolve_splits

    photos, _ = two_sources
    monkeypatch.chdir(photos.parent)
    relative = resolve_splits(photos.name)
    absolute = resolve_splits(str(photos))
    assert [sh.num_samples for sh in absolute.splits["train"]] == [
        sh.num_samples for sh in relative.splits["train"]
    ]
    assert all(Path(sh.url).is_absolute() for sh in absolute.splits["train"])


def held_out_source(root: Path, shards: int, per_shard: int) -> Path:
    """One held-out set for the whole mix (COCO val, say): plain tars, keys ``v…``, no index."""
    root.mkdir(parents=True)
    for s in range(shards):
        with tarfile.open(root / f"v-{s:04d}.tar", "w") as tar:
            for j in range(per_shard):
                data = f"held out {s} {j}".encode()
                info = tarfile.TarInfo(f"v{s:02d}{j:03d}.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def test_explicit_val_shards_are_the_val_split_of_every_source(two_sources, tmp_path, capsys):
    """data.sources + data.val_shards: val is exactly the explicit set (over 2 ranks x 2 workers,
    each key once); nothing is carved as val from the sources, test still is."""
    photos, web = two_sources
    coco_val = held_out_source(tmp_path / "coco_val", 3, 5)
    specs = [SourceSpec(str(photos), 1, "photos"), SourceSpec(str(web), 1, "web")]
    settings = SplitSettings(val_shards=str(coco_val), index_dir=str(tmp_path / "index"))
    mix = resolve_mix(specs, settings)
    expected = {f"v{s:02d}{j:03d}" for s in range(3) for j in range(5)}
    assert {r["__key__"] for r in iter_split_records(mix.data, "val")} == expected
    assert mix.data.how["val"] == f"data.val_shards ({coco_val}), for every source"
    assert all("val" not in part.splits for part in mix.parts)  # none carved from the sources
    assert [part.carve.val for part in mix.parts] == [0.0, 0.0] and mix.parts[1].carve.test == 0.05
    train_keys = {r["__key__"] for part in mix.parts for r in iter_split_records(part, "train")}
    test_keys = {r["__key__"] for r in iter_split_records(mix.data, "test")}
    assert len(train_keys) + len(test_keys) == 16 + 96 and not train_keys & test_keys

    dump = tmp_path / "val-keys.txt"
    report = plan_report(
        photos, 2, 2, batch_size=2, split="val", dump_keys=dump, settings=settings, sources=specs
    )
    seen = [line.split()[3] for line in dump.read_text().splitlines() if line.endswith(" 1")]
    assert sorted(seen) == sorted(expected) and report["num_samples"] == 15
    assert report["duplicates"] == 0 and report["missing"] == 0 and report["batches_equal"]
    # The training plan and its per-source counts are the sources' own, as without the explicit val.
    train = plan_report(photos, 2, 2, batch_size=2, settings=settings, sources=specs)
    assert {s["name"]: s["planned"] for s in train["sources"]} == {
        "photos": mix.parts[0].size("train"),
        "web": mix.parts[1].size("train"),
    }
    args = [
        "plan",
        str(photos),
        str(web),
        "--val-shards",
        str(coco_val),
        "--split",
        "val",
        "--world-size",
        "2",
    ]
    assert main([*args, "--batch-size", "2", "--cache-dir", str(tmp_path / "index")]) == 0
    out = capsys.readouterr().out
    assert (
        "val of " in out and "15 samples in 3 shards" in out and "exact-once: 0 duplicates, 0 missing" in out
    )


def test_explicit_val_shards_with_sources_pass_validation_and_bad_ones_are_one_line(two_sources, tmp_path):
    photos, web = two_sources
    coco_val = held_out_source(tmp_path / "coco_val", 1, 4)
    both = f"data.sources=[{{shards: {photos}}}, {{shards: {web}}}]"
    paths = f"paths.data_dir={tmp_path}"
    # Formerly refused ("cannot be combined with data.sources"); now the run's val split, and the
    # sources need none of their own (data.val_fraction=0 carves nothing).
    validate(compose_config([both, paths, f"data.val_shards={coco_val}", "data.val_fraction=0"]))
    assert refusals([both, paths, f"data.val_shards={coco_val}", "data.val_fraction=0.1"]) == [
        "  data.val_fraction=0.1: data.val_shards is the val split of every source; leave "
        "data.val_fraction unset or 0"
    ]
    leak = refusals([both, paths, f"data.test_shards={web / 'b-0002.tar'}"])
    assert leak == [
        f"  data.test_shards: {web / 'b-0002.tar'} is also in data.sources[1] (web)'s train split: "
        "held-out samples would be trained on"
    ]
    missing = refusals([both, paths, f"data.val_shards={tmp_path / 'nope'}"])
    assert len(missing) == 1 and missing[0].startswith(
        f"  data.val_shards: {tmp_path / 'nope'}: no such file"
    )
