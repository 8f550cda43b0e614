//! The `fuzz/job_spec` target's property as bounded proptests: the job-file
//! parser answers arbitrary text, and job files with arbitrary values for
//! every key, with a spec or an error, never a panic.

use super::from_toml;
use proptest::prelude::*;

/// A TOML value of some kind, as text.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        ".{0,30}".prop_map(|s| format!("{s:?}")),
        "[0-9]{1,4}[KMGTkmgt]?i?B?".prop_map(|s| format!("{s:?}")),
        "[0-9:-]{1,12}".prop_map(|s| format!("{s:?}")),
        proptest::collection::vec(".{0,10}", 0..4).prop_map(|v| format!("{v:?}")),
        Just("true".to_string()),
        Just("{ a = 1 }".to_string()),
    ]
}

const KEYS: &[&str] = &[
    "name",
    "tenant",
    "priority",
    "same",
    "prefer_same",
    "tasks",
    "gpus",
    "cpus",
    "mem",
    "time",
    "command",
    "workdir",
    "checkpoint_dir",
    "bogus",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s).{0,400}") {
        if let Ok(p) = from_toml("fuzz.toml", &text) {
            let _ = p.finish(std::path::Path::new("/tmp"));
        }
    }

    #[test]
    fn arbitrary_values_never_panic(
        entries in proptest::collection::vec((0..KEYS.len(), value()), 0..8),
        env in proptest::collection::vec((".{0,8}", value()), 0..3),
    ) {
        let mut text = String::new();
        for (k, v) in entries {
            text.push_str(&format!("{} = {v}\n", KEYS[k]));
        }
        if !env.is_empty() {
            text.push_str("[env]\n");
            for (k, v) in env {
                text.push_str(&format!("{k:?} = {v}\n"));
            }
        }
        if let Ok(p) = from_toml("fuzz.toml", &text) {
            let _ = p.finish(std::path::Path::new("/tmp"));
        }
    }
}
