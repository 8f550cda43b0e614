//! The job-file parser (`muster submit -f job.toml`) on arbitrary text: it
//! must answer with a value or an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../cli/src/spec.rs"]
#[allow(dead_code)]
mod spec;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(partial) = spec::from_toml("fuzz.toml", text) {
            let _ = partial.finish(std::path::Path::new("/tmp"));
        }
    }
});
