//! The hf-hub path, offline: an unknown repository is a clear error. Its own
//! test binary, since it sets process environment.

use cram::{Error, Model, ModelSource};

#[test]
fn an_unreachable_or_unknown_hub_repo_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    // An empty hub cache and an endpoint nothing listens on: what a user
    // without network sees, without depending on this machine's network.
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let source = ModelSource::hf_hub("cram-tests/no-such-model");
    let err = Model::load(&source, &candle_core::Device::Cpu).unwrap_err();
    match &err {
        Error::Hub { repo, file, .. } => {
            assert_eq!(repo, "cram-tests/no-such-model");
            assert_eq!(file, "config.json");
        }
        other => panic!("expected a hub error, got {other}"),
    }
    assert!(err.to_string().contains("cram-tests/no-such-model"));
}
