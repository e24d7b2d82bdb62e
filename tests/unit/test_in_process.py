"""The one in-process federation helper the study and the benchmarks run."""

from wardround.simulations.in_process import in_process_grid, run_in_process, site_count


def test_a_run_reaches_every_site_of_the_sites_dir_named_by_its_folder(
    synthetic_sites, tiny_config, tmp_path
):
    config = tiny_config.with_overrides(
        data={"sites_dir": str(synthetic_sites)},
        federation={"rounds": 1, "min_sites": 1},
        train={"max_steps": 1},
        privacy={"enabled": False},
        secure_aggregation={"enabled": False},
        output={"dir": str(tmp_path / "run")},
    )
    folders = sorted(p.parent.name for p in synthetic_sites.glob("*/site.toml"))

    result = run_in_process(config, tmp_path / "run")

    assert site_count(config) == len(folders) == 2
    assert [r.round for r in result.rounds] == [0, 1]
    assert sorted(t.site for t in result.rounds[1].train) == folders
    assert sorted(e.site for e in result.rounds[1].evaluate) == folders
    assert (tmp_path / "run" / "run.json").is_file()


def test_site_i_is_partition_i_of_the_grid(tiny_config, synthetic_sites):
    config = tiny_config.with_overrides(data={"sites_dir": str(synthetic_sites)})

    grid = in_process_grid(config, 3)

    nodes = list(grid.get_node_ids())
    assert len(nodes) == 3
    partitions = [grid._contexts[n].node_config for n in nodes]
    assert partitions == [{"partition-id": i, "num-partitions": 3} for i in range(3)]
