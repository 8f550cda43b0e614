//! A stand-in `libnvidia-ml.so` for tests: the GPUs come from a JSON file, and faults
//! (XID errors, double-bit ECC errors, a GPU falling off the bus) are injected through a
//! second JSON file.
//!
//! The agent's real NVML code path (`nvml-wrapper` loading a shared library with
//! `dlopen`) runs unchanged against this library; only the library path differs. The
//! crate is built twice over: as a `cdylib`, which is the fake `libnvidia-ml.so`, and as
//! an `rlib`, which gives tests the file formats ([`MockConfig`], [`Fault`]), writers for
//! them, and [`find_cdylib`] to locate the built library.
//!
//! How a test uses it:
//!
//! 1. [`write_config`] a [`MockConfig`] and point [`CONFIG_ENV`] at it; optionally point
//!    [`FAULTS_ENV`] at a fault file (it need not exist yet). Both variables are read
//!    by the first `nvmlInit`, so set them before opening NVML, and remember they are
//!    process-wide.
//! 2. Open NVML with the library path from [`find_cdylib`].
//! 3. [`write_faults`] to inject faults; event waits and device calls re-read the file.
//!
//! Only the functions the agent needs are exported (see `ffi.rs`); `nvml-wrapper`
//! resolves symbols lazily, so anything else fails with a "failed to load symbol" error
//! when called, not at load time. This is the only crate in Muster with `unsafe` code:
//! the C ABI needs raw pointers, and each `unsafe` block says why it is sound.

#![deny(unsafe_op_in_unsafe_fn)]

mod config;
mod ffi;
mod state;

use std::path::PathBuf;

pub use config::{
    parse_bus_id, read_config, read_faults, write_config, write_faults, Fault, MockConfig,
    MockFileError, MockGpu, PciAddress, CONFIG_ENV, FAULTS_ENV, MAX_GPUS,
};

/// File name of the built mock library (`libmuster_nvml_mock.so` on Linux).
pub fn cdylib_file_name() -> String {
    format!(
        "{}muster_nvml_mock{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// Finds the mock library Cargo built for the running test binary.
///
/// Walks up from the directory of `current_exe()` and returns the first `<dir>/<name>`
/// or `<dir>/deps/<name>` that exists. A test binary lives in `target/<profile>/deps/`,
/// where Cargo also puts the `cdylib` of every dependency it built, so a test crate that
/// lists `muster-nvml-mock` as a (dev-)dependency always finds a fresh copy.
pub fn find_cdylib() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let name = cdylib_file_name();
    exe.ancestors()
        .skip(1)
        .flat_map(|dir| [dir.join(&name), dir.join("deps").join(&name)])
        .find(|candidate| candidate.is_file())
}
