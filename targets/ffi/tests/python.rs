//! Runs `tests/test_ffi.py` against the built cdylib through freshly
//! generated Python bindings, so `cargo test` covers the foreign boundary:
//! the library is loaded by Python's ctypes exactly as a host app loads it.
//!
//! Needs `python3` on PATH (the standard library only).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The cdylib cargo built for this test run. It sits next to the test
/// executable in `<target>/<profile>/deps`: cargo emits every crate type
/// of the library there, and copies it up to `<target>/<profile>` only for
/// `cargo build`, so the copy up there may be stale during `cargo test`.
fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("test executable has a directory");
    let name = format!(
        "{}fedge_ffi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let lib = deps.join(&name);
    assert!(
        lib.is_file(),
        "{} is missing: cargo builds it with the tests (crate-type cdylib)",
        lib.display()
    );
    lib
}

fn python3() -> PathBuf {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "python3 is needed to test the generated Python bindings; install Python 3.8 or newer"
    );
    PathBuf::from("python3")
}

#[test]
fn python_bindings_drive_the_library() {
    let python = python3();
    let bindgen = env!("CARGO_BIN_EXE_uniffi-bindgen");
    let lib = cdylib();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bindgen)
        .args(["generate", "--library"])
        .arg(&lib)
        .args(["--language", "python", "--no-format", "--out-dir"])
        .arg(dir.path())
        .output()
        .expect("run uniffi-bindgen");
    assert!(
        out.status.success(),
        "uniffi-bindgen failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("fedge_ffi.py").is_file());
    // The generated module loads the library from its own directory.
    std::fs::copy(&lib, dir.path().join(lib.file_name().unwrap())).unwrap();

    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python)
        .arg(manifest.join("tests/test_ffi.py"))
        .env("PYTHONPATH", dir.path())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("FEDGE_MODELS_DIR", manifest.join("../../models"))
        .current_dir(dir.path())
        .output()
        .expect("run python3");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{log}");
    assert!(out.status.success(), "the Python tests failed:\n{log}");
    // unittest reports its count: make sure the tests ran rather than
    // being collected as zero, and none was skipped.
    let ran: usize = log
        .split("Ran ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no unittest summary:\n{log}"));
    assert!(ran >= 6, "only {ran} Python tests ran:\n{log}");
    assert!(!log.contains("skipped"), "{log}");
}
