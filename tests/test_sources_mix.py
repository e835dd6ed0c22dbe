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
