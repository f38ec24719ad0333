//! Shards of a sweep, planned without a model: they partition the cells,
//! stay balanced, and keep cells optimised together in one shard.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cram_eval::sweep::{plan, Shard, SweepConfig};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A side-by-side sweep (as configs/side-by-side.toml): every case file
/// the project ships, nine methods, five ratios, three seeds.
fn side_by_side(dir: &Path) -> (SweepConfig, PathBuf) {
    let case_files: Vec<PathBuf> = ["bearing/bearing-questions.json", "fastapi-inventory/fastapi-inventory-questions.json", "go-ledger/go-ledger-questions.json"]
        .iter()
        .map(|file| root().join("eval").join(file))
        .collect();
    let path = dir.join("side-by-side.toml");
    std::fs::write(&path, format!(
        "model = \"qwen2.5-coder-0.5b-instruct\"\nbaselines = [\"full\", \"none\", \"truncated\"]\n\
         ratios = [1.6, 2.4, 3.2, 4.8, 6.4]\nseeds = [0, 1, 2]\n\
         methods = [{{ method = \"surprisal\", early_stop = false }}, {{ method = \"surprisal\", key_weight = 1.0 }},\n\
         {{ method = \"surprisal\", init = \"random\" }}, \"snapkv\", \"key-norm\", \"streaming\", \"summary\", \"uniform\", \"hybrid\"]\n\
         [[cases]]\nfile = {:?}\nids = [\"t8-claude-md\", \"t18-auth-middleware\", \"t24-reports\"]\n\
         [[cases]]\nfile = {:?}\n[[cases]]\nfile = {:?}\n",
        case_files[0], case_files[1], case_files[2]
    )).unwrap();
    (SweepConfig::load(&path).unwrap(), path)
}

/// The shard (from 1) of every cell key, over all `count` shards; fails if
/// a cell is in two.
fn shard_of_each_cell(config: &SweepConfig, path: &Path, count: usize) -> HashMap<String, usize> {
    let cases = config.load_cases(path).unwrap();
    let mut shard_of = HashMap::new();
    for index in 1..=count {
        let shard = Shard::new(index, count).unwrap();
        for (cell, _) in shard.select(config, &cases, plan::cells(config, &cases).unwrap()).unwrap() {
            let earlier = shard_of.insert(cell.key(), index);
            assert!(earlier.is_none(), "{} is in shards {earlier:?} and {index} of {count}", cell.key());
        }
    }
    shard_of
}

fn cell_keys(config: &SweepConfig, path: &Path) -> Vec<String> {
    let cases = config.load_cases(path).unwrap();
    plan::cells(config, &cases).unwrap().iter().map(|(cell, _)| cell.key()).collect()
}

/// Cells per shard, from 1 to `count`.
fn sizes(shard_of: &HashMap<String, usize>, count: usize) -> Vec<usize> {
    (1..=count).map(|index| shard_of.values().filter(|&&shard| shard == index).count()).collect()
}

#[test]
fn shards_partition_the_cells_of_a_sweep_evenly() {
    let dir = tempfile::tempdir().unwrap();
    let (config, path) = side_by_side(dir.path());
    let all = cell_keys(&config, &path);
    assert!(all.len() > 100, "a sweep of several cases, methods, ratios and seeds: {}", all.len());
    for count in [1, 2, 3, 7, 16, all.len() + 5] {
        let shard_of = shard_of_each_cell(&config, &path, count);
        let mut sharded: Vec<&String> = shard_of.keys().collect();
        let mut unsharded: Vec<&String> = all.iter().collect();
        sharded.sort();
        unsharded.sort();
        assert_eq!(sharded, unsharded, "{count} shards: every cell, none missed");
        // Without batches every cell is a group of one: shards differ by one cell at most.
        let sizes = sizes(&shard_of, count);
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{count} shards: {sizes:?}");
    }
    // The same split every time (each array task plans it on its own).
    assert_eq!(shard_of_each_cell(&config, &path, 5), shard_of_each_cell(&config, &path, 5));
}

#[test]
fn cells_optimised_together_stay_in_one_shard() {
    let dir = tempfile::tempdir().unwrap();
    let cases = root().join("eval/bearing/bearing-questions.json");
    let path = dir.path().join("batched.toml");
    // Plain recipes (surprisal, uniform, the random start at two seeds) of
    // the three single-turn cases may be optimised together; early
    // stopping, eviction, the baselines and the sequential case's cells run alone.
    std::fs::write(&path, format!(
        "model = \"qwen2.5-coder-0.5b-instruct\"\nratios = [1.6, 3.2, 4.8]\nseeds = [0, 1]\nbaselines = [\"full\", \"none\"]\n\
         batch_virtual_tokens = 4096\n\
         methods = [\"surprisal\", \"uniform\", {{ method = \"surprisal\", init = \"random\" }},\n\
         {{ method = \"uniform\", early_stop = true, ratios = [3.0] }}, \"streaming\"]\n\
         [[cases]]\nfile = {cases:?}\n"
    )).unwrap();
    let config = SweepConfig::load(&path).unwrap();
    let batchable = |key: &str| {
        let [case, method, ..] = key.split('|').collect::<Vec<_>>()[..] else { panic!("{key}") };
        case != "seq-turns-2-11" && ["surprisal", "uniform", "surprisal+random-init"].contains(&method)
    };
    let all = cell_keys(&config, &path);
    let batch_size = all.iter().filter(|key| key.starts_with("t8-claude-md|") && batchable(key)).count();
    assert_eq!(batch_size, 3 + 3 + 3 * 2, "surprisal and uniform at three ratios, the random start at two seeds");
    for count in [2, 3, 4, 7] {
        let shard_of = shard_of_each_cell(&config, &path, count);
        assert_eq!(shard_of.len(), all.len(), "{count} shards: every cell");
        for case in ["t8-claude-md", "t18-auth-middleware", "t24-reports"] {
            let shards: Vec<usize> = all.iter().filter(|key| key.starts_with(&format!("{case}|")) && batchable(key)).map(|key| shard_of[key]).collect();
            assert!(shards.windows(2).all(|pair| pair[0] == pair[1]), "{count} shards: {case}'s batch split over {shards:?}");
        }
        let sizes = sizes(&shard_of, count);
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= batch_size, "{count} shards: {sizes:?}");
    }
}

#[test]
fn a_shard_is_i_of_n_counted_from_one() {
    let shard: Shard = "2/8".parse().unwrap();
    assert_eq!((shard, shard.to_string()), (Shard::new(2, 8).unwrap(), "2/8".to_string()));
    assert_eq!("1/1".parse::<Shard>().unwrap(), Shard::WHOLE);
    for (text, expected) in [
        ("0/4", "I runs from 1 to 4"),
        ("5/4", "I runs from 1 to 4"),
        ("1/0", "1 shard or more"),
        ("3", "a shard is I/N"),
        ("a/4", "a shard is I/N"),
        ("-1/4", "a shard is I/N"),
    ] {
        let err = text.parse::<Shard>().unwrap_err();
        assert!(err.contains(expected), "{text}: {err}");
    }
}
