//! The crate layering, checked on the dependency graph cargo resolves
//! (normal dependencies only: dev- and build-dependencies do not ship):
//!
//! - `fedge-proto` and the `fedge-aggregator` library reach no tract, wgpu
//!   or naga package, nor `fedge-engine` or `fedge-device`;
//! - no workspace package but `fedge-engine` depends directly on tract,
//!   wgpu or naga;
//! - `fedge-device` without its default features (no `engine`) reaches no
//!   tract, wgpu, naga nor `fedge-engine`.
//!
//! The resolved graph comes from `cargo tree --offline` (host platform, the
//! package's own feature selection), the declared dependencies from
//! `cargo metadata --no-deps --offline`. Not the full `cargo metadata`
//! resolve: it needs every package of every platform in the lock file
//! downloaded (Android-only crates too), so it fails offline on a machine
//! that builds for Linux only; and it unifies features across the
//! workspace, so it cannot show `fedge-device` without `engine`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("aggregator/ sits in the workspace root")
        .to_path_buf()
}

fn cargo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(args)
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("cargo prints UTF-8")
}

/// tract, wgpu and naga: the heavy engine dependencies.
fn is_engine_backend(name: &str) -> bool {
    name.starts_with("tract-") || name.starts_with("wgpu") || name.starts_with("naga")
}

fn is_engine_or_device(name: &str) -> bool {
    is_engine_backend(name) || name == "fedge-engine" || name == "fedge-device"
}

/// The path (`A -> B -> C`) to the first occurrence of every package that
/// `forbidden` matches in `package`'s normal-dependency tree, built with
/// the feature flags `flags`.
fn forbidden_paths(package: &str, flags: &[&str], forbidden: fn(&str) -> bool) -> Vec<String> {
    let mut args = vec![
        "tree",
        "--offline",
        "--locked",
        "-e",
        "normal",
        "--prefix",
        "depth",
        "--format",
        "{p}",
        "-p",
        package,
    ];
    args.extend(flags);
    let tree = cargo(&args);
    let mut stack: Vec<String> = Vec::new();
    let mut paths = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for line in tree.lines() {
        let digits = line.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 {
            continue;
        }
        let depth: usize = line[..digits].parse().expect("depth prefix");
        let name = line[digits..]
            .split_whitespace()
            .next()
            .expect("a package name after the depth");
        assert!(depth <= stack.len(), "depth {depth} skips a level: {line}");
        stack.truncate(depth);
        stack.push(name.to_string());
        if depth > 0 && forbidden(name) && seen.insert(name.to_string()) {
            paths.push(stack.join(" -> "));
        }
    }
    assert_eq!(
        stack.first().map(String::as_str),
        Some(package),
        "cargo tree printed no tree for {package}:\n{tree}"
    );
    paths
}

fn assert_none(what: &str, paths: &[String]) {
    assert!(
        paths.is_empty(),
        "{what}, through normal dependencies:\n  {}",
        paths.join("\n  ")
    );
}

#[test]
fn proto_and_the_aggregator_library_reach_no_engine_device_tract_or_wgpu() {
    for package in ["fedge-proto", "fedge-aggregator"] {
        assert_none(
            &format!("{package} must not reach tract, wgpu, naga, fedge-engine or fedge-device"),
            &forbidden_paths(package, &[], is_engine_or_device),
        );
    }
}

#[test]
fn the_device_without_its_engine_feature_reaches_no_tract_or_wgpu() {
    assert_none(
        "fedge-device --no-default-features must not reach tract, wgpu, naga or fedge-engine",
        &forbidden_paths("fedge-device", &["--no-default-features"], |n| {
            is_engine_backend(n) || n == "fedge-engine"
        }),
    );
}

/// The walk above does see tract where it is: otherwise the checks would
/// pass for the wrong reason.
#[test]
fn the_graph_walk_finds_tract_under_the_engine() {
    let paths = forbidden_paths("fedge-engine", &[], is_engine_backend);
    assert!(
        paths.iter().any(|p| p == "fedge-engine -> tract-onnx"),
        "{paths:?}"
    );
}

#[test]
fn only_the_engine_depends_directly_on_tract_or_wgpu() {
    let meta: serde_json::Value = serde_json::from_str(&cargo(&[
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
        "--offline",
        "--locked",
    ]))
    .expect("cargo metadata prints JSON");
    let packages = meta["packages"].as_array().expect("packages");
    assert!(packages.len() >= 6, "{} workspace packages", packages.len());
    let mut direct = Vec::new();
    for p in packages {
        let name = p["name"].as_str().expect("package name");
        if name == "fedge-engine" {
            continue;
        }
        for d in p["dependencies"].as_array().expect("dependencies") {
            let dep = d["name"].as_str().expect("dependency name");
            // kind null: a normal dependency (not dev, not build).
            if d["kind"].is_null() && is_engine_backend(dep) {
                direct.push(format!("{name} -> {dep}"));
            }
        }
    }
    assert_none(
        "only fedge-engine may depend directly on tract, wgpu or naga",
        &direct,
    );
}
